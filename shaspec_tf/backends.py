"""Which Keras backend runs what: training may run under ``KERAS_BACKEND=jax`` (the fast path, XLA), while the TF
Serving export is TensorFlow code (``tf.function`` signatures in :mod:`shaspec_tf.export`).

Keras fixes its backend per process, when it is first imported, so the export asked for by a process of another
backend runs in a child process under ``KERAS_BACKEND=tensorflow`` (:func:`export_under_tensorflow`): it reads the
model folder the parent wrote and writes the SavedModel, which the parent then moves into place. The model's layers are
backend-agnostic, so weights trained under JAX load unchanged under TensorFlow.

A JAX training process still uses TensorFlow for its input (``tf.data``; Keras' ``fit`` takes a ``tf.data.Dataset``
under every backend). :func:`keep_tensorflow_off_accelerators` keeps that TensorFlow on the CPU, so that it does not
take the GPU memory JAX allocates for itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

__all__ = ["backend", "export_under_tensorflow", "keep_tensorflow_off_accelerators", "child_environment"]

# The child: shaspec_tf.export.export_trained with the JSON keyword arguments of argv[1]; its result (the version
# folder) is written as JSON to argv[2].
_CHILD = """
import json, sys
import keras
if keras.backend.backend() != "tensorflow":
    raise SystemExit(f"the export process runs Keras on {keras.backend.backend()}, not tensorflow")
from shaspec_tf.export import export_trained
path = export_trained(**json.loads(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    json.dump(path, f)
"""


def backend() -> str:
    """The Keras backend of this process (``tensorflow``, ``jax``, ...); imports Keras (which fixes it)."""
    import keras

    return keras.backend.backend()


def keep_tensorflow_off_accelerators() -> bool:
    """Under a backend other than TensorFlow, hide the GPUs from TensorFlow (its ``tf.data`` input runs on the CPU
    anyway; once TensorFlow initialises a GPU it reserves most of its memory beside JAX's own pool). Returns whether
    TensorFlow now sees no GPU; ``False`` under TensorFlow, or when TensorFlow had already initialised its devices
    (nothing is changed then)."""
    if backend() == "tensorflow":
        return False
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # "Visible devices cannot be modified after being initialized"
        return False
    return True


def child_environment(environ=None) -> dict:
    """The environment of a TensorFlow child: the parent's, with ``KERAS_BACKEND=tensorflow``, no GPU (the parent's
    backend holds the accelerator; an export is traced on the CPU and runs anywhere) and the parent's import path
    first (so that it imports this very package, e.g. from a source checkout)."""
    env = dict(os.environ if environ is None else environ)
    env["KERAS_BACKEND"] = "tensorflow"
    env["CUDA_VISIBLE_DEVICES"] = ""
    paths = [os.path.abspath(p or os.curdir) for p in sys.path]
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if os.path.isdir(p)))
    return env


_PASSED_ON = {error.__name__: error for error in (ValueError, FileExistsError, FileNotFoundError)}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def export_under_tensorflow(model_dir: str, base: str, name: str, version=None, **options) -> str:
    """:func:`shaspec_tf.export.export_trained` (the TF Serving SavedModel ``base/name/version`` of the model that
    ``shaspec train`` saved in ``model_dir``; ``options``: ``overlap``, ``sigma_scale``) under the TensorFlow
    backend: in this process when it runs TensorFlow, else in a child process (:func:`child_environment`). Returns
    the version folder. The export's one-line errors (``ValueError``, ``FileExistsError``, ``FileNotFoundError``)
    come back with their type and message; any other failure of the child is a one-line ``RuntimeError`` ending
    with its last line (its exception), the tail of its log going to this process's stderr."""
    if backend() == "tensorflow":
        from shaspec_tf.export import export_trained

        return export_trained(model_dir, base, name, version, **options)
    arguments = dict(model_dir=model_dir, base=base, name=name, version=version, **options)
    handle, result_path = tempfile.mkstemp(prefix="shaspec-export-", suffix=".json")
    os.close(handle)
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(arguments), result_path],
                              env=child_environment(), capture_output=True, text=True)
        if done.returncode != 0:
            last = _last_line(done.stderr)
            kind, _, message = last.partition(": ")
            if kind in _PASSED_ON and message:  # the export's own one-line errors keep their type
                raise _PASSED_ON[kind](message)
            sys.stderr.write(done.stderr[-4000:])
            raise RuntimeError(f"the TF Serving export of {model_dir} (a TensorFlow child of this {backend()} "
                               f"process) failed with exit code {done.returncode}: {last}")
        with open(result_path) as f:
            return json.load(f)
    finally:
        os.remove(result_path)
