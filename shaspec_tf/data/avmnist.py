"""AV-MNIST as ShaSpec used it: the SMIL protocol (github.com/mengmenm/SMIL), rebuilt from real MNIST digits and Free
Spoken Digit Dataset (FSDD) recordings, written as sharded TFRecords in the ``schema.avmnist_example`` contract.

The SMIL protocol (paper digest, section 6):

* every FSDD recording of the chosen speakers (SMIL: jackson, nicolas, theo) is one sample; its label is the spoken
  digit, and it is paired with an MNIST image of the same digit (pairing by label only);
* the split is by recording index: SMIL tests on takes 0-14 and trains on 15-49. Takes 0-4 are held back in this
  workspace, so the defaults are test 5-14 (300 samples) and train 15-49 (1050 samples, as SMIL);
* audio: ``librosa.load(sr=None)`` -> ``wave[::3]`` -> ``librosa.feature.mfcc(sr=8000, n_mfcc=20)`` -> zero-pad the
  time axis to 20 frames (:func:`mfcc` does this with TensorFlow ops);
* missing audio (ShaSpec Table 3): all training images are kept, audio only for a fraction ``audio_rate`` of the
  training samples of each class; evaluation samples keep both modalities.

Differences from SMIL, on purpose or forced: MNIST images come from one npz (``images`` uint8 ``[N, 28, 28]``,
``labels``), drawn by a seeded shuffle per digit (SMIL takes the first/last rows of its class folders); the image is
stored in [0, 1] (SMIL's ``Normalize(0.5, 0.5)`` is left to the input pipeline); MFCCs follow librosa's recipe but
not its numbers (see :func:`mfcc`).

Output of :func:`build_avmnist` (``out_dir``)::

    train-00000-of-0000N.tfrecord ...   # schema.avmnist_example records; train order shuffled by the seed
    test-00000-of-0000N.tfrecord ...    # test in sorted order (digit, speaker, index)
    manifest.json                       # counts, audio availability, parameters, sources, and mnist_rows:
                                        # {sample_id: row of the MNIST npz paired with that recording}
    .shaspec-output.json                # ownership marker (shaspec_tf.fileio): kind "avmnist-records", files

Sample ids are ``"{split}/{digit}_{speaker}_{index}"``, e.g. ``"train/3_theo_17"`` (the WAV's stem).

Only :func:`mfcc`'s resampling path (a WAV not at 8 kHz) needs ``tensorflow-io`` (the ``pipeline`` extra).
Command line: ``python -m shaspec_tf.data.avmnist OUT_DIR [--audio-rate 0.1] [--seed 0] ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from shaspec_tf import fileio
from shaspec_tf.data import schema

# -- MFCC parameters (SMIL's librosa call with librosa's defaults) ----------------------------------------------------
TARGET_RATE = 8000        # FSDD's rate; other rates are resampled to it
DECIMATION = 3            # SMIL keeps every 3rd sample (``wave[::3]``) and still calls librosa with sr=8000
N_FFT = 2048              # librosa.stft defaults: n_fft 2048, hop 512, periodic Hann, centred with reflect padding
HOP_LENGTH = 512
N_MELS = 128              # librosa.feature.melspectrogram default; fmin 0, fmax sr / 2
N_MFCC = 20
N_FRAMES = 20             # SMIL zero-pads (here: pads or truncates) the time axis to 20 frames
TOP_DB = 80.0             # librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=80)
AMIN = 1e-10

DEFAULT_SPEAKERS = ("jackson", "nicolas", "theo")
MANIFEST = "manifest.json"
#: The ownership marker's kind (:mod:`shaspec_tf.fileio`) of a :func:`build_avmnist` output.
KIND = "avmnist-records"
WAV_PATTERN = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")
DATA_HELP = ("get the data: FSDD with `git clone https://github.com/Jakobovski/free-spoken-digit-dataset` "
             "(its recordings/ folder) and MNIST from any source saved as an npz with `images` uint8 [N, 28, 28] "
             "and `labels`; put them at DIR/fsdd/recordings and DIR/mnist8k.npz and set SHASPEC_DATA=DIR")


# -- data location ----------------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Optional[Path]:
    """Where the real data lives: ``$SHASPEC_DATA`` if set (returned as given, checked by :func:`require_data_dir`),
    else ``../shared/data`` next to the repository root if that folder exists, else ``None``."""
    env = os.environ.get("SHASPEC_DATA")
    if env:
        return Path(env).expanduser()
    shared = _repo_root().parent / "shared" / "data"
    return shared if shared.is_dir() else None


def require_data_dir(data_dir: Union[str, Path, None] = None) -> Path:
    """``data_dir`` (or :func:`default_data_dir`), checked to be a folder; otherwise a one-line
    ``FileNotFoundError`` saying how to get the data."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if path is None:
        raise FileNotFoundError(f"no AV-MNIST data: SHASPEC_DATA is not set and no ../shared/data next to "
                                f"{_repo_root()}; {DATA_HELP}")
    if not path.is_dir():
        raise FileNotFoundError(f"AV-MNIST data folder {path} does not exist; {DATA_HELP}")
    return path


def default_sources(data_dir: Union[str, Path, None] = None):
    """``(mnist_npz, fsdd_dir)`` under the data folder: ``DIR/mnist8k.npz`` and ``DIR/fsdd/recordings``."""
    root = require_data_dir(data_dir)
    return root / "mnist8k.npz", root / "fsdd" / "recordings"


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

    path = str(path)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: WAV file not found")
    with tf.io.gfile.GFile(path, "rb") as fh:
        contents = fh.read()
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
        reader = tfio.audio.AudioIOTensor(path)
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


def _reflect_indices(n, pad):
    """Gather indices that pad a length-``n`` signal by ``pad`` on each side like ``np.pad(mode="reflect")``,
    also when ``pad >= n`` (short clips: numpy, and so librosa, keeps reflecting)."""
    import tensorflow as tf

    period = tf.maximum(2 * (n - 1), 1)
    i = tf.math.floormod(tf.range(-pad, n + pad), period)
    return tf.where(i >= n, period - i, i)


def _mfcc_8k(wave):
    """The MFCC graph for a mono float32 waveform at 8 kHz (see :func:`mfcc`)."""
    import tensorflow as tf

    wave = tf.reshape(tf.cast(wave, tf.float32), [-1])
    tf.debugging.assert_positive(tf.size(wave), message="mfcc: empty waveform")
    wave = wave[::DECIMATION]
    n = tf.size(wave)
    padded = tf.gather(wave, _reflect_indices(n, N_FFT // 2))                     # center=True, pad_mode="reflect"
    spec = tf.signal.stft(padded, frame_length=N_FFT, frame_step=HOP_LENGTH, fft_length=N_FFT,
                          window_fn=tf.signal.hann_window, pad_end=False)        # [frames, 1025]
    power = tf.square(tf.abs(spec))
    weights = tf.signal.linear_to_mel_weight_matrix(num_mel_bins=N_MELS, num_spectrogram_bins=N_FFT // 2 + 1,
                                                    sample_rate=TARGET_RATE, lower_edge_hertz=0.0,
                                                    upper_edge_hertz=TARGET_RATE / 2)
    mel = tf.matmul(power, weights)                                              # [frames, 128]
    db = 10.0 * tf.math.log(tf.maximum(mel, AMIN)) / tf.math.log(10.0)           # power_to_db, ref 1.0
    db = tf.maximum(db, tf.reduce_max(db) - TOP_DB)
    coeffs = tf.signal.mfccs_from_log_mel_spectrograms(db)[:, :N_MFCC]           # [frames, 20]
    # TF's DCT-II scaling is sqrt(2 / N) for every coefficient; librosa's is orthonormal (sqrt(1 / N) for c0).
    coeffs = coeffs * tf.constant([0.5 ** 0.5] + [1.0] * (N_MFCC - 1), tf.float32)
    coeffs = tf.transpose(coeffs)[:, :N_FRAMES]                                  # [20 coefficients, <= 20 frames]
    coeffs = tf.pad(coeffs, [[0, 0], [0, tf.maximum(N_FRAMES - tf.shape(coeffs)[1], 0)]])
    return tf.ensure_shape(coeffs, [N_MFCC, N_FRAMES])


_MFCC_GRAPH = None


def _mfcc_graph():
    global _MFCC_GRAPH
    if _MFCC_GRAPH is None:
        import tensorflow as tf

        _MFCC_GRAPH = tf.function(_mfcc_8k, input_signature=[tf.TensorSpec([None], tf.float32)], autograph=False)
    return _MFCC_GRAPH


def _resample(wave, rate_in):
    import tensorflow as tf

    try:
        import tensorflow_io as tfio
    except ImportError as exc:
        raise ImportError(f"resampling audio to {TARGET_RATE} Hz needs tensorflow-io "
                          f"(pip install 'shaspec-tf[pipeline]')") from exc
    return tfio.audio.resample(tf.reshape(wave, [-1, 1]), rate_in=tf.cast(rate_in, tf.int64),
                               rate_out=TARGET_RATE)[:, 0]


def mfcc(waveform, sample_rate=TARGET_RATE):
    """MFCCs of one clip as SMIL computes them, with TensorFlow ops only (usable eagerly, in ``tf.data`` and Beam).

    ``waveform``: float32 ``[samples]`` (or ``[samples, channels]``, averaged to mono) in [-1, 1]; ``sample_rate``:
    Hz, a Python int or a scalar tensor. Returns float32 ``[20, 20]``: **rows are the 20 MFCC coefficients, columns
    the first 20 time frames** (librosa's ``(n_mfcc, t)`` orientation, as SMIL feeds it as a 20x20 image), zero
    columns after the clip ends.

    Steps: resample to 8 kHz with ``tfio.audio.resample`` if ``sample_rate`` differs; keep every 3rd sample
    (SMIL's ``wave[::3]``, still treated as 8 kHz); STFT with n_fft 2048, hop 512, periodic Hann, centred with
    numpy-style reflect padding of 1024; power ``|X|^2``; 128 mel bands 0-4000 Hz; dB ``10 log10(max(S, 1e-10))``
    clipped at 80 dB below the clip's maximum; DCT-II keeping 20 coefficients with librosa's orthonormal scaling;
    pad/truncate to 20 frames. Not numerically librosa's: TF's mel filters are HTK-scale and unnormalised where
    librosa's are Slaney-scale with area normalisation, so values differ while the shape and the recipe match.
    """
    import tensorflow as tf

    wave = tf.convert_to_tensor(waveform, tf.float32)
    if wave.shape.rank == 2:
        wave = tf.reduce_mean(wave, axis=1)
    wave = tf.reshape(wave, [-1])
    if isinstance(sample_rate, tf.Tensor) and not tf.executing_eagerly():
        rate = tf.cast(sample_rate, tf.int64)
        wave = tf.cond(tf.equal(rate, TARGET_RATE), lambda: wave, lambda: _resample(wave, rate))
    else:
        rate = int(sample_rate.numpy()) if isinstance(sample_rate, tf.Tensor) else int(sample_rate)
        if rate <= 0:
            raise ValueError(f"mfcc: sample_rate must be positive, got {rate}")
        if rate != TARGET_RATE:
            wave = _resample(wave, rate)
    return _mfcc_graph()(wave)


def wav_to_mfcc(path):
    """``tf.data``-friendly: a WAV path (string tensor) -> ``[20, 20]`` MFCCs (16-bit PCM WAVs; no Python)."""
    import tensorflow as tf

    audio, rate = tf.audio.decode_wav(tf.io.read_file(path))
    return mfcc(tf.reduce_mean(audio, axis=1), rate)


# -- inputs ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recording:
    digit: int
    speaker: str
    index: int
    path: Path

    @property
    def stem(self) -> str:
        return f"{self.digit}_{self.speaker}_{self.index}"


def find_recordings(fsdd_dir, speakers: Optional[Sequence[str]] = DEFAULT_SPEAKERS):
    """FSDD WAVs ``{digit}_{speaker}_{index}.wav`` of ``speakers`` (``None``: all) in ``fsdd_dir``, sorted by digit,
    speaker and index. One-line errors for a missing folder, an unknown speaker or no matching WAV."""
    folder = Path(fsdd_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"FSDD recordings folder {folder} does not exist; {DATA_HELP}")
    found = []
    for entry in folder.iterdir():
        match = WAV_PATTERN.match(entry.name)
        if match:
            found.append(Recording(int(match.group(1)), match.group(2), int(match.group(3)), entry))
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
    path = Path(mnist_npz)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST npz {path} does not exist; {DATA_HELP}")
    if not zipfile.is_zipfile(path):  # an .npy, a pickle or text under an .npz name, or a cut-off download
        raise ValueError(f"{path}: not an npz archive (a zip of .npy arrays: np.savez); a renamed .npy, another "
                         f"format, or a truncated file?")
    try:
        with np.load(path, allow_pickle=False) as data:
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


# -- the builder -------------------------------------------------------------------------------------------------------
def _audio_keep_count(rate: float, n: int) -> int:
    """How many of a class's ``n`` training samples keep their audio: ``round(rate * n)`` (half up), at least one."""
    if n == 0:
        return 0
    return int(min(n, max(1, np.floor(rate * n + 0.5))))


def _shard_counts(shards, splits) -> dict:
    if isinstance(shards, Mapping):
        counts = {split: int(shards.get(split, 1)) for split in splits}
    else:
        counts = {split: int(shards) for split in splits}
    bad = {k: v for k, v in counts.items() if v < 1}
    if bad:
        raise ValueError(f"shards must be >= 1 per split, got {bad}")
    return counts


def legacy_output(folder) -> bool:
    """Whether ``folder`` (no ownership marker) is a :func:`build_avmnist` output written before markers existed: its
    manifest is ours (``task`` avmnist, our ``schema_version``) and the folder holds nothing but that manifest and the
    TFRecord files it lists."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("task") != "avmnist" or \
            manifest.get("schema_version") != schema.SCHEMA_VERSION or not isinstance(manifest.get("splits"), dict):
        return False
    implied = {MANIFEST}
    for split in manifest["splits"].values():
        files = split.get("files") if isinstance(split, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return False
        implied.update(files)
    return set(fileio.list_files(str(folder))) <= implied


def _check_out_dir(out_dir: Path) -> None:
    """Refuse, with a one-line ``FileExistsError`` and touching nothing, an ``out_dir`` that is not absent, empty, or
    an earlier AV-MNIST build (:func:`shaspec_tf.fileio.ensure_replaceable` with :func:`legacy_output`)."""
    fileio.ensure_replaceable(str(out_dir), KIND, legacy=legacy_output)


@dataclass(frozen=True)
class AvMnistJob:
    """One sample to make: a recording, the MNIST image paired with it and whether its audio is kept."""
    split: str
    sample_id: str
    wav: str
    digit: int
    speaker: str
    image: bytes              # uint8 [28, 28], row-major
    has_audio: bool


def _check_complete(fsdd_dir, split, indices, recordings, chosen, speakers) -> None:
    """Every requested recording (each digit x speaker x index of ``split``) must exist: a missing one is an error
    naming it, rather than a split smaller than its manifest's indices say."""
    names = tuple(speakers) if speakers is not None else sorted({r.speaker for r in recordings})
    have = {(r.digit, r.speaker, r.index) for r in chosen}
    missing = [f"{d}_{s}_{i}.wav" for d in range(10) for s in names for i in indices if (d, s, i) not in have]
    if missing:
        total = 10 * len(names) * len(indices)
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise FileNotFoundError(f"{fsdd_dir}: {len(missing)} of the {total} requested {split} recordings are missing "
                                f"({shown}); request {split} indices and speakers that exist")


def plan_avmnist(mnist_npz=None, fsdd_dir=None, speakers: Optional[Sequence[str]] = DEFAULT_SPEAKERS,
                 test_indices: Iterable[int] = range(5, 15), train_indices: Iterable[int] = range(15, 50),
                 all_test: bool = False, audio_rate: float = 1.0, seed: int = 0,
                 shards: Union[int, Mapping[str, int]] = 1):
    """The SMIL pairing and audio availability of :func:`build_avmnist` without any audio work: returns
    ``(manifest, jobs)``, one :class:`AvMnistJob` per sample (made into a record by :func:`avmnist_job_example`,
    locally or in a Beam pipeline)."""
    if mnist_npz is None or fsdd_dir is None:
        default_npz, default_fsdd = default_sources()
        mnist_npz = default_npz if mnist_npz is None else mnist_npz
        fsdd_dir = default_fsdd if fsdd_dir is None else fsdd_dir
    if not 0.0 < float(audio_rate) <= 1.0:
        raise ValueError(f"audio_rate must be in (0, 1], got {audio_rate}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if isinstance(speakers, str):
        speakers = (speakers,)
    speakers = None if speakers is None else tuple(speakers)
    train_idx, test_idx = sorted({int(i) for i in train_indices}), sorted({int(i) for i in test_indices})
    overlap = sorted(set(train_idx) & set(test_idx))
    if overlap and not all_test:
        raise ValueError(f"train_indices and test_indices overlap at {overlap}")

    images, labels = load_mnist(mnist_npz)
    recordings = find_recordings(fsdd_dir, speakers)
    if all_test:
        selected = {"test": recordings}
    else:
        selected = {}
        for split, indices in (("train", train_idx), ("test", test_idx)):
            if not indices:
                continue
            chosen = [r for r in recordings if r.index in set(indices)]
            if not chosen:
                raise FileNotFoundError(f"no WAVs for speakers {list(speakers or [])} with {split} indices "
                                        f"{indices[0]}..{indices[-1]} in {fsdd_dir}")
            _check_complete(fsdd_dir, split, indices, recordings, chosen, speakers)
            selected[split] = chosen
        if not selected:
            raise ValueError("train_indices and test_indices are both empty")
    shard_counts = _shard_counts(shards, selected)

    # Pairing: per digit, one seeded permutation of its MNIST rows; train from the front, test from the back.
    rows = {}
    for digit in range(10):
        pool = np.random.default_rng([int(seed), digit]).permutation(np.flatnonzero(labels == digit))
        n_train = sum(r.digit == digit for r in selected.get("train", []))
        n_test = sum(r.digit == digit for r in selected.get("test", []))
        if n_train + n_test > pool.size:
            raise ValueError(f"{mnist_npz}: digit {digit} needs {n_train + n_test} MNIST images "
                             f"({n_train} train + {n_test} test) but the npz has {pool.size}")
        taken = {"train": pool[:n_train], "test": pool[pool.size - n_test:]}
        for split in selected:
            for recording, row in zip([r for r in selected[split] if r.digit == digit], taken[split]):
                rows[(split, recording)] = int(row)

    # Audio availability: per class of the training split, a seeded choice of round(rate * n) samples.
    has_audio = {}
    for split, chosen in selected.items():
        for digit in range(10):
            members = [r for r in chosen if r.digit == digit]
            keep = len(members)
            if split == "train" and audio_rate < 1.0:
                keep = _audio_keep_count(float(audio_rate), len(members))
            kept = set(np.random.default_rng([int(seed), digit, 1]).permutation(len(members))[:keep].tolist())
            for position, recording in enumerate(members):
                has_audio[(split, recording)] = position in kept

    jobs = [AvMnistJob(split, f"{split}/{r.stem}", str(r.path), r.digit, r.speaker,
                       np.ascontiguousarray(images[rows[(split, r)]], np.uint8).tobytes(), has_audio[(split, r)])
            for split in selected for r in selected[split]]
    manifest = {
        "task": "avmnist",
        "protocol": "SMIL (mengmenm/SMIL) as used by ShaSpec; see shaspec_tf.data.avmnist",
        "schema_version": schema.SCHEMA_VERSION,
        "seed": int(seed),
        "audio_rate": float(audio_rate),
        "speakers": list(speakers) if speakers is not None else sorted({r.speaker for r in recordings}),
        "all_test": bool(all_test),
        "train_indices": [] if all_test else train_idx,
        "test_indices": sorted({r.index for r in recordings}) if all_test else test_idx,
        "sources": {"mnist_npz": str(Path(mnist_npz).resolve()), "fsdd_dir": str(Path(fsdd_dir).resolve())},
        "mfcc": {"shape": [N_MFCC, N_FRAMES], "orientation": "coefficients x frames", "target_rate": TARGET_RATE,
                 "decimation": DECIMATION, "n_fft": N_FFT, "hop_length": HOP_LENGTH, "n_mels": N_MELS,
                 "top_db": TOP_DB},
        "image": {"shape": [28, 28], "scale": "uint8 / 255 -> [0, 1]"},
        "splits": {},
        "mnist_rows": {},
    }
    for split, chosen in selected.items():
        per_class = {str(d): sum(r.digit == d for r in chosen) for d in range(10)}
        audio_per_class = {str(d): sum(has_audio[(split, r)] for r in chosen if r.digit == d) for d in range(10)}
        n = shard_counts[split]
        manifest["splits"][split] = {
            "count": len(chosen), "per_class": per_class, "audio_count": sum(audio_per_class.values()),
            "audio_per_class": audio_per_class, "shards": n,
            "files": [f"{split}-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)],
            "order": "shuffled by the seed" if split == "train" else "sorted by digit, speaker, index",
        }
        for r in chosen:
            manifest["mnist_rows"][f"{split}/{r.stem}"] = rows[(split, r)]

    return manifest, jobs


def avmnist_job_example(job: AvMnistJob) -> bytes:
    """A planned sample -> serialized ``schema.avmnist_example`` (audio: the WAV's MFCCs, zeros when dropped)."""
    wave, rate = load_wav(job.wav)
    audio = mfcc(wave, rate).numpy()
    image = np.frombuffer(job.image, np.uint8).reshape(28, 28).astype(np.float32) / 255.0
    example = schema.avmnist_example(job.sample_id, image, audio if job.has_audio else np.zeros_like(audio),
                                     [1, int(job.has_audio)], job.digit, job.speaker)
    return example.SerializeToString(deterministic=True)


def build_avmnist(mnist_npz=None, fsdd_dir=None, out_dir="avmnist",
                  speakers: Optional[Sequence[str]] = DEFAULT_SPEAKERS,
                  test_indices: Iterable[int] = range(5, 15), train_indices: Iterable[int] = range(15, 50),
                  all_test: bool = False, audio_rate: float = 1.0, seed: int = 0,
                  shards: Union[int, Mapping[str, int]] = 1, progress: bool = True) -> dict:
    """Build AV-MNIST by the SMIL protocol into ``out_dir`` and return the manifest (also ``out_dir/manifest.json``).

    ``mnist_npz`` / ``fsdd_dir`` default to :func:`default_sources`. Recordings of ``speakers`` (``None``: all)
    with an index in ``train_indices`` form the train split, those in ``test_indices`` the test split;
    ``all_test=True`` puts every recording of those speakers, whatever its index, into one split ``"test"``. Each
    recording is paired with an MNIST image of its digit: a shuffle of that digit's rows seeded by ``(seed, digit)``;
    train takes rows from its front, test from its back, so the two never share an image (``manifest["mnist_rows"]``
    records each sample's row). ``audio_rate`` in (0, 1]: per class, ``round(audio_rate * n)`` training samples
    (at least one; chosen by ``(seed, digit)``) keep their audio, the others get ``modality_mask [1, 0]`` and zero
    audio; test samples keep both. ``shards``: files per split (an int, or ``{"train": 4, "test": 1}``); records go
    round-robin to the shards.

    Everything is written to a hidden sibling folder (``.OUT.partial-HOST-PID-RANDOM``; those of killed runs are
    removed by later ones) and renamed into place at the end: a failure leaves an earlier build untouched and no
    half-written output. A re-run replaces an earlier build, which must prove it is one before any work starts: the
    ownership marker of :mod:`shaspec_tf.fileio` (kind ``"avmnist-records"``) listing every file in it, or, for a
    build from before markers, :func:`legacy_output`. Any other non-empty folder, or a file, is refused with a
    one-line ``FileExistsError`` and left untouched. Every requested recording (digit x speaker x index) must exist:
    a missing one is a one-line ``FileNotFoundError`` naming it, so the manifest's indices are the samples written.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    manifest, jobs = plan_avmnist(mnist_npz, fsdd_dir, speakers, test_indices, train_indices, all_test, audio_rate,
                                  seed, shards)

    import tensorflow as tf
    from tqdm.auto import tqdm

    examples = {split: [] for split in manifest["splits"]}
    for job in tqdm(jobs, desc="AV-MNIST recordings", unit="wav", disable=not progress):
        examples[job.split].append((job.sample_id, avmnist_job_example(job)))

    staging = Path(fileio.staging_dir(str(out_dir)))   # hidden sibling; dead runs' leftovers go first
    try:
        for split, records in examples.items():
            if split == "train":
                order = np.random.default_rng([int(seed), 10]).permutation(len(records))
                records = [records[i] for i in order]
            files = manifest["splits"][split]["files"]
            writers = [tf.io.TFRecordWriter(str(staging / name)) for name in files]
            try:
                for i, (_, serialized) in enumerate(records):
                    writers[i % len(writers)].write(serialized)
            finally:
                for writer in writers:
                    writer.close()
        _write_manifest(staging, manifest)      # last: a folder without a manifest is never a complete build
        fileio.replace_dir(str(staging), str(out_dir), KIND, legacy=legacy_output)
    except BaseException:
        fileio.remove_tree(str(staging))
        raise
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


# -- readers -----------------------------------------------------------------------------------------------------------
def tfrecord_files(out_dir, split: str):
    """The TFRecord files of ``split`` in a build, in order (from its manifest)."""
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    if split not in manifest["splits"]:
        raise KeyError(f"{out_dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
    return [str(Path(out_dir) / name) for name in manifest["splits"][split]["files"]]


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
    root = Path(npy_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"published AV-MNIST folder {root} does not exist")
    out = {}
    for split in splits:
        paths = [root / pattern.format(split=split) for pattern in PUBLISHED_LAYOUT]
        missing = [str(p.relative_to(root)) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: missing {missing} (expected layout: "
                                    f"{', '.join(p.format(split=split) for p in PUBLISHED_LAYOUT)})")
        image, audio, label = (np.load(p, allow_pickle=False) for p in paths)
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


# -- command line ------------------------------------------------------------------------------------------------------
def sources_and_speakers(data_dir=None, mnist_npz=None, fsdd_dir=None, speakers: str = "jackson,nicolas,theo"):
    """Command-line options -> ``(mnist_npz, fsdd_dir, speakers)`` for :func:`build_avmnist`: unset sources come
    from :func:`default_sources` (``data_dir``), ``speakers`` is comma-separated or ``"all"`` (-> ``None``)."""
    if mnist_npz is None or fsdd_dir is None:
        default_npz, default_fsdd = default_sources(data_dir)
        mnist_npz, fsdd_dir = mnist_npz or default_npz, fsdd_dir or default_fsdd
    names = None if speakers == "all" else tuple(s for s in speakers.split(",") if s)
    return mnist_npz, fsdd_dir, names


def parse_indices(text: str):
    """"START:STOP" -> range(START, STOP); "a,b,c" -> [a, b, c] (recording indices, >= 0); "" -> []. One-line
    ``ValueError`` for anything else."""
    start, colon, stop = text.partition(":")
    try:
        values = range(int(start), int(stop)) if colon else [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"recording indices must be START:STOP or a comma list of integers, got {text!r}") from None
    if colon and int(stop) <= int(start):
        raise ValueError(f"recording indices {text!r}: STOP must be greater than START")
    if any(v < 0 for v in values):
        raise ValueError(f"recording indices must be >= 0, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shaspec_tf.data.avmnist",
                                     description="Build AV-MNIST (SMIL protocol) TFRecords from MNIST + FSDD.")
    parser.add_argument("out_dir")
    parser.add_argument("--data-dir", help="folder with mnist8k.npz and fsdd/recordings (default: SHASPEC_DATA "
                                           "or ../shared/data)")
    parser.add_argument("--mnist-npz")
    parser.add_argument("--fsdd-dir")
    parser.add_argument("--speakers", default=",".join(DEFAULT_SPEAKERS), help="comma-separated, or 'all'")
    parser.add_argument("--train-indices", default="15:50", help="START:STOP or a comma list")
    parser.add_argument("--test-indices", default="5:15", help="START:STOP or a comma list")
    parser.add_argument("--all-test", action="store_true")
    parser.add_argument("--audio-rate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        mnist_npz, fsdd_dir, speakers = sources_and_speakers(args.data_dir, args.mnist_npz, args.fsdd_dir,
                                                             args.speakers)
        manifest = build_avmnist(mnist_npz, fsdd_dir, args.out_dir, speakers=speakers,
                                 train_indices=parse_indices(args.train_indices),
                                 test_indices=parse_indices(args.test_indices),
                                 all_test=args.all_test, audio_rate=args.audio_rate, seed=args.seed,
                                 shards=args.shards)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v['count']} ({v['audio_count']} with audio)" for k, v in manifest["splits"].items())
    print(f"wrote {args.out_dir}: {counts}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
