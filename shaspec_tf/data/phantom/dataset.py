"""Phantom data sets on disk or in a bucket: BraTS-layout NIfTI cases written atomically, marked as ours, resumable.

The output folder may be a URI (``gs://bucket/phantoms``, through :mod:`shaspec_tf.fileio`): each case is then written
to a local temporary folder and its files uploaded one by one (an object appears only once whole); a case counts as
present (``skip_existing``) only when every file it should hold is there, so a run killed while uploading a case
rewrites it on resume.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from shaspec_tf import fileio

from ..schema import BRATS_MODALITIES
from .anatomy import (BRATS_SHAPE, DEFAULT_SHAPE, DROP_STREAM, FOV_MM, LABELS, PHANTOM_VERSION, SEG_SUFFIX, check_shape,
                      make_phantom_case, phantom_affine, phantom_case_seed, phantom_spacing, stream_rng)

KIND = "phantom-nifti"
MANIFEST = "phantoms.json"


def drops(seed: int, index: int, drop_rate: float):
    """Which sequences case ``index`` lacks: each independently with probability ``drop_rate``, but never all."""
    rng = stream_rng(seed, DROP_STREAM, index)
    draws = rng.random(len(BRATS_MODALITIES))
    keep = int(rng.integers(len(BRATS_MODALITIES)))
    dropped = [m for m, u in zip(BRATS_MODALITIES, draws) if u < drop_rate]
    if len(dropped) == len(BRATS_MODALITIES):
        dropped.remove(BRATS_MODALITIES[keep])
    return dropped


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> None:
    """``array`` ``[D, H, W]`` as a NIfTI file (``.nii.gz``: compressed) with ``affine``, written through
    :func:`shaspec_tf.fileio.atomic_path` (``path`` may be a URI)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array.transpose(2, 1, 0), dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = os.fspath(path)
    suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
    with fileio.atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)


def _write_json(path: str, payload: dict) -> None:
    fileio.atomic_write(path, json.dumps(payload, indent=1))


def _plain_dir(path: str) -> bool:
    return fileio.isdir(path) and (fileio.is_uri(path) or not os.path.islink(path))


def _plain_file(path: str) -> bool:
    return fileio.isfile(path) and (fileio.is_uri(path) or not os.path.islink(path))


def legacy_output(folder) -> bool:
    """Whether ``folder`` (no ownership marker) is a phantom data set written before markers existed: a
    ``phantoms.json`` of this generator, and nothing else than case folders ``<prefix>_NNNN`` (its prefix) holding
    only that case's ``.nii.gz`` sequences and seg."""
    folder = os.fspath(folder)
    try:
        manifest = fileio.read_json(fileio.join(folder, MANIFEST))
    except Exception:  # noqa: BLE001 -- absent (OSError, or TensorFlow's NotFoundError for a URI), not JSON: not ours
        return False
    if not isinstance(manifest, dict) or manifest.get("generator") != "shaspec_tf.data.phantom" or \
            not isinstance(manifest.get("prefix"), str):
        return False
    case = re.compile(re.escape(manifest["prefix"]) + r"_\d{4,}")
    names = "|".join(BRATS_MODALITIES + (SEG_SUFFIX,))
    for entry in fileio.listdir(folder):
        path = fileio.join(folder, entry)
        if entry == MANIFEST and _plain_file(path):
            continue
        if not (case.fullmatch(entry) and _plain_dir(path)):
            return False
        own = re.compile(re.escape(entry) + f"_({names})\\.nii\\.gz")
        if not all(own.fullmatch(f) and _plain_file(fileio.join(path, f)) for f in fileio.listdir(path)):
            return False
    return True


def _clean_litter(folder: str) -> None:
    """Remove the ``.NAME.partial-HOST-PID-*`` leftovers of dead runs in ``folder``, whatever ``NAME``
    (:func:`shaspec_tf.fileio.clean_stale` looks for one name at a time); nothing to do on an object store, where
    cases are built in local temporary folders."""
    fileio.clean_stale_in(folder)


def _case_present(final: str, names: Sequence[str]) -> bool:
    """Whether the case folder ``final`` is there to keep (``skip_existing``): a local case folder lands whole (a
    rename), one in a bucket only once every file it should hold (``names``) has been uploaded."""
    if not fileio.is_uri(final):
        return fileio.isdir(final)
    return fileio.isdir(final) and all(fileio.isfile(fileio.join(final, name)) for name in names)


def _land_local(tmp: str, final: str) -> None:
    """Rename the built case ``tmp`` onto ``final``; an existing ``final`` is swapped aside first and deleted once
    the new one is in place (restored on failure)."""
    old = None
    try:
        if fileio.exists(final):
            old = fileio.partial_name(final)                       # a dead run's leftover is cleaned later
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        if old is not None and not fileio.exists(final):
            os.rename(old, final)
        raise
    if old is not None:
        fileio.remove_tree(old)


def _land_uri(tmp: str, final: str) -> None:
    """Upload the case built in the local folder ``tmp`` into ``final`` (file by file, each object whole), then
    delete the objects of an earlier version of the case that the new one does not hold."""
    names = fileio.listdir(tmp)
    for name in names:
        fileio.copy(os.path.join(tmp, name), fileio.join(final, name), overwrite=True)
    for name in fileio.listdir(final) if fileio.isdir(final) else []:
        if name not in names and fileio.isfile(fileio.join(final, name)):
            fileio.remove(fileio.join(final, name))


def write_phantom_dataset(out_dir: Union[str, os.PathLike], cases: Union[int, Iterable[int]],
                          shape: Optional[Sequence[int]] = None, seed: int = 0, drop_rate: float = 0.0,
                          prefix: str = "Phantom", skip_existing: bool = False, progress: bool = True) -> dict:
    """Write phantom cases in the BraTS 2018-2021 layout: ``out_dir/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``
    with ``<case> = f"{prefix}_{k:04d}"``; sequences are int16 (exact: the values are integers), the seg uint8.

    ``cases`` is a count (cases ``0 .. N-1``, N >= 1) or the case indices to write. Case ``k`` is generated from
    :func:`phantom_case_seed` ``(seed, k)``, so it is identical whatever the other cases. With ``drop_rate`` P each
    sequence file of a case is left out independently with probability P (an incomplete acquisition), keeping at
    least one (chosen uniformly when all four would go); the seg is always written. Each case is written into a
    hidden temporary folder (``.<case>.partial-HOST-PID-RANDOM``; those of killed runs are removed by later ones) and
    renamed into place, so an interrupted run never leaves a half case that looks whole; ``skip_existing=True``
    resumes such a run (keeps case folders already there). ``phantoms.json`` (rewritten atomically after every case)
    records the seed, shape, spacing, drop rate and, per case, its seed and the sequences present and dropped.
    Returns that manifest.

    ``out_dir`` must be absent, empty, or a phantom data set of ours: the ownership marker of
    :mod:`shaspec_tf.fileio` (kind ``"phantom-nifti"``, updated before each case lands) must list everything in it,
    or, for a data set from before markers, :func:`legacy_output` must vouch for it. Anything else is refused with a
    one-line ``FileExistsError`` before any file is written, so no case folder or ``phantoms.json`` of someone else
    is ever replaced. ``out_dir`` may be a URI (see the module docstring)."""
    from tqdm import tqdm

    if not 0.0 <= float(drop_rate) <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    shape = check_shape(shape if shape is not None else DEFAULT_SHAPE)
    if isinstance(cases, (int, np.integer)) and int(cases) < 1:
        raise ValueError(f"the number of cases must be >= 1, got {cases}")
    indices = list(range(int(cases))) if isinstance(cases, (int, np.integer)) else [int(k) for k in cases]
    if not indices or any(k < 0 for k in indices) or len(set(indices)) != len(indices):
        raise ValueError("case indices must be distinct, >= 0, and at least one")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    out = os.fspath(out_dir)
    out = out.rstrip("/") if fileio.is_uri(out) else out
    uri = fileio.is_uri(out)
    # A killed run's partial case folders (ours by their name; their process is gone) go first: the ownership check
    # would count their files as foreign (fileio.list_files skips partial files, not the files in partial folders).
    _clean_litter(out)
    ours = fileio.ensure_replaceable(out, KIND, check_sizes=False, legacy=legacy_output)
    fileio.makedirs(out)
    marker = fileio.read_marker(out) if ours else None
    # What the marker lists: every file in the folder (checked ours above), kept a superset of what is there at any
    # moment, so that a run killed between two steps leaves a folder a later run still recognises.
    listed = dict(marker["files"]) if marker else fileio.list_files(out)
    listed.setdefault(MANIFEST, 0)              # rewritten after every case
    fileio.write_marker(out, KIND, files=listed)
    manifest = {
        "generator": "shaspec_tf.data.phantom", "version": PHANTOM_VERSION, "seed": int(seed),
        "shape": list(shape), "nifti_shape": list(shape[::-1]), "spacing_mm": phantom_spacing(shape).tolist(),
        "drop_rate": float(drop_rate), "prefix": prefix, "modalities": list(BRATS_MODALITIES),
        "num_cases": len(indices), "cases": [],
    }

    for k in tqdm(indices, desc="phantoms", unit="case", disable=not progress):
        case_id = f"{prefix}_{k:04d}"
        dropped = drops(seed, k, float(drop_rate))
        entry = {"case_id": case_id, "index": k, "seed": phantom_case_seed(seed, k), "dropped": dropped,
                 "present": [m for m in BRATS_MODALITIES if m not in dropped]}
        final = fileio.join(out, case_id)
        names = [f"{case_id}_{name}.nii.gz" for name in entry["present"] + [SEG_SUFFIX]]
        if not (skip_existing and _case_present(final, names)):
            volumes, labels, affine = make_phantom_case(entry["seed"], shape, drop=dropped)
            # built beside the case (renamed into place) or, for a bucket, in a local folder (uploaded)
            tmp = tempfile.mkdtemp(prefix=".shaspec-phantom-") if uri else fileio.staging_dir(final)
            try:
                for name, volume in volumes.items():
                    save_nifti(volume, affine, os.path.join(tmp, f"{case_id}_{name}.nii.gz"), np.int16)
                save_nifti(labels, affine, os.path.join(tmp, f"{case_id}_{SEG_SUFFIX}.nii.gz"), np.uint8)
                # listed before it lands
                listed.update({f"{case_id}/{name}": size for name, size in fileio.list_files(tmp).items()})
                fileio.write_marker(out, KIND, files=listed)
                (_land_uri if uri else _land_local)(tmp, final)
            finally:
                fileio.remove_tree(tmp)             # gone already when a local case landed
            entry["label_voxels"] = {str(v): int(np.sum(labels == v)) for v in LABELS.values()}
        manifest["cases"].append(entry)
        _write_json(fileio.join(out, MANIFEST), manifest)
    _write_json(fileio.join(out, MANIFEST), manifest)
    # The final listing: exactly what the folder holds (all of it ours: checked at the start, written since).
    fileio.write_marker(out, KIND, files={k: v for k, v in fileio.list_files(out).items()
                                          if k in listed or k == MANIFEST})
    return manifest


__all__ = ["BRATS_SHAPE", "DEFAULT_SHAPE", "FOV_MM", "KIND", "LABELS", "legacy_output", "make_phantom_case",
           "phantom_affine", "phantom_case_seed", "phantom_spacing", "write_phantom_dataset"]
