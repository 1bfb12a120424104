"""``shaspec train``: ShaSpec training on prepared TFRecords, with exact resume.

    shaspec train --task brats|avmnist --data DIR --out DIR [--preset P] [--steps N | --epochs N]
                  [--regime non-dedicated|dedicated --subset flair+t1ce] [--audio-rate R] [--deterministic]

Output folder (a run, marked by ``.shaspec-output.json`` of kind ``train-run`` holding the options that define it):
``model_config.json`` (the model's configuration), ``train_config.json``, ``model.weights.h5`` (final weights),
``checkpoints/`` (model, optimiser, step, history and every random state, written every ``--checkpoint-every`` steps,
the newest two kept; see :mod:`shaspec_tf.training.checkpoint`), ``tensorboard/``, ``history.json`` and
``learning_curves.png``. Every file is written aside and renamed into place.

A re-run of the same command resumes from the newest readable checkpoint and draws exactly the batches, dropout masks
and updates an uninterrupted run would have (bit-identical with ``--deterministic``, which turns on TensorFlow's
deterministic ops); a finished run is reported as complete. A folder holding a run with other options, or anything
that is not a run, is refused with a one-line error naming why.

``--data`` and ``--out`` may be ``gs://`` URIs: every file goes through :mod:`shaspec_tf.fileio` (what Keras or
matplotlib must write as a local file is written aside and uploaded whole; TensorBoard writes ``gs://`` itself).
Under a multi-worker ``TF_CONFIG`` (Vertex AI) the workers train one model together and only the chief writes the
run folder (:mod:`shaspec_tf.training.distribute`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

from shaspec_tf import fileio
from shaspec_tf.taskspec.registry import get_task
from shaspec_tf.training import runfolder
from shaspec_tf.training.distribute import STRATEGIES
from shaspec_tf.training.runfolder import RUN_DEFINING, RUN_KIND, run_options  # noqa: F401  (this module's API)
from shaspec_tf.training.runfolder import notice as _notice

POLICIES = {"off": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
CHOICES = {"variant": ("shaspec", "baseline", "concat"), "regime": ("non-dedicated", "dedicated"),
           "schedule": ("poly", "cosine", "constant"), "optimizer": ("sgd", "adam"),
           "mixed_precision": tuple(POLICIES), "strategy": STRATEGIES}


@dataclass
class TrainConfig:
    """Every option of a training run, under the names the CLI, the pipeline's ``TaskConfig`` and the TFX Trainer
    use. ``None`` options take the task's defaults (:class:`shaspec_tf.tasks.TrainDefaults`: preset, batch size,
    optimiser, learning rate, weight decay, drop rate); every other default is written here, once."""

    task: str
    data: str
    out: str
    preset: Optional[str] = None
    variant: str = "shaspec"
    steps: Optional[int] = None
    epochs: Optional[int] = None
    checkpoint_every: int = 100
    batch_size: Optional[int] = None
    crop_size: Optional[Sequence[int]] = None
    regime: str = "non-dedicated"
    subset: Optional[str] = None
    warmup_steps: int = 0
    ramp_steps: int = 0
    drop_rate: Optional[float] = None
    drop_probs: Optional[dict] = None   # modality -> probability of leaving it out (independent; replaces drop_rate)
    learning_rate: Optional[float] = None
    schedule: str = "poly"
    optimizer: Optional[str] = None
    weight_decay: Optional[float] = None
    mixed_precision: str = "off"
    jit_compile: bool = False
    run_eagerly: bool = False
    strategy: str = "default"
    audio_rate: Optional[float] = None
    seed: int = 0
    model_options: dict = field(default_factory=dict)
    deterministic: bool = False     # tf.config.experimental.enable_op_determinism() (bf16: no oneDNN, if unset)

    def resolved(self) -> "TrainConfig":
        """The configuration with the task's defaults filled in; a one-line ``ValueError`` for any bad value."""
        task = get_task(self.task)
        values = task.fill_defaults(asdict(self))
        values["task"] = task.name
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        for key, choices in CHOICES.items():
            if values[key] not in choices:
                raise ValueError(f"unknown {key.replace('_', ' ')} {values[key]!r}: expected one of "
                                 f"{', '.join(choices)}")
        for key, minimum in (("steps", 1), ("epochs", 1), ("checkpoint_every", 1), ("batch_size", 1),
                             ("warmup_steps", 0), ("ramp_steps", 0), ("seed", 0)):
            value = values[key]
            if value is None and key in ("steps", "epochs"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{key.replace('_', ' ')} must be an integer >= {minimum}, got {value!r}")
        if values["seed"] >= 2 ** 32:
            raise ValueError(f"seed must be below 2**32, got {values['seed']}")
        for key, low, high, open_low in (("drop_rate", 0.0, 1.0, False), ("audio_rate", 0.0, 1.0, False),
                                         ("learning_rate", 0.0, math.inf, True), ("weight_decay", 0.0, math.inf,
                                                                                  False)):
            value = values[key]
            if value is None and key == "audio_rate":
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                low < value if open_low else low <= value) and value <= high
            if not ok:
                bounds = f"in ({low:g}, {high:g}]" if open_low and high < math.inf else \
                    f"> {low:g}" if open_low else f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
                raise ValueError(f"{key.replace('_', ' ')} must be a finite number {bounds}, got {value!r}")
        crop = values["crop_size"]
        if crop is not None:
            crop = tuple(crop) if isinstance(crop, (list, tuple)) else crop
            if not isinstance(crop, tuple) or len(crop) != 3 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in crop):
                raise ValueError(f"crop size must be three positive integers D,H,W, got {values['crop_size']!r}")
            values["crop_size"] = crop
        if values["drop_probs"] is not None:
            values["drop_probs"] = _check_drop_probs(values["drop_probs"], task.modalities)
        if not isinstance(values["model_options"], dict):
            raise ValueError(f"model options must be a mapping, got {type(values['model_options']).__name__}")
        if self.regime == "dedicated" and not self.subset:
            raise ValueError("dedicated training needs --subset (the modalities available, e.g. flair+t1ce)")
        return TrainConfig(**values)


def _check_drop_probs(probs, modalities) -> dict:
    """``{modality: p}`` (or one number per modality, in order) -> every modality's probability, a one-line
    ``ValueError`` for unknown names or values outside [0, 1]."""
    if isinstance(probs, (list, tuple)):
        if len(probs) != len(modalities):
            raise ValueError(f"drop probabilities {list(probs)} must give one per modality {list(modalities)}")
        probs = dict(zip(modalities, probs))
    if not isinstance(probs, dict):
        raise ValueError(f"drop probabilities must map modalities to numbers, got {probs!r}")
    unknown = sorted(set(probs) - set(modalities))
    if unknown:
        raise ValueError(f"drop probabilities name unknown modalities {unknown}; modalities are {list(modalities)}")
    checked = {}
    for name in modalities:
        value = probs.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"drop probability of {name} must be a number in [0, 1], got {value!r}")
        checked[name] = float(value)
    return checked


class OptionDefaults(dict):
    """``OptionDefaults()["checkpoint_every"]``: :class:`TrainConfig`'s default of a field;
    ``["task_preset"]``: every task's default of an option, ``"small for brats, avmnist for avmnist"`` (the
    ``shaspec train`` help shows them)."""

    def __missing__(self, key):
        from shaspec_tf.taskspec.registry import all_tasks

        if key.startswith("task_"):
            values = [(t.name, t.train_defaults.as_dict()[key[5:]]) for t in all_tasks()]
            return ", ".join(f"{v:g} for {n}" if isinstance(v, float) else f"{v} for {n}" for n, v in values)
        return next(f.default for f in fields(TrainConfig) if f.name == key)


def _records(data: str, task: str, split: str) -> list:
    from shaspec_tf.data.files import split_files

    return split_files(data, split, task)


def _no_records(data: str, files) -> ValueError:
    return ValueError(f"the train split of {data} has no records ({len(files)} file(s), e.g. {files[0]}): run "
                      f"'shaspec prepare' again")


def _count_records(data: str, files) -> int:
    """Every record of ``files`` read (a corrupt one is a one-line error naming its file and index)."""
    from shaspec_tf.data.files import check_records

    count = check_records(files)
    if not count:
        raise _no_records(data, files)
    return count


def _require_a_record(data: str, files) -> None:
    """At least one record in the split (a BraTS split can be large: only the first record is read)."""
    from shaspec_tf.data.files import check_records, record_dataset

    try:
        found = any(True for _ in record_dataset(files).take(1))
    except Exception as error:  # noqa: BLE001  tf.errors.DataLossError and kin: name the file
        if type(error).__name__ in _DATA_ERRORS:
            check_records(files)
        raise
    if not found:
        raise _no_records(data, files)


_DATA_ERRORS = ("DataLossError", "InvalidArgumentError")


def _data_error(files, error) -> ValueError:
    """A one-line error for a failure while reading the records: the corrupt file and record when it is one."""
    from shaspec_tf.data.files import check_records

    try:
        check_records(files)
    except ValueError as found:
        return found
    text = str(error).strip().splitlines()
    return ValueError(f"reading the training records failed ({type(error).__name__}: {text[0] if text else ''})")


def train(config: TrainConfig, callbacks=()) -> dict:
    """Train (or resume) and return ``{"history", "steps", "out", "resumed_from_step", "complete", "chief"}``
    (``complete``: the run had already finished, and nothing was trained; ``chief``: this process wrote the run
    folder, false on the other workers of a multi-worker cluster, see :mod:`shaspec_tf.training.distribute`). The
    mixed-precision policy applies for the duration of the call and is restored afterwards."""
    from shaspec_tf.compile_cache import enable_compile_cache
    from shaspec_tf.training.distribute import cluster

    c = config.resolved()
    enable_compile_cache()   # before anything compiles: a second run (or a resumed one) loads what the first compiled
    if c.deterministic and c.mixed_precision == "bf16" and "tensorflow" not in sys.modules:
        # oneDNN's bf16 CPU kernels are not reproducible (TF 2.16; see the README). Its float32 ones were in every
        # resume checked, and without oneDNN a 3D training step on a CPU is 8 (eager) to 50 (graph) times slower.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    options = run_options(c)
    chief = cluster()["chief"]
    found = runfolder.inspect(c.out, options, writable=chief)
    if found["state"] == "complete":
        history_path = fileio.join(c.out, "history.json")
        history = runfolder.read_json(history_path) if fileio.exists(history_path) else {}
        steps = int(found["marker"].get("steps", 0))
        _notice(f"shaspec train: {c.out} is a finished run of these options ({steps} steps); nothing to do")
        return {"history": history, "steps": steps, "out": c.out, "resumed_from_step": steps, "complete": True,
                "chief": chief}

    import keras

    previous = keras.mixed_precision.global_policy()
    if POLICIES[c.mixed_precision]:
        keras.mixed_precision.set_global_policy(POLICIES[c.mixed_precision])
    try:
        if chief:
            return _train(c, found, options, callbacks, c.out)
        import tempfile  # another worker of a cluster: the same steps, its writes into a folder of its own

        private = tempfile.mkdtemp(prefix="shaspec-worker-")
        try:
            return dict(_train(c, found, options, callbacks, private), out=c.out, chief=False)
        finally:
            fileio.remove_tree(private)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _train(c: TrainConfig, found: dict, options: dict, callbacks, out: str) -> dict:
    """Train ``c`` from the state ``found`` in its run folder ``c.out`` (checkpoints are read there), writing into
    ``out`` (the run folder itself, or a multi-worker run's private folder on the other workers)."""
    import keras
    import tensorflow as tf

    from shaspec_tf.backends import keep_tensorflow_off_accelerators
    from shaspec_tf.data.input import ModalityDropout
    from shaspec_tf.training import checkpoint, distribute
    from shaspec_tf.training.schedules import make_optimizer, make_schedule

    keep_tensorflow_off_accelerators()  # under JAX, TensorFlow only feeds tf.data: the GPU memory stays JAX's
    if c.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(c.seed)
    # -- everything about the input is checked before the folder is touched ----------------------------------------
    task = get_task(c.task)
    train_files = _records(c.data, c.task, task.train_split)
    strategy = distribute.make_strategy(c.strategy, notice=_notice)
    multi_worker = distribute.cluster()["workers"] > 1
    with strategy.scope():
        model = task.build_model(c.preset, variant=c.variant, **c.model_options)
    model_config = dict(model.shaspec_config)
    subset = task.subset_mask(c.subset) if c.regime == "dedicated" else None
    if task.one_pass_epochs:    # an epoch: one pass over the records, in checkpoints of at most checkpoint_every
        per_epoch = math.ceil(_count_records(c.data, train_files) / c.batch_size)
        total = c.steps if c.steps else c.epochs * per_epoch
        steps_per_epoch = min(c.checkpoint_every, per_epoch, total)
    else:                       # an endless stream of random crops: an epoch is checkpoint_every steps
        _require_a_record(c.data, train_files)
        steps_per_epoch = min(c.checkpoint_every, c.steps) if c.steps else c.checkpoint_every
        total = c.steps if c.steps else c.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    total = epochs * steps_per_epoch
    marker = found.get("marker") or {}
    if marker.get("steps_per_epoch") not in (None, steps_per_epoch) or marker.get("steps") not in (None, total):
        raise ValueError(f"{c.out} holds a run of {marker.get('steps')} steps in checkpoints of "
                         f"{marker.get('steps_per_epoch')}, these options now make {total} in checkpoints of "
                         f"{steps_per_epoch} (did the data change?); use another --out")
    if found["state"] != "fresh":
        runfolder.check_model_config(c.out, model_config)

    # -- the run folder ---------------------------------------------------------------------------------------------
    fileio.makedirs(out)
    checkpoints = fileio.join(c.out, "checkpoints")       # where this run's checkpoints are read
    written = fileio.join(out, "checkpoints")             # and written (the same, but on a non-chief worker)
    run_marker = dict(run=options, state="running", steps=total, steps_per_epoch=steps_per_epoch)
    if out != c.out or found["state"] != "run" or marker.get("state") != "running":
        fileio.write_marker(out, RUN_KIND, files=fileio.list_files(out), **run_marker)
    checkpoint.clean_partials(out)
    checkpoint.clean_partials(written)
    if found["state"] == "fresh" or not fileio.exists(fileio.join(out, "train_config.json")):
        fileio.atomic_write(fileio.join(out, "model_config.json"),
                            json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        fileio.atomic_write(fileio.join(out, "train_config.json"),
                            json.dumps(asdict(c), indent=2, default=list) + "\n")

    with strategy.scope():
        optimizer = make_optimizer(c.optimizer, make_schedule(c.schedule, c.learning_rate, total), c.weight_decay)
        model.compile(optimizer=optimizer, jit_compile=c.jit_compile, run_eagerly=c.run_eagerly)
        model.optimizer.build(model.trainable_variables)  # its variables exist before a checkpoint is restored

        def accept(meta):
            if meta.get("run") != options or meta.get("steps_per_epoch") != steps_per_epoch or \
                    meta["step"] % steps_per_epoch or not 0 < meta["step"] <= total:
                raise ValueError(f"checkpoint of step {meta.get('step')} belongs to another run")

        meta = checkpoint.restore_latest(checkpoints, model, accept, notice=_notice)
        history = {}
        if meta is not None:
            start_epoch, history = meta["epoch"], meta.get("history", {})
        elif checkpoint.has_legacy(checkpoints):
            start_epoch = checkpoint.restore_legacy(checkpoints, model, notice=_notice)
            if not 0 <= start_epoch <= epochs:
                raise ValueError(f"the old-format checkpoint in {checkpoints} is at epoch {start_epoch} of {epochs}")
            history_path = fileio.join(c.out, "history.json")
            if fileio.exists(history_path):
                history = {k: v[:start_epoch] for k, v in runfolder.read_json(history_path).items()}
        else:
            start_epoch = 0
    start_step = start_epoch * steps_per_epoch
    if multi_worker:  # every worker must resume from the same step (and all have read the folder by now)
        distribute.check_same_everywhere(strategy, start_step, f"the step to resume {c.out} from")
    if distribute.replicas(strategy) > 1:
        distribute.scale_loss_per_replica(model, distribute.replicas(strategy))

    probs = None if c.drop_probs is None else [c.drop_probs[name] for name in task.modalities]
    dropout = ModalityDropout(rate=c.drop_rate, warmup_steps=c.warmup_steps, ramp_steps=c.ramp_steps, subset=subset,
                              probs=probs)

    def dataset():
        return task.train_dataset(train_files, c, dropout, start_step, model_config)

    data = dataset() if c.strategy == "default" and not multi_worker else distribute.distributable(dataset)
    saver = checkpoint.make_callback(written, fileio.join(out, "history.json"), steps_per_epoch,
                                     dict(run=options, steps_per_epoch=steps_per_epoch, total_steps=total), history)
    all_callbacks = [saver, keras.callbacks.TensorBoard(fileio.join(out, "tensorboard"), update_freq="epoch"),
                     *callbacks]
    try:
        model.fit(data, epochs=epochs, initial_epoch=start_epoch, steps_per_epoch=steps_per_epoch,
                  callbacks=all_callbacks, verbose=1 if os.isatty(1) else 2)
    except tf.errors.OpError as error:
        if type(error).__name__ not in _DATA_ERRORS or (type(error).__name__ == "InvalidArgumentError" and
                                                        "IteratorGetNext" not in str(error)):
            raise
        raise _data_error(train_files, error) from None
    with fileio.atomic_path(fileio.join(out, "model.weights.h5"), suffix=".weights.h5") as tmp:
        model.save_weights(tmp)  # Keras writes local files: for gs:// a local file, uploaded whole
    from shaspec_tf.models.saving import save_model

    save_model(model, fileio.join(out, "model.keras"), include_optimizer=False)  # the same model as one file
    fileio.atomic_write(fileio.join(out, "history.json"), json.dumps(saver.history, indent=2) + "\n")
    _plot_learning_curves(saver.history, steps_per_epoch, fileio.join(out, "learning_curves.png"))
    fileio.write_marker(out, RUN_KIND, **dict(run_marker, state="complete"))
    return {"history": saver.history, "steps": total, "out": out, "resumed_from_step": start_step,
            "complete": False, "chief": True}


def _plot_learning_curves(history: dict, steps_per_epoch: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "task_loss", "alignment_loss", "domain_loss") if history.get(k)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [(i + 1) * steps_per_epoch for i in range(len(history[key]))]
        ax.plot(steps, history[key], marker="o")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
