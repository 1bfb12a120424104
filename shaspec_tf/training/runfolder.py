"""A training run's folder (``shaspec train --out``): what it holds, read before anything is written, through the
file layer (a local folder or a ``gs://`` one).

A run folder is marked (``.shaspec-output.json``, kind ``train-run``) with the options that define the run (see
``RUN_DEFINING``): a re-run resumes only with the same ones; a folder that is not a run, or holds another one, is
refused with a one-line error naming why. Folders written before markers existed (``model_config.json`` +
``train_config.json``) are read as ``legacy`` runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from shaspec_tf import fileio

RUN_KIND = "train-run"

# The options that define what a run computes: a re-run into the same folder resumes only when these are equal
# (``out``, ``jit_compile``, ``run_eagerly``, ``strategy`` and ``deterministic`` say how it runs, not what).
RUN_DEFINING = ("task", "data", "preset", "variant", "model_options", "steps", "epochs", "checkpoint_every",
                "batch_size", "crop_size", "regime", "subset", "warmup_steps", "ramp_steps", "drop_rate",
                "learning_rate", "schedule", "optimizer", "weight_decay", "mixed_precision", "audio_rate", "seed")
# Run-defining options added later: part of the options only when set, so that older run folders still resume.
RUN_DEFINING_WHEN_SET = ("drop_probs",)

# What a run writes before its first checkpoint
_NEVER_CHECKPOINTED_ENTRIES = {"model_config.json", "train_config.json", "tensorboard", "checkpoints", "history.json"}
# Names of files being written (or left by killed writers): not part of what a folder holds
_IN_FLIGHT = (".partial-", ".old-")


def run_options(config) -> dict:
    """The run-defining options of a resolved config (a ``TrainConfig`` or the dict of a ``train_config.json``), as
    JSON values (a local ``data`` path made absolute)."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    options = {key: values.get(key) for key in RUN_DEFINING}
    options.update({key: values[key] for key in RUN_DEFINING_WHEN_SET if values.get(key) is not None})
    data = str(options["data"])
    options["data"] = data if fileio.is_uri(data) else os.path.abspath(data)
    return json.loads(json.dumps(options, default=list))


def notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_json(path: str):
    """``fileio.read_json`` with an unreadable file as a one-line ``ValueError``."""
    try:
        return fileio.read_json(path)
    except OSError as error:
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {str(error).splitlines()[0]})") from error


def _differences(saved: dict, here: dict) -> list:
    return [f"{key} {saved.get(key)!r} there, {here.get(key)!r} here"
            for key in sorted(set(saved) | set(here)) if saved.get(key) != here.get(key)]


def inspect(out: str, options: dict, writable: bool = True) -> dict:
    """What ``out`` is: ``{"state": "fresh" | "run" | "legacy" | "complete", "marker": ...}``. Refuses (one-line
    ``ValueError`` / ``FileExistsError``) a folder that is not a training run, or a run with other run-defining
    options, naming them. With ``writable`` it removes the partial files of dead processes first, and the leftovers of
    a run of ours that never reached a checkpoint when the options differ (it starts afresh); without, it only reads
    (a multi-worker run's other workers: the chief alone writes)."""
    from shaspec_tf.training.checkpoint import clean_partials

    if not fileio.lexists(out):
        return {"state": "fresh"}
    if not fileio.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if writable:
        clean_partials(out)  # only the partial files of dead processes (ours by their names)
    if not [name for name in fileio.listdir(out) if not any(mark in name for mark in _IN_FLIGHT)]:
        return {"state": "fresh"}
    marker = fileio.read_marker(out)
    if marker is None:
        legacy = [fileio.join(out, name) for name in ("model_config.json", "train_config.json")]
        if not all(fileio.isfile(path) for path in legacy):
            raise FileExistsError(f"{out} is not empty and is not a shaspec training run (no {fileio.MARKER}); "
                                  f"choose another --out or empty that folder")
        saved = run_options(read_json(legacy[1]))
        state = "legacy"
    else:
        if marker.get("kind") != RUN_KIND:
            raise FileExistsError(f"{out} holds a shaspec {marker.get('kind')!r} output, not a training run; choose "
                                  f"another --out")
        saved = marker.get("run") or {}
        state = "complete" if marker.get("state") == "complete" and fileio.isfile(
            fileio.join(out, "model.weights.h5")) else "run"
    differing = _differences(saved, options)
    if differing and state == "run" and never_checkpointed(out):
        # A run of ours that failed before its first checkpoint holds nothing worth keeping (its configs and an
        # empty TensorBoard log): let the corrected command start it afresh rather than refuse it.
        if writable:
            notice(f"shaspec train: {out} holds a run that never reached a checkpoint ({'; '.join(differing)}); "
                   f"starting it afresh with these options")
            fileio.remove_tree(fileio.join(out, "tensorboard"))
        return {"state": "fresh"}
    if differing:
        raise ValueError(f"{out} holds a training run with other options ({'; '.join(differing)}); use another --out, "
                         f"or the same options to resume it")
    return {"state": state, "marker": marker}


def never_checkpointed(out: str) -> bool:
    """Whether the run folder ``out`` holds nothing but what a run writes before its first checkpoint."""
    checkpoints = fileio.join(out, "checkpoints")
    names = {name for name in fileio.listdir(out) if not any(mark in name for mark in _IN_FLIGHT)}
    return (names - {fileio.MARKER} <= _NEVER_CHECKPOINTED_ENTRIES
            and not (fileio.isdir(checkpoints) and fileio.listdir(checkpoints))
            and not fileio.exists(fileio.join(out, "model.weights.h5")))


def check_model_config(out: str, model_config: dict) -> None:
    """A one-line ``ValueError`` when ``out`` holds the configuration of another model."""
    saved_path = fileio.join(out, "model_config.json")
    if not fileio.exists(saved_path):
        return
    saved = read_json(saved_path)
    if json.loads(json.dumps(model_config)) != saved:
        differing = sorted(k for k in set(saved) | set(model_config)
                           if json.dumps(saved.get(k)) != json.dumps(model_config.get(k)))
        raise ValueError(f"{out} holds a different model (preset {saved.get('preset')!r}, differing options "
                         f"{differing}); use another --out or the same model options")
