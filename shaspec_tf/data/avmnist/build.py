"""Writing an AV-MNIST build (:func:`build_avmnist`): sharded TFRecords and the manifest, staged and renamed into
place, into an output folder that is absent, empty or provably an earlier build (:mod:`shaspec_tf.fileio`). The
output may be a URI (``gs://bucket/avmnist``): it is staged beside the target there and its objects copied into
place, the ownership marker last."""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from shaspec_tf import fileio
from shaspec_tf.data import schema
from shaspec_tf.data.avmnist.plan import avmnist_job_example, plan_avmnist
from shaspec_tf.data.avmnist.sources import DEFAULT_SPEAKERS
from shaspec_tf.taskspec.constants import AVMNIST_NAME as TASK

MANIFEST = "manifest.json"
#: The ownership marker's kind (:mod:`shaspec_tf.fileio`) of a :func:`build_avmnist` output.
KIND = "avmnist-records"


def legacy_output(folder) -> bool:
    """Whether ``folder`` (no ownership marker) is a :func:`build_avmnist` output written before markers existed: its
    manifest is ours (``task`` avmnist, our ``schema_version``) and the folder holds nothing but that manifest and the
    TFRecord files it lists."""
    try:
        manifest = fileio.read_json(fileio.join(os.fspath(folder), MANIFEST))
    except Exception:  # noqa: BLE001 -- absent (OSError, or TensorFlow's NotFoundError for a URI), not JSON: not ours
        return False
    if not isinstance(manifest, dict) or manifest.get("task") != TASK or \
            manifest.get("schema_version") != schema.SCHEMA_VERSION or not isinstance(manifest.get("splits"), dict):
        return False
    implied = {MANIFEST}
    for split in manifest["splits"].values():
        files = split.get("files") if isinstance(split, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return False
        implied.update(files)
    return set(fileio.list_files(os.fspath(folder))) <= implied


def _check_out_dir(out_dir: str) -> None:
    """Refuse, with a one-line ``FileExistsError`` and touching nothing, an ``out_dir`` that is not absent, empty, or
    an earlier AV-MNIST build (:func:`shaspec_tf.fileio.ensure_replaceable` with :func:`legacy_output`)."""
    fileio.ensure_replaceable(out_dir, KIND, legacy=legacy_output)


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
    out_dir = os.fspath(out_dir)
    _check_out_dir(out_dir)
    manifest, jobs = plan_avmnist(mnist_npz, fsdd_dir, speakers, test_indices, train_indices, all_test, audio_rate,
                                  seed, shards)

    import tensorflow as tf
    from tqdm.auto import tqdm

    examples = {split: [] for split in manifest["splits"]}
    for job in tqdm(jobs, desc="AV-MNIST recordings", unit="wav", disable=not progress):
        examples[job.split].append((job.sample_id, avmnist_job_example(job)))

    staging = fileio.staging_dir(out_dir)   # hidden sibling; dead runs' leftovers go first
    try:
        for split, records in examples.items():
            if split == "train":
                order = np.random.default_rng([int(seed), 10]).permutation(len(records))
                records = [records[i] for i in order]
            files = manifest["splits"][split]["files"]
            writers = [tf.io.TFRecordWriter(fileio.join(staging, name)) for name in files]
            try:
                for i, (_, serialized) in enumerate(records):
                    writers[i % len(writers)].write(serialized)
            finally:
                for writer in writers:
                    writer.close()
        _write_manifest(staging, manifest)      # last: a folder without a manifest is never a complete build
        fileio.replace_dir(staging, out_dir, KIND, legacy=legacy_output)
    except BaseException:
        fileio.remove_tree(staging)
        raise
    return manifest


def _write_manifest(folder: str, manifest: dict) -> None:
    fileio.atomic_write(fileio.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
