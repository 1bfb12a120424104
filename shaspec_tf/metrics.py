"""Evaluation metrics on NumPy arrays (the training losses live in ``shaspec_tf.losses``)."""
from __future__ import annotations

import numpy as np

from shaspec_tf.taskspec.constants import BRATS2023_LABEL_REGIONS, BRATS_LABEL_REGIONS, BRATS_REGIONS  # noqa: F401

BRATS_EMPTY_POLICY = "Dice of an empty prediction against an empty reference is 1 (the BraTS convention)"


def dice(prediction, reference, empty_value: float = 1.0) -> float:
    """Dice of two binary arrays; ``empty_value`` when both are empty (BraTS scores empty-vs-empty as 1)."""
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    total = p.sum() + r.sum()
    if total == 0:
        return float(empty_value)
    return float(2.0 * np.logical_and(p, r).sum() / total)


def region_dice(logits, regions, names=None, threshold: float = 0.0) -> dict:
    """Dice per region channel of ``[..., K]`` logits (thresholded at ``threshold``, i.e. p = 0.5) against
    ``[..., K]`` binary regions, pooled over the batch (``names``: the channels' names, default ET, WT, TC)."""
    names = BRATS_REGIONS if names is None else names
    logits = np.asarray(logits)
    regions = np.asarray(regions)
    return {name: dice(logits[..., k] > threshold, regions[..., k] > 0.5) for k, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------------------
# Surface distance (HD95), BraTS label-map regions, classification accuracy.
# ---------------------------------------------------------------------------------------------------------------------

HD95_EMPTY_POLICY = ("HD95: both masks empty -> 0 mm; exactly one mask empty -> undefined (NaN, left out of means) "
                     "unless a fixed penalty is given (e.g. 373.13 mm, the diagonal of the 240 x 240 x 155 BraTS "
                     "volume; the official BraTS package reports 373)")
HD95_METHODS = ("pooled", "max")
HD95_DEFAULT_METHOD = "pooled"
HD95_POOLED_METHOD = ("HD95 (pooled, the convention of the official BraTS evaluation package `brats-evaluation` / "
                      "panoptica, and of medpy's `hd95`): the 95th percentile (linear interpolation) of the "
                      "surface-to-surface distances in mm of both directions pooled; surface = mask voxels with a face "
                      "neighbour outside the mask")
HD95_MAX_METHOD = ("HD95 (max, the convention of MONAI's `compute_hausdorff_distance(percentile=95)`): the larger of "
                   "the two directed 95th percentiles (linear interpolation) of the surface-to-surface distances in "
                   "mm; surface = mask voxels with a face neighbour outside the mask")
HD95_METHOD = HD95_POOLED_METHOD  # the default's text


def hd95_method_text(method: str) -> str:
    """The report line that says which HD95 convention ``method`` is."""
    return {"pooled": HD95_POOLED_METHOD, "max": HD95_MAX_METHOD}[_check_method(method)]


def _check_method(method: str) -> str:
    if method not in HD95_METHODS:
        raise ValueError(f"HD95 method must be one of {', '.join(HD95_METHODS)}, got {method!r}")
    return method


BRATS_CHALLENGE_HD95_PENALTY = 373.12866  # mm: the 240 x 240 x 155 volume's diagonal, for exactly one mask empty

# BRATS_LABEL_REGIONS (BraTS 2018-2021 label maps: 1 = necrotic/non-enhancing core, 2 = oedema, 4 = enhancing
# tumour) and BRATS2023_LABEL_REGIONS (3 = enhancing tumour) are the BraTS task's, imported above.


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: voxels of the mask with at least one face neighbour (connectivity 1) outside
    it; voxels on the array border count as boundary (the outside of the array is background)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(prediction, reference, spacing=None):
    """Directed surface distances ``(prediction -> reference, reference -> prediction)`` in the units of ``spacing``.

    Each boundary voxel of one mask gets the Euclidean distance to the nearest boundary voxel of the other, computed
    with ``scipy.ndimage.distance_transform_edt(~other_surface, sampling=spacing)``. Both masks must be non-empty.
    The work is done on the bounding box of the union of both masks, which gives the same surfaces and distances as the
    full array (every voxel outside the box is background, and every surface voxel lies inside it), only faster.
    """
    from scipy import ndimage

    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks")
    spacing = _spacing(spacing, p.ndim)
    union = p | r
    box = []
    for axis in range(p.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(p.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    box = tuple(box)
    p_surface, r_surface = _surface(p[box]), _surface(r[box])
    to_reference = ndimage.distance_transform_edt(~r_surface, sampling=spacing)[p_surface]
    to_prediction = ndimage.distance_transform_edt(~p_surface, sampling=spacing)[r_surface]
    return to_reference, to_prediction


def _spacing(spacing, ndim: int) -> tuple:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (ndim,)))
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"voxel spacing must be positive, got {spacing}")
    return spacing


def hd95(prediction, reference, spacing=(1.0, 1.0, 1.0), empty_penalty: float | None = None,
         percentile: float = 95.0, method: str = HD95_DEFAULT_METHOD) -> float:
    """95th-percentile Hausdorff distance between two binary masks, in millimetres (the units of ``spacing``).

    Surfaces are the boundary voxels of each mask (mask voxels with a face neighbour outside the mask); every surface
    voxel of one mask gets the Euclidean distance (``distance_transform_edt`` with ``sampling=spacing``) to the nearest
    surface voxel of the other.

    ``method="pooled"`` (default): the distances of both directions are pooled and one 95th percentile (NumPy's
    linear interpolation) taken over the pool, as the official BraTS evaluation package does (``brats-evaluation``
    on PyPI, whose global HD95 is panoptica's, the same formula as medpy's ``hd95``; pinned to that package's
    numbers in ``tests/test_metrics_official.py``). ``method="max"``: the larger of the two directed 95th
    percentiles, MONAI's ``compute_hausdorff_distance(percentile=95)`` convention. ``"max"`` is never smaller than
    ``"pooled"``; both are symmetric in their arguments.

    The official package differs from this function only around the formula: its global HD95 is in voxels whatever
    the voxel spacing (this function uses ``spacing``: the same on 1 mm BraTS data); two non-empty masks with no
    voxel in common score infinite there (373 in its tables), their real distance here; exactly one mask empty is
    infinite (373) there, ``NaN`` or ``empty_penalty`` here; both empty is ``NaN`` there, 0 here.

    Empty policy (:data:`HD95_EMPTY_POLICY`): both masks empty -> ``0.0``; exactly one empty -> ``NaN`` (undefined),
    or ``empty_penalty`` when given (e.g. :data:`BRATS_CHALLENGE_HD95_PENALTY` = 373.13 mm, or the volume diagonal).
    """
    _check_method(method)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return 0.0
    if not p_any or not r_any:
        return float("nan") if empty_penalty is None else float(empty_penalty)
    forward, backward = surface_distances(p, r, spacing)
    if method == "max":
        return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))
    return float(np.percentile(np.concatenate([forward, backward]), percentile))


def region_masks(labels, regions=None) -> dict:
    """BraTS label map -> ``{"ET": bool mask, "WT": ..., "TC": ...}`` (``regions`` maps a name to its label values;
    default :data:`BRATS_LABEL_REGIONS`: WT = {1, 2, 4}, TC = {1, 4}, ET = {4})."""
    labels = np.asarray(labels)
    regions = BRATS_LABEL_REGIONS if regions is None else regions
    return {name: np.isin(labels, np.asarray(values)) for name, values in regions.items()}


def region_metrics(labels_pred, labels_true, spacing=(1.0, 1.0, 1.0), empty_penalty: float | None = None,
                   regions=None, hd_method: str = HD95_DEFAULT_METHOD) -> dict:
    """Dice and HD95 per BraTS region of two label maps (uint8 with values {0, 1, 2, 4}).

    Returns ``{"ET": {"dice": ..., "hd95": ...}, "WT": {...}, "TC": {...}}`` with WT = {1, 2, 4}, TC = {1, 4},
    ET = {4} (pass ``regions=BRATS2023_LABEL_REGIONS`` for the BraTS 2023 labels, where ET = 3). Dice follows
    :data:`BRATS_EMPTY_POLICY` (empty vs empty = 1, empty vs non-empty = 0); HD95 follows :data:`HD95_EMPTY_POLICY`
    and ``hd_method`` (:func:`hd95`: ``"pooled"``, the official BraTS package's, or ``"max"``, MONAI's).
    """
    pred = np.asarray(labels_pred)
    true = np.asarray(labels_true)
    if pred.shape != true.shape:
        raise ValueError(f"prediction label map shape {pred.shape} differs from reference shape {true.shape}")
    pred_masks = region_masks(pred, regions)
    true_masks = region_masks(true, regions)
    return {name: {"dice": dice(pred_masks[name], true_masks[name]),
                   "hd95": hd95(pred_masks[name], true_masks[name], spacing, empty_penalty=empty_penalty,
                                method=hd_method)}
            for name in true_masks}


def accuracy(pred_classes, labels) -> float:
    """Fraction of correct class predictions. ``pred_classes`` holds class indices with the shape of ``labels``, or
    scores/logits with one more trailing axis (then its argmax is taken)."""
    pred = np.asarray(pred_classes)
    labels = np.asarray(labels)
    if pred.ndim == labels.ndim + 1:
        pred = pred.argmax(axis=-1)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions of shape {pred.shape} do not match labels of shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return float(np.mean(pred == labels))
