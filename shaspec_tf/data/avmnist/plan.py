"""The SMIL plan of an AV-MNIST build (:func:`plan_avmnist`: pairing, splits, audio availability, manifest) and
one planned sample made into a record (:func:`avmnist_job_example`), locally or in a Beam pipeline."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from shaspec_tf import fileio
from shaspec_tf.data import schema
from shaspec_tf.data.avmnist.dsp import (DECIMATION, HOP_LENGTH, N_FFT, N_FRAMES, N_MELS, N_MFCC, TARGET_RATE, TOP_DB,
                                         mfcc)
from shaspec_tf.data.avmnist.sources import DEFAULT_SPEAKERS, default_sources, find_recordings, load_mnist, load_wav
from shaspec_tf.taskspec.constants import AVMNIST_NAME as TASK


# -- the plan ----------------------------------------------------------------------------------------------------------
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




def _where(path) -> str:
    """A source as the manifest records it: a URI as it is, a local path absolute with links resolved."""
    path = os.fspath(path)
    return path if fileio.is_uri(path) else os.path.realpath(os.path.expanduser(path))


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
        "task": TASK,
        "protocol": "SMIL (mengmenm/SMIL) as used by ShaSpec; see shaspec_tf.data.avmnist",
        "schema_version": schema.SCHEMA_VERSION,
        "seed": int(seed),
        "audio_rate": float(audio_rate),
        "speakers": list(speakers) if speakers is not None else sorted({r.speaker for r in recordings}),
        "all_test": bool(all_test),
        "train_indices": [] if all_test else train_idx,
        "test_indices": sorted({r.index for r in recordings}) if all_test else test_idx,
        "sources": {"mnist_npz": _where(mnist_npz), "fsdd_dir": _where(fsdd_dir)},
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
