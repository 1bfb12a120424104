"""Where the AV-MNIST inputs live and how they are read: the data folder (``SHASPEC_DATA``), FSDD WAVs
(:func:`load_wav`, :func:`find_recordings`) and the MNIST npz (:func:`load_mnist`).

Every path is a string that may be a URI (``SHASPEC_DATA=gs://bucket/avmnist``): folders are listed and files read
through :mod:`shaspec_tf.fileio`."""
from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from shaspec_tf import fileio

DEFAULT_SPEAKERS = ("jackson", "nicolas", "theo")
WAV_PATTERN = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")
DATA_HELP = ("get the data: FSDD with `git clone https://github.com/Jakobovski/free-spoken-digit-dataset` "
             "(its recordings/ folder) and MNIST from any source saved as an npz with `images` uint8 [N, 28, 28] "
             "and `labels`; put them at DIR/fsdd/recordings and DIR/mnist8k.npz and set SHASPEC_DATA=DIR")


# -- data location ----------------------------------------------------------------------------------------------------
def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))


def default_data_dir() -> Optional[str]:
    """Where the real data lives: ``$SHASPEC_DATA`` if set (returned as given, ``~`` expanded, checked by
    :func:`require_data_dir`; a URI is fine), else ``../shared/data`` next to the repository root if that folder
    exists, else ``None``."""
    env = os.environ.get("SHASPEC_DATA")
    if env:
        return env if fileio.is_uri(env) else os.path.expanduser(env)
    shared = os.path.join(os.path.dirname(_repo_root()), "shared", "data")
    return shared if fileio.isdir(shared) else None


def require_data_dir(data_dir: Union[str, "os.PathLike[str]", None] = None) -> str:
    """``data_dir`` (or :func:`default_data_dir`), checked to be a folder; otherwise a one-line
    ``FileNotFoundError`` saying how to get the data."""
    path = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if path is None:
        raise FileNotFoundError(f"no AV-MNIST data: SHASPEC_DATA is not set and no ../shared/data next to "
                                f"{_repo_root()}; {DATA_HELP}")
    if not fileio.isdir(path):
        raise FileNotFoundError(f"AV-MNIST data folder {path} does not exist; {DATA_HELP}")
    return path


def default_sources(data_dir: Union[str, "os.PathLike[str]", None] = None):
    """``(mnist_npz, fsdd_dir)`` under the data folder: ``DIR/mnist8k.npz`` and ``DIR/fsdd/recordings``."""
    root = require_data_dir(data_dir)
    return fileio.join(root, "mnist8k.npz"), fileio.join(root, "fsdd", "recordings")


# -- audio -------------------------------------------------------------------------------------------------------------
def _tf_error(exc: Exception) -> str:
    """A TensorFlow error message as one short line (without the ``{{function_node ...}}`` and ``[Op:...]`` noise)."""
    text = getattr(exc, "message", None) or str(exc)
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
    return " ".join(text.split()) or type(exc).__name__


def load_wav(path) -> tuple:
    """Read a WAV file -> ``(waveform, rate)``: float32 mono ``[samples]`` in [-1, 1] (channels averaged, as
    ``librosa.load(mono=True)``) and the sample rate in Hz.

    16-bit PCM (FSDD) is decoded by ``tf.audio.decode_wav``; other encodings (24/32-bit, float) fall back to
    ``tensorflow_io`` when installed. A missing, empty or corrupt file raises a one-line error naming it."""
    import tensorflow as tf

    path = os.fspath(path)
    if not fileio.isfile(path):
        raise FileNotFoundError(f"{path}: WAV file not found")
    contents = fileio.read_bytes(path)
    try:
        audio, rate = tf.audio.decode_wav(contents)
        wave, rate = audio.numpy(), int(rate.numpy())
    except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as exc:
        reason = _tf_error(exc)
        wave = _load_wav_tfio(path) if "16-bit" in reason else None
        if wave is None:
            raise ValueError(f"{path}: corrupt or unsupported WAV ({reason})") from None
        wave, rate = wave
    if wave.ndim != 2 or wave.shape[0] == 0:
        raise ValueError(f"{path}: WAV holds no samples")
    wave = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"{path}: WAV holds NaN or Inf samples")
    return np.ascontiguousarray(wave, dtype=np.float32), rate


def _load_wav_tfio(path):
    """Non-16-bit WAVs through tensorflow-io -> ``([samples, channels] float32 in [-1, 1], rate)`` or ``None``."""
    try:
        import tensorflow_io as tfio
    except ImportError:
        return None
    try:
        with fileio.local_copy(path, suffix=".wav") as local:
            reader = tfio.audio.AudioIOTensor(local)
            data, rate = reader.to_tensor().numpy(), int(reader.rate.numpy())
    except Exception:  # noqa: BLE001 - any failure means "cannot read": the caller names the file
        return None
    if data.dtype == np.int16:
        data = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        data = data.astype(np.float32) / 2147483648.0
    elif data.dtype.kind == "f":
        data = data.astype(np.float32)
    else:
        return None
    return data, rate


# -- inputs ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recording:
    digit: int
    speaker: str
    index: int
    path: str

    @property
    def stem(self) -> str:
        return f"{self.digit}_{self.speaker}_{self.index}"


def find_recordings(fsdd_dir, speakers: Optional[Sequence[str]] = DEFAULT_SPEAKERS):
    """FSDD WAVs ``{digit}_{speaker}_{index}.wav`` of ``speakers`` (``None``: all) in ``fsdd_dir``, sorted by digit,
    speaker and index. One-line errors for a missing folder, an unknown speaker or no matching WAV."""
    folder = os.fspath(fsdd_dir)
    if not fileio.isdir(folder):
        raise FileNotFoundError(f"FSDD recordings folder {folder} does not exist; {DATA_HELP}")
    found = []
    for name in fileio.listdir(folder):
        match = WAV_PATTERN.match(name)
        if match:
            found.append(Recording(int(match.group(1)), match.group(2), int(match.group(3)),
                                   fileio.join(folder, name)))
    available = sorted({r.speaker for r in found})
    if not found:
        raise FileNotFoundError(f"no FSDD WAVs named {{digit}}_{{speaker}}_{{index}}.wav in {folder}; {DATA_HELP}")
    if speakers is not None:
        missing = [s for s in speakers if s not in available]
        if missing:
            raise FileNotFoundError(f"no WAVs for speakers {missing} in {folder} (it has {available})")
        found = [r for r in found if r.speaker in set(speakers)]
    return sorted(found, key=lambda r: (r.digit, r.speaker, r.index))


def load_mnist(mnist_npz):
    """``(images uint8 [N, 28, 28], labels int64 [N])`` from an npz with ``images`` and ``labels``; one-line errors
    for a missing file or wrong arrays."""
    path = os.fspath(mnist_npz)
    if not fileio.isfile(path):
        raise FileNotFoundError(f"MNIST npz {path} does not exist; {DATA_HELP}")
    source = io.BytesIO(fileio.read_bytes(path))
    if not zipfile.is_zipfile(source):  # an .npy, a pickle or text under an .npz name, or a cut-off download
        raise ValueError(f"{path}: not an npz archive (a zip of .npy arrays: np.savez); a renamed .npy, another "
                         f"format, or a truncated file?")
    try:
        source.seek(0)
        with np.load(source, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"images", "labels"} <= keys:
                raise ValueError(f"{path}: expected arrays 'images' (uint8 [N, 28, 28]) and 'labels', "
                                 f"found {sorted(keys)}")
            images, labels = data["images"], data["labels"]
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable npz ({' '.join(str(exc).split())})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{path}: not a readable npz, truncated or corrupt? ({type(exc).__name__}: {reason})"
                         ) from None
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise ValueError(f"{path}: 'images' and 'labels' must be arrays")
    if images.ndim == 2 and images.shape[1] == 28 * 28:
        images = images.reshape(-1, 28, 28)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{path}: 'images' must be [N, 28, 28], got {images.shape}")
    if images.dtype != np.uint8:
        if images.dtype.kind not in "iu" or images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"{path}: 'images' must be uint8 0..255, got {images.dtype}")
        images = images.astype(np.uint8)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.dtype.kind not in "iu" or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: 'labels' must be integer digits 0..9")
    return images, labels.astype(np.int64)
