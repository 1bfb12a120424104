"""Phantom data sets on disk: BraTS-layout NIfTI cases written atomically, marked as ours, resumable."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

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


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array.transpose(2, 1, 0), dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_json(path: Path, payload: dict) -> None:
    from shaspec_tf import fileio

    fileio.atomic_write(str(path), json.dumps(payload, indent=1))


def legacy_output(folder) -> bool:
    """Whether ``folder`` (no ownership marker) is a phantom data set written before markers existed: a
    ``phantoms.json`` of this generator, and nothing else than case folders ``<prefix>_NNNN`` (its prefix) holding
    only that case's ``.nii.gz`` sequences and seg."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("generator") != "shaspec_tf.data.phantom" or \
            not isinstance(manifest.get("prefix"), str):
        return False
    case = re.compile(re.escape(manifest["prefix"]) + r"_\d{4,}")
    names = "|".join(BRATS_MODALITIES + (SEG_SUFFIX,))
    for entry in os.scandir(folder):
        if entry.name == MANIFEST and entry.is_file(follow_symlinks=False):
            continue
        if not (case.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            return False
        own = re.compile(re.escape(entry.name) + f"_({names})\\.nii\\.gz")
        if not all(own.fullmatch(f.name) and f.is_file(follow_symlinks=False) for f in os.scandir(entry.path)):
            return False
    return True


def _clean_litter(folder: Path) -> None:
    """Remove the ``.NAME.partial-HOST-PID-*`` leftovers of dead runs in ``folder``, whatever ``NAME``
    (:func:`shaspec_tf.fileio.clean_stale` looks for one name at a time)."""
    from shaspec_tf import fileio

    fileio.clean_stale_in(str(folder))


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
    is ever replaced."""
    from tqdm import tqdm

    from shaspec_tf import fileio

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
    out = Path(out_dir)
    # A killed run's partial case folders (ours by their name; their process is gone) go first: the ownership check
    # would count their files as foreign (fileio.list_files skips partial files, not the files in partial folders).
    _clean_litter(out)
    ours = fileio.ensure_replaceable(str(out), KIND, check_sizes=False, legacy=legacy_output)
    out.mkdir(parents=True, exist_ok=True)
    marker = fileio.read_marker(str(out)) if ours else None
    # What the marker lists: every file in the folder (checked ours above), kept a superset of what is there at any
    # moment, so that a run killed between two steps leaves a folder a later run still recognises.
    listed = dict(marker["files"]) if marker else fileio.list_files(str(out))
    listed.setdefault(MANIFEST, 0)              # rewritten after every case
    fileio.write_marker(str(out), KIND, files=listed)
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
        final = out / case_id
        if not (skip_existing and final.is_dir()):
            volumes, labels, affine = make_phantom_case(entry["seed"], shape, drop=dropped)
            tmp = Path(fileio.staging_dir(str(final)))
            old = None
            try:
                for name, volume in volumes.items():
                    save_nifti(volume, affine, tmp / f"{case_id}_{name}.nii.gz", np.int16)
                save_nifti(labels, affine, tmp / f"{case_id}_{SEG_SUFFIX}.nii.gz", np.uint8)
                # listed before it lands
                listed.update({f"{case_id}/{name}": size for name, size in fileio.list_files(str(tmp)).items()})
                fileio.write_marker(str(out), KIND, files=listed)
                if final.exists():                                      # overwrite: swap, then delete the old one
                    old = Path(fileio.partial_name(str(final)))         # a dead run's leftover is cleaned later
                    os.rename(final, old)
                os.rename(tmp, final)
            except BaseException:
                fileio.remove_tree(str(tmp))
                if old is not None and not final.exists():
                    os.rename(old, final)
                raise
            if old is not None:
                fileio.remove_tree(str(old))
            entry["label_voxels"] = {str(v): int(np.sum(labels == v)) for v in LABELS.values()}
        manifest["cases"].append(entry)
        _write_json(out / MANIFEST, manifest)
    _write_json(out / MANIFEST, manifest)
    # The final listing: exactly what the folder holds (all of it ours: checked at the start, written since).
    fileio.write_marker(str(out), KIND, files={k: v for k, v in fileio.list_files(str(out)).items()
                                               if k in listed or k == MANIFEST})
    return manifest


__all__ = ["BRATS_SHAPE", "DEFAULT_SHAPE", "FOV_MM", "KIND", "LABELS", "legacy_output", "make_phantom_case",
           "phantom_affine", "phantom_case_seed", "phantom_spacing", "write_phantom_dataset"]
