"""BraTS NIfTI cases -> :class:`~shaspec_tf.data.schema.BratsRecord`: discovery, checked loading, the official
intensity normalisation and cropping to the brain.

Pipeline::

    for files in discover_cases("/data/BraTS2020_TrainingData"):
        record = preprocess(load_case(files, require_label=True))
        writer.write(schema.brats_example(record).SerializeToString())

**Layouts** (:func:`discover_cases`). BraTS 2018-2021: ``<case>/<case>_flair|_t1|_t1ce|_t2|_seg.nii[.gz]``, under any
sub-folders (``HGG/``, ``LGG/``, ...). BraTS 2023: ``<case>/<case>-t2f|-t1n|-t1c|-t2w|-seg.nii[.gz]``, read as FLAIR,
T1, T1ce, T2 and labels. A case may lack sequences (their mask bit is 0); a folder with no image sequence is not a case.

**Axes.** Arrays are ``[D, H, W] = `` NIfTI voxel axes ``(k, j, i)`` (``data.transpose(2, 1, 0)``), spacing is the
header zooms reversed, and the affine kept is the NIfTI one (it maps ``(i, j, k)``), as :mod:`.schema` specifies.

**Orientation.** Every file of a case is brought, with :mod:`nibabel.orientations` (the machinery behind
``nib.as_closest_canonical``: a permutation and flips of the voxel axes, no resampling), to one common orientation
before shapes and affines are compared. So a case whose files are stored in different orientations of the same grid
(e.g. LPS and RAS) loads to the same arrays. ``orientation="reference"`` (default) uses the orientation of the case's
first image file (FLAIR, else T1, T1ce, T2): standard BraTS cases, all stored alike, are then read exactly as the
official code reads them (no flips), and predictions un-cropped with :func:`uncrop` can be saved with the record's
affine and lie voxel-for-voxel on the source files. ``orientation="canonical"`` brings every file to RAS+ exactly as
``nib.as_closest_canonical`` does (the record's affine and spacing are then those of the canonical image).

**Normalisation** (:func:`normalize_modality`) follows the official ``truncate`` (see its docstring for the two
guards the official code lacks). :func:`preprocess` normalises the full volume first (the background is read from
the corner voxel, which must lie outside the brain) and then crops to the brain's bounding box.

Every bad input raises :class:`BratsPreprocessError` (a ``ValueError``) with a one-line message
``"<file or case>: <what is wrong>"``.

**Size limits.** Each file is read by :func:`shaspec_tf.data.nifti.read_volume`, which checks the header's declared
size against the file and a voxel limit (``max_voxels`` of :func:`load_case`, or ``SHASPEC_MAX_VOXELS``) before any
voxel is read.

**Where.** The root folder and every file may be local or a URI (``gs://bucket/BraTS2021``): discovery and reading
go through :mod:`shaspec_tf.fileio`, and case paths are strings.

NumPy and nibabel (and TensorFlow's file system for URIs only).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from shaspec_tf import fileio

from .nifti import MAX_VOXELS, MAX_VOXELS_ENV, NiftiError, fail as _fail, max_voxels_limit, read_volume
from .schema import BRATS_MODALITIES, BratsRecord

__all__ = [
    "BratsCaseFiles", "BratsPreprocessError", "HISTOGRAM_MAX_BINS", "LAYOUT_SUFFIXES", "MAX_VOXELS",
    "MAX_VOXELS_ENV", "brain_bounding_box", "crop_record", "discover_cases", "load_case", "max_voxels_limit",
    "normalize_modality", "preprocess", "uncrop",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File-name suffix -> modality (``"seg"`` for labels), per layout.
LAYOUT_SUFFIXES = {
    "2018": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"},
    "2023": {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"},
}
_SEPARATOR = {"2018": "_", "2023": "-"}
# Longest suffix first so that "_t1ce" is not read as "_t1" + "ce".
_PATTERNS = {
    layout: re.compile(r"^(?P<case>.+)" + re.escape(_SEPARATOR[layout])
                       + "(?P<suffix>" + "|".join(sorted(suffixes, key=len, reverse=True)) + r")\.nii(?:\.gz)?$",
                       re.IGNORECASE)
    for layout, suffixes in LAYOUT_SUFFIXES.items()
}
#: Label values accepted per layout; 2023 files mark enhancing tumour 3, stored as 4.
_LABEL_VALUES = {"2018": (0, 1, 2, 4), "2023": (0, 1, 2, 3)}

#: Upper bound on the histogram bins of :func:`normalize_modality` (the official code uses ``int(max)`` bins).
HISTOGRAM_MAX_BINS = 1 << 16
#: The official clipping level is the last histogram bin holding at least this many voxels.
HISTOGRAM_MIN_COUNT = 50
_AFFINE_ATOL = 1e-3

#: A BraTS file, case or folder that cannot be read as specified; the message names it, on one line.
BratsPreprocessError = NiftiError


@dataclass
class BratsCaseFiles:
    """The files of one case: ``paths`` maps each of ``flair, t1, t1ce, t2`` to a path or ``None`` (absent). Paths
    are strings (local file names or URIs, see :mod:`shaspec_tf.fileio`)."""

    case_id: str
    paths: Dict[str, Optional[str]]
    seg: Optional[str] = None
    layout: str = "2018"                    # "2018" (2018-2021 names) or "2023"
    folder: Optional[str] = field(default=None, compare=False)

    @property
    def modality_mask(self) -> np.ndarray:
        return np.array([self.paths.get(m) is not None for m in BRATS_MODALITIES], dtype=np.int64)


# -- discovery ----------------------------------------------------------------------------------------------------
def _match(name: str):
    for layout, pattern in _PATTERNS.items():
        found = pattern.match(name)
        if found:
            return layout, found.group("case"), LAYOUT_SUFFIXES[layout][found.group("suffix").lower()]
    return None


def discover_cases(root: PathLike) -> List[BratsCaseFiles]:
    """All cases under ``root`` (a folder or a URI such as ``gs://bucket/BraTS2021``; searched recursively,
    symbolic links to folders not followed), sorted by case id. Paths come back as strings under ``root``.

    Files are grouped by (folder, case id, layout). Raises ``FileNotFoundError`` when ``root`` does not exist and
    :class:`BratsPreprocessError` when it holds no case, when two files give the same sequence of a case (e.g.
    ``.nii`` and ``.nii.gz``) or when two folders hold the same case id.
    """
    root = os.fspath(root)
    root = root.rstrip("/") if fileio.is_uri(root) else root
    if not fileio.exists(root):
        raise FileNotFoundError(f"{root}: no such folder")
    if not fileio.isdir(root):
        raise _fail(root, "not a folder")
    groups: Dict[Tuple[str, str, str], Dict[str, str]] = {}
    for folder, _, names in fileio.walk(root):
        for name in names:
            if name.startswith("."):          # hidden files, e.g. macOS "._" resource forks
                continue
            found = _match(name)
            if found is None:
                continue
            layout, case_id, modality = found
            files = groups.setdefault((folder, case_id, layout), {})
            path = fileio.join(folder, name)
            if modality in files:
                raise _fail(path, f"second {modality} file of case {case_id!r} (also {files[modality]})")
            files[modality] = path
    cases: Dict[str, BratsCaseFiles] = {}
    for (folder, case_id, layout), files in groups.items():
        if not any(m in files for m in BRATS_MODALITIES):
            continue                            # labels only: not a case
        if case_id in cases:
            raise _fail(folder, f"case {case_id!r} found again (also in {cases[case_id].folder})")
        cases[case_id] = BratsCaseFiles(case_id=case_id, paths={m: files.get(m) for m in BRATS_MODALITIES},
                                        seg=files.get("seg"), layout=layout, folder=folder)
    if not cases:
        raise _fail(root, "no BraTS case found (expected <case>/<case>_flair.nii[.gz], _t1, _t1ce, _t2, _seg, or the "
                          "BraTS 2023 names <case>-t2f, -t1n, -t1c, -t2w, -seg)")
    return [cases[k] for k in sorted(cases)]


# -- loading ------------------------------------------------------------------------------------------------------
@dataclass
class _Volume:
    path: str
    data: np.ndarray       # float32, NIfTI voxel axes (i, j, k), in the case's common orientation
    affine: np.ndarray
    zooms: Tuple[float, float, float]


def _reorient(path: str, data, affine, zooms, target_ornt) -> _Volume:
    """Permute/flip the voxel axes so that the image has orientation ``target_ornt`` (no resampling)."""
    from nibabel import orientations as nio

    try:
        current = nio.io_orientation(affine)
    except Exception as error:  # noqa: BLE001
        raise _fail(path, f"affine has no usable orientation ({error})") from error
    transform = nio.ornt_transform(current, target_ornt)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return _Volume(path, data, affine, zooms)
    new_data = np.ascontiguousarray(nio.apply_orientation(data, transform))
    new_affine = affine @ nio.inv_ornt_aff(transform, data.shape)
    new_zooms = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(transform):
        new_zooms[int(target)] = zooms[axis]
    return _Volume(path, new_data, new_affine, tuple(new_zooms))


def _check_labels(path: str, labels: np.ndarray, layout: str) -> np.ndarray:
    allowed = _LABEL_VALUES[layout]
    values = np.unique(labels)
    bad = values[~np.isin(values, allowed)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise _fail(path, f"label values [{shown}] outside {set(allowed)} of the BraTS {layout} layout")
    out = labels.astype(np.uint8)
    if layout == "2023":
        out[out == 3] = 4
    return out


def load_case(files: BratsCaseFiles, require_label: bool = False, orientation: str = "reference",
              max_voxels: Optional[int] = None) -> BratsRecord:
    """Read one case into a full-size, not yet normalised :class:`BratsRecord`.

    Every file is checked: readable (a truncated ``.nii.gz`` fails here), 3D (trailing axes of length 1 are
    dropped), finite, and, after reorientation (see the module docstring; ``orientation`` is ``"reference"`` or
    ``"canonical"``), of the same shape and affine (``np.allclose``, ``atol=1e-3``) as the case's first image file.
    Labels must lie in ``{0, 1, 2, 4}`` (``{0, 1, 2, 3}`` for the 2023 layout, 3 being stored as 4). Absent
    sequences are zeros with mask bit 0. With ``require_label`` a case without segmentation is an error.
    Before its voxels are read, every file's header must declare no more data than the file holds and at most
    ``max_voxels`` voxels (default: :func:`max_voxels_limit`).
    """
    from nibabel import orientations as nio

    limit = max_voxels_limit(max_voxels)
    if orientation not in ("reference", "canonical"):
        raise ValueError(f"orientation must be 'reference' or 'canonical', got {orientation!r}")
    if files.layout not in LAYOUT_SUFFIXES:
        raise _fail(files.case_id, f"unknown layout {files.layout!r}, expected one of {sorted(LAYOUT_SUFFIXES)}")
    present = [m for m in BRATS_MODALITIES if files.paths.get(m) is not None]
    if not present:
        raise _fail(files.case_id, "no image sequence (flair, t1, t1ce, t2) in the case")
    if require_label and files.seg is None:
        raise _fail(files.case_id, "no segmentation file, but labels are required (require_label=True)")

    volumes: Dict[str, _Volume] = {}
    reference: Optional[_Volume] = None
    target = nio.axcodes2ornt(("R", "A", "S")) if orientation == "canonical" else None
    for name in present + (["seg"] if files.seg is not None else []):
        path = os.fspath(files.paths[name] if name != "seg" else files.seg)
        data, affine, zooms = read_volume(path, limit)
        if target is None:
            try:
                target = nio.io_orientation(affine)
            except Exception as error:  # noqa: BLE001
                raise _fail(path, f"affine has no usable orientation ({error})") from error
        volume = _reorient(path, data, affine, zooms, target)
        if reference is None:
            reference = volume
        elif volume.data.shape != reference.data.shape:
            raise _fail(path, f"shape {volume.data.shape} differs from {reference.data.shape} of {reference.path}")
        elif not np.allclose(volume.affine, reference.affine, atol=_AFFINE_ATOL):
            raise _fail(path, f"affine {np.round(volume.affine, 4).tolist()} differs from "
                              f"{np.round(reference.affine, 4).tolist()} of {reference.path}")
        volumes[name] = volume

    shape_ijk = reference.data.shape
    image = np.zeros(shape_ijk[::-1] + (len(BRATS_MODALITIES),), dtype=np.float32)
    for channel, name in enumerate(BRATS_MODALITIES):
        if name in volumes:
            image[..., channel] = volumes[name].data.transpose(2, 1, 0)
    label = None
    if "seg" in volumes:
        label = _check_labels(volumes["seg"].path, volumes["seg"].data, files.layout).transpose(2, 1, 0)
        label = np.ascontiguousarray(label)
    record = BratsRecord(
        case_id=files.case_id,
        image=image,
        modality_mask=files.modality_mask,
        label=label,
        spacing=tuple(reversed(reference.zooms)),
        affine=reference.affine.copy(),
        original_shape=tuple(int(s) for s in image.shape[:3]),
        crop_start=(0, 0, 0),
    )
    try:
        record.validate()
    except BratsPreprocessError:
        raise
    except ValueError as error:
        raise BratsPreprocessError(str(error)) from error
    return record


# -- normalisation ------------------------------------------------------------------------------------------------
def _clip_level(volume: np.ndarray) -> Optional[float]:
    """The official clipping level: index of the last of ``int(max)`` histogram bins holding >= 50 voxels.

    ``None`` (no clipping) when ``max < 1`` (``int(max)`` would be 0 bins) or when no bin holds 50 voxels. Above
    ``HISTOGRAM_MAX_BINS`` the bins are capped and the level is that bin's lower edge in intensity units (the
    official bin index *is* approximately that edge when the minimum is 0).
    """
    top = float(volume.max())
    if top < 1.0:
        return None
    bins = int(top)
    capped = bins > HISTOGRAM_MAX_BINS
    counts, edges = np.histogram(volume, bins=HISTOGRAM_MAX_BINS if capped else bins)
    full = np.flatnonzero(counts >= HISTOGRAM_MIN_COUNT)
    if full.size == 0:
        return None
    index = int(full[-1])
    return float(edges[index]) if capped else float(np.float32(index))


def normalize_modality(volume: np.ndarray) -> np.ndarray:
    """One MRI sequence -> float32 z-scores inside the brain, background 0 (the official ``truncate``).

    1. Clip the intensities at the index of the last of ``int(max)`` histogram bins that holds at least 50 voxels.
    2. The background value is the corner voxel ``volume[0, 0, 0]`` (after clipping); every other voxel is brain.
    3. Brain voxels become ``(v - mean) / std`` over the brain, the background 0.

    Guards the official code lacks: no clipping when ``max < 1`` or when no bin holds 50 voxels (it crashes on
    both); at most ``HISTOGRAM_MAX_BINS`` (65 536) bins, for float volumes with huge maxima (see ``_clip_level``);
    the divisor is at least 1e-7 (a constant brain gives zeros rather than NaN); a volume that is all background is
    returned as zeros. Computed in float64. (The official second ``np.where`` re-tests the *centred* values against
    the corner value; with the usual zero background this is the same mask, up to voxels lying exactly at the mean.)
    """
    v = np.array(volume, dtype=np.float64)
    if v.ndim != 3:
        raise ValueError(f"normalize_modality expects a 3D volume, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("normalize_modality: the volume holds NaN or Inf")
    level = _clip_level(v)
    if level is not None:
        np.minimum(v, level, out=v)
    background = v[0, 0, 0]
    brain = v != background
    out = np.zeros(v.shape, dtype=np.float32)
    if not brain.any():
        return out
    values = v[brain]
    mean = values.mean()
    std = max(float(values.std()), 1e-7)
    out[brain] = ((values - mean) / std).astype(np.float32)
    return out


# -- cropping -----------------------------------------------------------------------------------------------------
def brain_bounding_box(record: BratsRecord) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """``(start, stop)`` of the box holding every non-zero voxel of the present modalities and every labelled
    voxel (so cropping never drops a label). Error naming the case when there is no such voxel."""
    mask = np.asarray(record.modality_mask).astype(bool)
    foreground = np.any(record.image[..., mask] != 0, axis=-1)
    if record.label is not None:
        foreground |= record.label > 0
    if not foreground.any():
        raise _fail(record.case_id, "no non-zero voxel in any present modality; cannot crop to the brain")
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(foreground.any(axis=other))
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return tuple(start), tuple(stop)


def crop_record(record: BratsRecord, start: Sequence[int], stop: Sequence[int]) -> BratsRecord:
    """The record cut to ``[start, stop)`` (D, H, W), ``crop_start`` composed with any earlier crop."""
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    original = record.original_shape if record.original_shape is not None else record.image.shape[:3]
    return replace(
        record,
        image=np.ascontiguousarray(record.image[box]),
        label=None if record.label is None else np.ascontiguousarray(record.label[box]),
        original_shape=tuple(int(s) for s in original),
        crop_start=tuple(int(c) + int(a) for c, a in zip(record.crop_start, start)),
    )


def preprocess(record: BratsRecord, crop_to_brain: bool = True, normalize: bool = True) -> BratsRecord:
    """Normalise every present modality on the full volume (:func:`normalize_modality`), then, with
    ``crop_to_brain``, crop image and labels to :func:`brain_bounding_box` (computed on the input, before
    normalisation), recording ``crop_start`` and ``original_shape``. Returns a new record."""
    mask = np.asarray(record.modality_mask).astype(bool)
    out = replace(record, image=record.image.astype(np.float32, copy=True),
                  original_shape=tuple(int(s) for s in (record.original_shape or record.image.shape[:3])))
    if crop_to_brain:
        start, stop = brain_bounding_box(record)
    if normalize:
        for channel in np.flatnonzero(mask):
            out.image[..., channel] = normalize_modality(record.image[..., channel])
    if crop_to_brain:
        out = crop_record(out, start, stop)
    return out


def uncrop(labels: np.ndarray, original_shape: Sequence[int], crop_start: Sequence[int], fill=0) -> np.ndarray:
    """Inverse of the crop for predictions: ``labels`` ``[d, h, w, ...]`` placed at ``crop_start`` in an array of
    ``original_shape`` (D, H, W; trailing axes kept) filled with ``fill``."""
    labels = np.asarray(labels)
    original_shape = tuple(int(s) for s in original_shape)
    crop_start = tuple(int(s) for s in crop_start)
    if labels.ndim < 3 or len(original_shape) != 3 or len(crop_start) != 3:
        raise ValueError(f"uncrop expects labels [d, h, w, ...] and 3 values for original_shape and crop_start, "
                         f"got {labels.shape}, {original_shape}, {crop_start}")
    if any(c < 0 or c + s > o for c, s, o in zip(crop_start, labels.shape[:3], original_shape)):
        raise ValueError(f"uncrop: a crop of shape {labels.shape[:3]} at {crop_start} does not fit in "
                         f"{original_shape}")
    out = np.full(original_shape + labels.shape[3:], fill, dtype=labels.dtype)
    out[tuple(slice(c, c + s) for c, s in zip(crop_start, labels.shape[:3]))] = labels
    return out
