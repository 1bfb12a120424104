"""The Trainer's module file: TFX's GenericExecutor calls :func:`run_fn`, which trains with ``shaspec_tf`` and writes

* ``Format-Serving/`` (``fn_args.serving_model_dir``): the TF Serving SavedModel (``shaspec_tf.export``), what the
  Pusher copies into the versioned serving folder;
* ``Format-Shaspec/`` beside it: ``model_config.json`` and ``model.weights.h5`` (``shaspec train``'s folder), what
  the evaluator loads to run the sliding window on whole volumes;
* the run folder (``fn_args.model_run_dir``, a ``ModelRun`` artifact): checkpoints, TensorBoard logs,
  ``history.json`` and ``learning_curves.png``.

Everything about the run comes from ``custom_config`` (``pipeline.configs.TaskConfig.train_custom_config``): the
``task`` and the ``TrainConfig`` options the branch sets, under ``TrainConfig``'s names (``steps`` or ``epochs``,
``preset``, ``jit_compile``, ``run_eagerly``, ...; the others keep ``TrainConfig``'s and the task's defaults), and
the exporter's ``overlap`` when set (default: ``shaspec_tf.inference``'s). Keys that are not ``TrainConfig``'s
(Vertex AI's job settings) stay with the orchestrator.

Under ``KERAS_BACKEND=jax`` (set on the Trainer's container: the fast path, XLA) the model trains under JAX, its input
still a ``tf.data`` pipeline on the CPU (TensorFlow is kept off the GPUs, which JAX holds), and the train step is
compiled (``jit_compile`` defaults to true there unless the config sets it or ``run_eagerly``); the TF Serving export,
TensorFlow code, runs in a child process under the TensorFlow backend
(:func:`shaspec_tf.backends.export_under_tensorflow`), from the weights in ``Format-Shaspec``.

The backend must be in the environment when the process starts: TFX's container entrypoint (and its Trainer
executor) import TensorFlow and with it Keras, which fixes its backend at that first import, before ``run_fn`` is
called; setting ``KERAS_BACKEND`` here would change nothing. So the cloud pipeline's ``trainer_backend``
(``pipeline/configs.py``) is written into the compiled spec, the Trainer step's ``container.env`` or the Vertex AI
job's ``container_spec.env``, and reaches ``run_fn`` as ``custom_config["keras_backend"]``: a Trainer that finds
itself on another backend stops with a one-line error (:func:`training_options`) instead of training, say, on the
CPU of a JAX image whose TensorFlow cannot use the GPU.

Every folder may be a ``gs://`` URI (the Trainer on Vertex AI): files go through ``shaspec_tf.fileio``, and the
SavedModel is exported locally and uploaded whole. When the Trainer runs on several replicas (``TF_CONFIG`` with more
than one task) each replica calls :func:`run_fn`; they train together (``MultiWorkerMirroredStrategy``) and only the
chief writes the run folder and the model.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from components.evaluator import SHASPEC_FORMAT
from shaspec_tf import fileio

_KEPT = ("model_config.json", "model.weights.h5", "train_config.json", "history.json", "learning_curves.png")


def examples_folder(file_patterns) -> str:
    """The ``Examples`` artifact folder from the Trainer's split patterns (``URI/Split-train/*``, ``URI`` local or
    ``gs://...``)."""
    first = file_patterns[0] if isinstance(file_patterns, (list, tuple)) else file_patterns
    return fileio.dirname(fileio.dirname(first))


def _unversion_manifest(saved_model: str) -> None:
    """The Pusher picks the serving version (a timestamp), so the export manifest names none."""
    from shaspec_tf.export import MANIFEST_PATH

    path = fileio.join(saved_model, *MANIFEST_PATH.split(os.sep))
    manifest = fileio.read_json(path)
    manifest.update(version=None, model_name=None, versioned_by="the TFX Pusher (its push time)")
    fileio.atomic_write_json(path, manifest)


def training_options(config: dict, backend: str) -> dict:
    """``config`` with the defaults of ``backend``: under JAX the train step is compiled unless the config says
    otherwise (Keras' JAX trainer without ``jit_compile`` dispatches every op on its own). TensorFlow's
    distribution strategies are refused there with a one-line error, and so is a ``keras_backend`` (the pipeline's
    ``trainer_backend``) that is not ``backend``: the container did not get the environment the spec gives it."""
    from shaspec_tf.training.distribute import cluster

    config = dict(config)
    wanted = config.pop("keras_backend", None)
    if wanted and wanted != backend:
        image = " in an image that holds jax (Dockerfile VARIANT=jax-gpu)" if wanted == "jax" else ""
        raise ValueError(f"the pipeline trains under Keras backend {wanted!r} but this Trainer runs {backend!r}: "
                         f"KERAS_BACKEND={wanted} must be in the Trainer container's environment when it starts "
                         f"(the compiled spec sets it){image}")
    if backend != "jax":
        return config
    if config.get("strategy", "default") != "default" or cluster()["workers"] > 1:
        what = f"strategy {config['strategy']!r}" if config.get("strategy", "default") != "default" else \
            "a multi-worker TF_CONFIG"
        raise ValueError(f"{what} is TensorFlow's (tf.distribute): the Trainer runs KERAS_BACKEND=jax on one "
                         f"machine; use the default strategy or KERAS_BACKEND=tensorflow")
    if "jit_compile" not in config and not config.get("run_eagerly"):
        config = dict(config, jit_compile=True)
    return config


def run_fn(fn_args) -> None:
    from shaspec_tf.backends import backend, export_under_tensorflow, keep_tensorflow_off_accelerators
    from shaspec_tf.tasks import get_task
    from shaspec_tf.training.trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"task", "data", "out"}
    config = training_options(dict(fn_args.custom_config or {}), backend())
    task = get_task(config["task"])
    keep_tensorflow_off_accelerators()  # under JAX: tf.data input on the CPU, the GPU left to JAX
    result = train(TrainConfig(task=task.name, data=examples_folder(fn_args.train_files), out=fn_args.model_run_dir,
                               **{k: v for k, v in config.items() if k in fields}))
    if not result.get("chief", True):
        return  # another worker of a multi-worker Trainer (TF_CONFIG): the chief writes the model

    serving = fn_args.serving_model_dir.rstrip("/")
    model_dir = fileio.join(fileio.dirname(serving), SHASPEC_FORMAT)
    fileio.makedirs(model_dir)
    for name in _KEPT:
        source = fileio.join(fn_args.model_run_dir, name)
        if fileio.exists(source):
            fileio.copy(source, fileio.join(model_dir, name), overwrite=True)
    # The serving model dir is the SavedModel itself (the Pusher adds the version folder): export as version 1 of
    # a scratch base (beside it when it is local, renamed into place; else a local folder, uploaded).
    local = not fileio.is_uri(serving)
    scratch = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(serving) if local else None)
    try:
        # the exporter's sliding window: the task's inference settings (overlap: the config's, when it sets one)
        model_config = fileio.read_json(fileio.join(model_dir, "model_config.json"))
        window = {k: v for k, v in task.inference_options(model_config, overlap=config.get("overlap")).items()
                  if k in ("overlap", "sigma_scale")}
        # TensorFlow code: here under the TensorFlow backend, else (JAX) in a TensorFlow child process
        version = export_under_tensorflow(model_dir, scratch, "model", 1, **window)
        _unversion_manifest(version)
        fileio.remove_tree(serving)
        if local:
            os.rename(version, serving)
        else:
            fileio.upload_tree(version, serving)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
