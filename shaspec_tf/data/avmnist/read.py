"""Readers: the TFRecord files of an AV-MNIST build (:func:`tfrecord_files`) and the published CentralNet
``.npy`` layout (:func:`read_published_avmnist`)."""
from __future__ import annotations

import io
import os

import numpy as np

from shaspec_tf import fileio
from shaspec_tf.data.avmnist.build import MANIFEST


def tfrecord_files(out_dir, split: str):
    """The TFRecord files of ``split`` in a build, in order (from its manifest)."""
    out_dir = os.fspath(out_dir)
    manifest = fileio.read_json(fileio.join(out_dir, MANIFEST))
    if split not in manifest["splits"]:
        raise KeyError(f"{out_dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
    return [fileio.join(out_dir, name) for name in manifest["splits"][split]["files"]]


PUBLISHED_LAYOUT = ("image/{split}_data.npy", "audio/{split}_data.npy", "{split}_labels.npy")


def read_published_avmnist(npy_dir, normalize: bool = True, splits=("train", "test")) -> dict:
    """Read the published AV-MNIST ``.npy`` layout (CentralNet's data as MultiBench's ``get_data.py`` loads it)::

        npy_dir/image/train_data.npy   [N, 784] or [N, 28, 28], 0..255 (PCA-degraded MNIST)
        npy_dir/audio/train_data.npy   [N, 112, 112] (or [N, 112 * 112]) spectrograms, 0..255
        npy_dir/train_labels.npy       [N] digits
        ... and the same with ``test``

    -> ``{split: {"image": float32 [N, 28, 28], "audio": float32 [N, H, W], "label": int64 [N]}}``, image and audio
    divided by 255 when ``normalize`` (as MultiBench does). This is the 70k CentralNet variant, *not* the SMIL
    variant ShaSpec used: its 112x112 audio does not fit ``schema.avmnist_example`` (20x20 MFCCs) as is.
    """
    root = os.fspath(npy_dir)
    if not fileio.isdir(root):
        raise FileNotFoundError(f"published AV-MNIST folder {root} does not exist")
    out = {}
    for split in splits:
        names = [pattern.format(split=split) for pattern in PUBLISHED_LAYOUT]
        missing = [name for name in names if not fileio.isfile(fileio.join(root, *name.split("/")))]
        if missing:
            raise FileNotFoundError(f"{root}: missing {missing} (expected layout: {', '.join(names)})")
        image, audio, label = (_load_npy(fileio.join(root, *name.split("/"))) for name in names)
        n = label.reshape(-1).shape[0]
        if image.shape[0] != n or audio.shape[0] != n:
            raise ValueError(f"{root}: {split} has {image.shape[0]} images, {audio.shape[0]} audios, {n} labels")
        if image[0].size != 28 * 28:
            raise ValueError(f"{root}: {split} images must hold 784 values each, got shape {image.shape}")
        image = image.reshape(n, 28, 28).astype(np.float32)
        if audio.ndim == 2:
            side = int(round(audio.shape[1] ** 0.5))
            if side * side != audio.shape[1]:
                raise ValueError(f"{root}: {split} flat audio of {audio.shape[1]} values is not square")
            audio = audio.reshape(n, side, side)
        audio = audio.astype(np.float32)
        if normalize:
            image /= 255.0
            audio /= 255.0
        out[split] = {"image": image, "audio": audio, "label": label.reshape(-1).astype(np.int64)}
    return out


def _load_npy(path: str) -> np.ndarray:
    """An ``.npy`` array from a local file or a URI (whose bytes are read first)."""
    if not fileio.is_uri(path):
        return np.load(path, allow_pickle=False)
    return np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False)
