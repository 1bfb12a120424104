"""Crash-safe training checkpoints: everything a resumed run needs to continue exactly as an uninterrupted one would.

Layout of a run's ``checkpoints/`` folder (the newest two are kept)::

    ckpt-000000200.npz     the newest (named by the optimiser step it was taken at)
    ckpt-000000100.npz     the one before

Each checkpoint is one NumPy ``.npz`` archive, written aside under a hidden ``.ckpt-....npz.partial-HOST-PID-RANDOM``
name and renamed into place (:func:`shaspec_tf.fileio.atomic_path`), so a kill at any instant leaves every earlier
checkpoint whole; the partial file of a killed process is removed by the next run. In a ``gs://`` run folder the
archive is written to a local temporary file and uploaded whole (an object appears only once its upload completed),
and read back through a local copy; pruning and the fallback to an older checkpoint work the same there. Zip members carry CRC-32s, and a
checkpoint is read back whole before anything is restored, so a truncated or bit-flipped file is detected, skipped
with a one-line notice, and the run resumes from the one before. Members:

``meta``
    JSON: ``format``, ``step``, ``epoch``, ``steps_per_epoch``, ``total_steps``, the run's options, the history
    (per-epoch logs) up to this step, the paths, shapes and dtypes of the variables below, and Python's and NumPy's
    global random states.
``model/NNNNN``
    every variable of the model, in ``model.variables`` order: weights, normalisation statistics, and the
    ``SeedGenerator`` states of dropout layers (which ``save_weights`` leaves out).
``optimizer/NNNNN``
    every optimiser variable (``iterations``, moments; the loss scale under fp16).
``rng/keras_global``, ``rng/numpy_key``
    Keras' global ``SeedGenerator`` state (when one exists) and NumPy's MT19937 key.

The tf.data pipelines are stateless functions of ``(seed, position)``, so the step alone puts them back where they
were (``start_step`` / ``skip``).

Test-only fault injection: ``SHASPEC_FAULT_KILL_DURING_CHECKPOINT=N`` makes the process SIGKILL itself while writing
its ``N``-th checkpoint (half the file written, not yet renamed); ``SHASPEC_FAULT_KILL_AFTER_CHECKPOINT=N`` right
after the ``N``-th checkpoint was renamed into place, before older ones are pruned and ``history.json`` is written.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from shaspec_tf import fileio

FORMAT = "shaspec-checkpoint/1"
KEEP = 2
_NAME = re.compile(r"^ckpt-(\d{9,})\.npz$")
LEGACY_WEIGHTS = "latest.weights.h5"          # keras.callbacks.BackupAndRestore's files (before this module)
LEGACY_METADATA = "training_metadata.json"
_saved_in_this_process = 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def checkpoint_path(folder: str, step: int) -> str:
    return fileio.join(folder, f"ckpt-{int(step):09d}.npz")


def list_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """``[(step, path)]`` of the checkpoints in ``folder``, newest first (partial files are not checkpoints)."""
    if not fileio.isdir(folder):
        return []
    found = []
    for name in fileio.listdir(folder):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), fileio.join(folder, name)))
    return sorted(found, reverse=True)


def clean_partials(folder: str) -> list:
    """Remove the partial files that dead processes left in ``folder`` (:func:`fileio.clean_stale` for each name that
    has one); a live process's partial files and anything else are left alone."""
    return fileio.clean_stale_in(folder)


# -- what is saved ---------------------------------------------------------------------------------------------
def _variables(model) -> Tuple[list, list]:
    optimizer = getattr(model, "optimizer", None)
    return list(model.variables), list(optimizer.variables) if optimizer is not None else []


def _value(variable) -> np.ndarray:
    return np.array(variable.numpy())


def _keras_global_seed_generator(create: bool = False):
    """Keras' global ``SeedGenerator`` (what ``keras.random`` ops draw from without a seed), if there is one."""
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
    except ImportError:  # a Keras without it: nothing to save
        return None
    generator = global_state.get_global_attribute("global_seed_generator")
    if generator is None and create:
        generator = seed_generator.global_seed_generator()
    return generator


def _describe(variables) -> list:
    return [[v.path, list(v.shape), str(v.dtype)] for v in variables]


def capture(model, step: int, epoch: int, extra: dict) -> Dict[str, np.ndarray]:
    """The arrays of a checkpoint of ``model`` (and its optimiser) at ``step``; ``extra`` goes into ``meta``."""
    model_vars, optimizer_vars = _variables(model)
    arrays = {f"model/{i:05d}": _value(v) for i, v in enumerate(model_vars)}
    arrays.update({f"optimizer/{i:05d}": _value(v) for i, v in enumerate(optimizer_vars)})
    generator = _keras_global_seed_generator()
    if generator is not None:
        arrays["rng/keras_global"] = _value(generator.state)
    np_state = np.random.get_state()
    arrays["rng/numpy_key"] = np.asarray(np_state[1])
    version, internal, gauss = random.getstate()
    meta = dict(extra, format=FORMAT, step=int(step), epoch=int(epoch), model_variables=_describe(model_vars),
                optimizer_variables=_describe(optimizer_vars),
                python_random=[version, list(internal), gauss],
                numpy_random=[np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])])
    arrays["meta"] = np.array(json.dumps(meta, default=list))
    return arrays


def _maybe_fault(kind: str) -> bool:
    wanted = os.environ.get(f"SHASPEC_FAULT_KILL_{kind}_CHECKPOINT")
    return bool(wanted) and wanted.strip().isdigit() and int(wanted) == _saved_in_this_process


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def save(folder: str, model, step: int, epoch: int, extra: dict, keep: int = KEEP) -> str:
    """Write the checkpoint of ``step`` aside and rename it into place; then prune to the newest ``keep`` (and drop
    any newer than ``step``: skipped ones of a run that went back to an older checkpoint)."""
    global _saved_in_this_process
    _saved_in_this_process += 1
    arrays = capture(model, step, epoch, extra)
    target = checkpoint_path(folder, step)
    fileio.makedirs(folder)
    with fileio.atomic_path(target, suffix=".npz") as tmp:  # a local file, also for a gs:// target
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            if _maybe_fault("DURING"):
                os.truncate(tmp, max(1, f.tell() // 2))
                _kill_self()
    if _maybe_fault("AFTER"):
        _kill_self()
    kept = 0
    for other_step, path in list_checkpoints(folder):
        if other_step > step or (other_step < step and kept >= keep - 1):
            fileio.remove(path)
        elif other_step < step:
            kept += 1
    for legacy in (LEGACY_WEIGHTS, LEGACY_METADATA):  # superseded by a checkpoint of our own
        for path in (fileio.join(folder, legacy), fileio.join(folder, legacy + ".bkp")):
            if fileio.exists(path):
                fileio.remove(path)
    return target


# -- reading and restoring -------------------------------------------------------------------------------------
def read(path: str) -> Dict[str, np.ndarray]:
    """Every array of the checkpoint at ``path``, read in full (zip CRCs checked); a one-line ``ValueError`` saying
    why when it is unreadable."""
    try:
        with fileio.local_copy(path, suffix=".npz") as local, np.load(local, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(str(arrays["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    except Exception as error:  # noqa: BLE001  zipfile, numpy and json raise assorted types for a damaged file
        raise ValueError(f"{path} is unreadable ({_first_line(error)})") from error
    arrays["meta"] = meta
    return arrays


def _check_fits(variables, described, kind: str) -> None:
    if len(variables) != len(described):
        raise ValueError(f"it holds {len(described)} {kind} variables, this model has {len(variables)}")
    for v, (path, shape, dtype) in zip(variables, described):
        if list(v.shape) != list(shape) or str(v.dtype) != dtype:
            raise ValueError(f"{kind} variable {path} is {dtype}{list(shape)} there, {v.dtype}{list(v.shape)} here")


def restore(model, arrays: dict) -> dict:
    """Put the state of a checkpoint (from :func:`read`) into ``model``, its optimiser (built) and the global random
    generators; returns its ``meta``. Everything is checked before anything is assigned."""
    meta = arrays["meta"]
    model_vars, optimizer_vars = _variables(model)
    _check_fits(model_vars, meta["model_variables"], "model")
    _check_fits(optimizer_vars, meta["optimizer_variables"], "optimizer")
    for i, v in enumerate(model_vars):
        v.assign(arrays[f"model/{i:05d}"])
    for i, v in enumerate(optimizer_vars):
        v.assign(arrays[f"optimizer/{i:05d}"])
    if "rng/keras_global" in arrays:
        _keras_global_seed_generator(create=True).state.assign(arrays["rng/keras_global"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy_random"]
    np.random.set_state((name, arrays["rng/numpy_key"], pos, has_gauss, cached))
    return meta


def restore_latest(folder: str, model, accept: Callable[[dict], None],
                   notice: Callable[[str], None] = print) -> Optional[dict]:
    """Restore the newest usable checkpoint in ``folder`` and return its ``meta`` (``None`` when there is none).

    ``accept(meta)`` raises ``ValueError`` for a checkpoint that does not belong to this run. A checkpoint that is
    unreadable, does not fit the model or is not accepted is skipped with a one-line ``notice`` naming it; when
    checkpoints exist and none is usable, a one-line ``ValueError``."""
    found = list_checkpoints(folder)
    skipped = []
    for _, path in found:
        try:
            arrays = read(path)
            accept(arrays["meta"])
            model_vars, optimizer_vars = _variables(model)
            try:
                _check_fits(model_vars, arrays["meta"]["model_variables"], "model")
                _check_fits(optimizer_vars, arrays["meta"]["optimizer_variables"], "optimizer")
            except ValueError as error:
                raise ValueError(f"{path} does not fit this model: {error}") from error
        except ValueError as error:
            skipped.append(str(error))
            continue
        meta = restore(model, arrays)
        for reason in skipped:
            notice(f"shaspec train: skipping a checkpoint: {reason}; resuming from {fileio.basename(path)}")
        return meta
    if found:
        raise ValueError(f"no usable checkpoint in {folder}: {'; '.join(skipped)}; move that folder away to start "
                         f"afresh")
    return None


def has_legacy(folder: str) -> bool:
    return fileio.exists(fileio.join(folder, LEGACY_METADATA)) or fileio.exists(
        fileio.join(folder, LEGACY_METADATA + ".bkp"))


def restore_legacy(folder: str, model, notice: Callable[[str], None] = print) -> int:
    """Restore a ``keras.callbacks.BackupAndRestore`` checkpoint (this project's format before checkpoints of its
    own; ``latest.weights.h5`` + ``training_metadata.json``, or their ``.bkp`` copies) and return the number of
    epochs it had completed. Its weights file holds no random-generator state, so such a resume is not bit-exact."""
    errors = []
    for suffix in ("", ".bkp"):
        weights = fileio.join(folder, LEGACY_WEIGHTS + suffix)
        meta = fileio.join(folder, LEGACY_METADATA + suffix)
        if not fileio.exists(meta):
            continue
        try:
            epoch = int(json.loads(fileio.read_text(meta))["epoch"])
            with fileio.local_copy(weights, suffix=".weights.h5") as local:  # Keras reads local files only
                model.load_weights(local)
        except Exception as error:  # noqa: BLE001  h5py / Keras / json raise assorted types for a damaged file
            errors.append(f"{fileio.basename(weights)}: {_first_line(error)}")
            continue
        notice(f"shaspec train: resuming from an old-format checkpoint ({fileio.basename(weights)}, epoch {epoch}; "
               f"it holds no dropout random state, so this resume is not bit-exact)"
               + "".join(f"; skipped {e}" for e in errors))
        return epoch
    raise ValueError(f"checkpoint in {folder} is unreadable ({'; '.join(errors)}); move that folder away to start "
                     f"afresh")


def _atomic_history(path: str, history: dict) -> None:
    fileio.atomic_write(path, json.dumps(history, indent=2) + "\n")


def make_callback(folder: str, history_path: str, steps_per_epoch: int, extra: dict, history: dict):
    """A Keras callback that, at the end of every epoch (``steps_per_epoch`` steps), appends the epoch's logs to the
    history, writes a checkpoint (holding the history), then ``history.json``."""
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history = {k: list(v) for k, v in history.items()}

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            save(folder, self.model, (epoch + 1) * steps_per_epoch, epoch + 1, dict(extra, history=self.history))
            _atomic_history(history_path, self.history)

    return Checkpoint()
