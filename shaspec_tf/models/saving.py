"""One-file saving of ShaSpec models: a ``.keras`` archive (config, weights and, when compiled, the optimizer state).

    save_model(model, "runs/shaspec/model.keras")       # or save_model(model, "runs/shaspec"): the same file
    model = keras.saving.load_model("runs/shaspec/model.keras")      # once shaspec_tf.models is imported
    model = load_model("runs/shaspec")                                 # the same, with one-line errors

This sits beside the folder format of ``shaspec train`` (``model_config.json`` + ``model.weights.h5``, read by
:func:`shaspec_tf.trained.load_trained`), which stays as it is: old folders keep loading.
"""
from __future__ import annotations

import os

import keras

from shaspec_tf import fileio
from shaspec_tf.models.base import ShaSpecModel

KERAS_FILE = "model.keras"  # the archive's name inside a run folder

__all__ = ["KERAS_FILE", "keras_path", "load_model", "save_model"]


def keras_path(path: str) -> str:
    """``path`` itself when it names a ``.keras`` file, else ``path/model.keras`` (a run folder)."""
    path = os.fspath(path)
    return path if path.endswith(".keras") else fileio.join(path, KERAS_FILE)


def save_model(model: ShaSpecModel, path: str, include_optimizer: bool = True) -> str:
    """Write ``model`` as one ``.keras`` file, atomically (a reader sees the old file or the new one, never a part),
    and return its path. ``path`` is a ``.keras`` file or a folder (then ``model.keras`` inside it).

    ``path`` may be a URI (``gs://...``): the file is written locally and uploaded whole. ``keras.saving.load_model``
    reads it back as the same class with the same weights, and, when the model was
    compiled, compiled with the same optimizer state (``model.save``'s behaviour). ``include_optimizer=False``
    writes the model alone (a file for inference, without the optimizer's slots: SGD's momentum doubles the size);
    it loads uncompiled. :func:`load_model` reads either with one-line errors."""
    if not isinstance(model, ShaSpecModel):
        raise TypeError(f"save_model saves ShaSpec models, got {type(model).__name__}")
    target = keras_path(path)
    if not include_optimizer and getattr(model, "optimizer", None) is not None:
        bare = type(model).from_config(model.get_config())  # the same graph, never compiled
        bare.set_weights(model.get_weights())
        model = bare
    with fileio.atomic_path(target, suffix=".keras") as partial:
        model.save(partial)
    return target


def load_model(path: str, compile: bool = True) -> ShaSpecModel:
    """The model in a ``.keras`` file (or ``path/model.keras``) written by :func:`save_model` or ``model.save``;
    ``path`` may be a URI (``gs://...``: the file is downloaded first). A missing file is ``FileNotFoundError``; a
    file that is not a ShaSpec model archive is a ``ValueError`` naming it."""
    target = keras_path(path)
    if not fileio.isfile(target):
        raise FileNotFoundError(f"{target}: no such model file")
    try:
        with fileio.local_copy(target, suffix=".keras") as local:  # Keras reads the archive as a local zip file
            model = keras.saving.load_model(local, compile=compile)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{target}: not a readable ShaSpec model archive ({first})") from error
    if not isinstance(model, ShaSpecModel):
        raise ValueError(f"{target}: holds a {type(model).__name__}, not a ShaSpec model")
    return model
