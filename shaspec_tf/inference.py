"""Whole-volume inference for the ShaSpec segmenter: sliding windows, BraTS label maps and "ShaSpec*" post-processing.

The functions here use NumPy and SciPy only, plus the model's ``predict_on_batch`` (or ``__call__``), so they work
under any Keras backend. Arrays follow the package conventions: an image is ``[D, H, W, M]`` (M modalities, BraTS
order FLAIR, T1, T1ce, T2), probabilities are ``[D, H, W, 3]`` for the region channels ET, WT, TC (independent
sigmoids), and label maps hold BraTS values {0, 1 NCR/NET, 2 oedema, 4 enhancing}.

Defaults reproduce the official evaluation (``eval.py``): 80x160x160 tiles with overlap 1/3 (strides 54 and 107,
12 tiles on a 155x240x240 volume), a sigmoid per tile, a 0.5 threshold per channel and the label precedence
WT -> 2, TC -> 1, ET -> 4. The official code averages overlapping tiles with equal weights (``mode="constant"``);
the default here is the Gaussian blending of nnU-Net and MONAI (``mode="gaussian"``), which down-weights tile
borders.

Typical use::

    model = shaspec_tf.build_segmenter("paper")
    labels, prob = predict_case(model, image, [1, 1, 0, 1])          # T1ce missing
    labels = postprocess(labels, t1ce=raw_t1ce)                       # the paper's "ShaSpec*" row
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
from scipy import ndimage, special

__all__ = ["window_starts", "gaussian_importance_map", "sliding_window_predict", "probabilities_to_labels",
           "postprocess", "predict_case", "ROI_DIVISOR"]

# The segmenter's total stride along D, H, W: window sizes must be multiples of it (see models/masks.py).
ROI_DIVISOR = (16, 32, 32)
_IMPORTANCE_FLOOR = 1e-3  # MONAI's lower clamp of the Gaussian importance map


# ----------------------------------------------------------------------------------------------------------------
# Windows and weights
# ----------------------------------------------------------------------------------------------------------------
def window_starts(size: int, roi: int, overlap: float = 1 / 3) -> tuple:
    """Start indices of the windows of length ``roi`` that cover an axis of length ``size``.

    The stride is ``ceil(roi * (1 - overlap))`` and there are ``ceil((size - roi) / stride) + 1`` windows; a window
    that would run past the end is moved back so that it ends flush with the axis (the official ``predict_sliding``
    rule), so no window leaves the volume and every index is covered. An axis shorter than (or equal to) the window
    gives the single start 0: :func:`sliding_window_predict` pads such an axis with zeros up to ``roi``.

    >>> window_starts(155, 80), window_starts(240, 160)
    ((0, 54, 75), (0, 80))
    """
    size, roi = int(size), int(roi)
    if size < 1 or roi < 1:
        raise ValueError(f"window_starts needs size >= 1 and roi >= 1, got size={size} roi={roi}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= roi:
        return (0,)
    # Rounding first keeps e.g. 48 * (1 - 1/3) = 32.000000000000004 from giving a stride of 33.
    stride = max(1, math.ceil(round(roi * (1.0 - overlap), 9)))
    count = math.ceil((size - roi) / stride) + 1
    return tuple(sorted({min(i * stride, size - roi) for i in range(count)}))


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """The blending weights of one window, float32 of shape ``roi_size``.

    A separable Gaussian centred on the window's centre ``(roi - 1) / 2`` (so it is symmetric under flips), with
    ``sigma = sigma_scale * roi`` per axis, scaled to a maximum of 1 and clipped from below at 1e-3 so that every
    voxel keeps a positive weight (as MONAI's ``compute_importance_map``).
    """
    roi_size = tuple(int(r) for r in roi_size)
    scales = np.broadcast_to(np.asarray(sigma_scale, dtype=np.float64), (len(roi_size),))
    if np.any(scales <= 0):
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = np.ones((), dtype=np.float64)
    for axis, (roi, scale) in enumerate(zip(roi_size, scales)):
        x = np.arange(roi, dtype=np.float64) - (roi - 1) / 2.0
        profile = np.exp(-0.5 * (x / (scale * roi)) ** 2)
        weights = weights[..., None] * profile if axis else profile
    weights = weights / weights.max()
    return np.maximum(weights, _IMPORTANCE_FLOOR).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Sliding-window prediction
# ----------------------------------------------------------------------------------------------------------------
def _num_modalities(model) -> int:
    modalities = getattr(model, "modalities", None)
    try:
        return len(modalities) if modalities else 4
    except TypeError:
        return 4


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # not a Keras-backend tensor: anything with __array__
        return np.asarray(x)


def _model_logits(model, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    inputs = {"image": images, "modality_mask": masks}
    predict = getattr(model, "predict_on_batch", None)
    outputs = predict(inputs) if callable(predict) else model(inputs)
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"model outputs must hold 'logits', got keys {sorted(outputs)}")
        outputs = outputs["logits"]
    return _to_numpy(outputs)


def _validate_roi(roi_size) -> tuple:
    try:
        roi = tuple(int(r) for r in roi_size)
    except TypeError:
        raise ValueError(f"roi_size must be three integers (D, H, W), got {roi_size!r}") from None
    if len(roi) != 3 or any(r < 1 for r in roi) or any(int(r) != r for r in roi_size):
        raise ValueError(f"roi_size must be three positive integers (D, H, W), got {tuple(roi_size)}")
    if any(r % d for r, d in zip(roi, ROI_DIVISOR)):
        raise ValueError(f"roi_size {roi} must be divisible by {ROI_DIVISOR} (the segmenter's total stride)")
    if all(r == d for r, d in zip(roi, ROI_DIVISOR)):
        raise ValueError(f"roi_size {roi} gives a 1x1x1 bottleneck; use at least "
                         f"{(2 * ROI_DIVISOR[0],) + ROI_DIVISOR[1:]}")
    return roi


def _validate_inputs(image, modality_mask, num_modalities: int):
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[-1] != num_modalities:
        raise ValueError(f"image must be one volume [D, H, W, {num_modalities}] (modalities last, no batch axis), "
                         f"got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"image must hold real numbers, got dtype {image.dtype}")
    mask = np.asarray(modality_mask)
    if mask.shape != (num_modalities,):
        raise ValueError(f"modality_mask must have shape [{num_modalities}] (one volume), got {mask.shape}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"modality_mask must hold only 0 and 1, got {mask.tolist()}")
    if not np.any(mask):
        raise ValueError("modality_mask is all zero: at least one modality must be present")
    return image.astype(np.float32, copy=False), mask.astype(np.float32)


def _progress_bar(progress, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - tqdm ships with the project's environment
        raise ImportError("progress=True needs the 'tqdm' package") from err
    return tqdm(total=total, desc="sliding window", unit="window")


def _blend(model, image, mask, roi, overlap, weights, sw_batch_size, bar) -> np.ndarray:
    """Sliding-window probabilities of one (already validated) volume."""
    shape = image.shape[:3]
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    if padded != shape:  # zeros after the end (the official pad_image), cropped back below
        image = np.pad(image, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    starts = list(itertools.product(*(window_starts(p, r, overlap) for p, r in zip(padded, roi))))
    accum, total = None, np.zeros(padded, dtype=np.float32)
    for first in range(0, len(starts), sw_batch_size):
        batch = starts[first:first + sw_batch_size]
        slices = [tuple(slice(s, s + r) for s, r in zip(start, roi)) for start in batch]
        tiles = np.stack([image[sl] for sl in slices])
        logits = _model_logits(model, tiles, np.repeat(mask[None], len(batch), axis=0))
        if logits.ndim != 5 or logits.shape[:4] != (len(batch),) + roi:
            raise ValueError(f"model logits must have shape [batch, {roi[0]}, {roi[1]}, {roi[2]}, classes] for "
                             f"input tiles {tiles.shape}, got {logits.shape}")
        prob = special.expit(logits.astype(np.float32, copy=False))
        if accum is None:
            accum = np.zeros(padded + (prob.shape[-1],), dtype=np.float32)
        for sl, p in zip(slices, prob):
            accum[sl] += p * weights[..., None]
            total[sl] += weights
        if bar is not None:
            bar.update(len(batch))
    accum /= total[..., None]
    return accum[:shape[0], :shape[1], :shape[2]]


def sliding_window_predict(model, image, modality_mask, roi_size=(80, 160, 160), overlap: float = 1 / 3,
                           mode: str = "gaussian", sigma_scale: float = 0.125, sw_batch_size: int = 4,
                           tta_flips: bool = False, progress: bool = False) -> np.ndarray:
    """Region probabilities ``float32 [D, H, W, C]`` (C = 3: ET, WT, TC) of ONE volume of any size.

    Args:
        model: a segmenter, called as ``model.predict_on_batch({"image": [b, *roi_size, M], "modality_mask":
            [b, M]})`` (or ``model(...)`` when it has no ``predict_on_batch``), returning ``{"logits": [b, *roi_size,
            C]}`` or the logits themselves.
        image: ``[D, H, W, M]`` float (no batch axis; M = ``len(model.modalities)``, 4 when the model does not say).
        modality_mask: ``[M]`` of 0/1, at least one 1. Absent modalities are zeroed by the model itself.
        roi_size: the window ``(D, H, W)``, divisible by (16, 32, 32) with more than one bottleneck voxel. An axis
            shorter than the window is padded with zeros after its end and cropped back.
        overlap: fraction of a window shared with the next one along each axis (see :func:`window_starts`).
        mode: ``"gaussian"`` weights each tile by :func:`gaussian_importance_map`; ``"constant"`` averages tiles
            with equal weights (the official ``predict_sliding``). Sigmoids are taken per tile, before blending.
        sigma_scale: Gaussian sigma as a fraction of the window size (nnU-Net and MONAI: 1/8).
        sw_batch_size: how many windows go through the model per call.
        tta_flips: average over the 8 combinations of flipping the D, H and W axes (flip the input, predict, flip
            the prediction back); 8 times the work.
        progress: show a tqdm bar over the windows.
    """
    image, mask = _validate_inputs(image, modality_mask, _num_modalities(model))
    roi = _validate_roi(roi_size)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if isinstance(sw_batch_size, bool) or int(sw_batch_size) != sw_batch_size or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
    sw_batch_size = int(sw_batch_size)
    weights = (gaussian_importance_map(roi, sigma_scale) if mode == "gaussian"
               else np.ones(roi, dtype=np.float32))

    flips = [axes for n in range(4) for axes in itertools.combinations(range(3), n)] if tta_flips else [()]
    per_pass = math.prod(len(window_starts(max(s, r), r, overlap)) for s, r in zip(image.shape[:3], roi))
    bar = _progress_bar(progress, per_pass * len(flips))
    try:
        result = None
        for axes in flips:
            flipped = np.ascontiguousarray(np.flip(image, axes)) if axes else image
            prob = _blend(model, flipped, mask, roi, overlap, weights, sw_batch_size, bar)
            prob = np.flip(prob, axes) if axes else prob
            result = prob.copy() if result is None else result + prob
    finally:
        if bar is not None:
            bar.close()
    if len(flips) > 1:
        result /= np.float32(len(flips))
    return np.ascontiguousarray(result, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Label maps and post-processing
# ----------------------------------------------------------------------------------------------------------------
def probabilities_to_labels(prob, threshold: float = 0.5) -> np.ndarray:
    """BraTS label map ``uint8 [D, H, W]`` from region probabilities ``[D, H, W, 3]`` (ET, WT, TC).

    A region is on where its probability exceeds ``threshold`` (strictly: the official ``np.around`` sends 0.5 to
    0). Labels are written in the official order, later rules overwriting earlier ones: WT -> 2, then TC -> 1, then
    ET -> 4. So a voxel with ET on is 4 whatever the other channels say, TC without ET is 1, WT alone is 2.
    """
    prob = np.asarray(prob)
    if prob.ndim != 4 or prob.shape[-1] != 3:
        raise ValueError(f"prob must be [D, H, W, 3] (ET, WT, TC), got shape {prob.shape}")
    on = prob > threshold
    labels = np.zeros(prob.shape[:3], dtype=np.uint8)
    labels[on[..., 1]] = 2
    labels[on[..., 2]] = 1
    labels[on[..., 0]] = 4
    return labels


def _kmeans_1d(values, weights, clusters, attempts, iterations, eps, rng):
    """Weighted 1-D Lloyd k-means (random initial centres in the data range, best of ``attempts`` by
    compactness, an empty cluster restarts at the point farthest from its centre). Returns (centres, assignment)."""
    lo, hi = float(values.min()), float(values.max())
    best = None
    for _ in range(attempts):
        centres = np.sort(rng.uniform(lo, hi, size=clusters))
        for _ in range(iterations):
            assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
            new = centres.copy()
            for j in range(clusters):
                member = assign == j
                w = weights[member].sum()
                if w > 0:
                    new[j] = np.dot(weights[member], values[member]) / w
                else:
                    far = int(np.argmax(np.abs(values - new[assign])))
                    new[j] = values[far]
                    assign[far] = j
            shift = np.max(np.abs(new - centres))
            centres = new
            if shift <= eps:
                break
        assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        compactness = float(np.dot(weights, (values - centres[assign]) ** 2))
        if best is None or compactness < best[0]:
            best = (compactness, centres, assign)
    return best[1], best[2]


def postprocess(labels, t1ce=None, *, remove_components: bool = True, min_component_size: int = 2000,
                min_component_fraction: float = 0.1, low_slice_max: int | None = 25, slice_axis: int = 0,
                connectivity: int = 2, et_min_voxels: int = 500, kmeans_et_wt_ratio: float = 0.12,
                kmeans_component_ratio: float = 0.05, kmeans_component_et_sum: float = 450,
                kmeans_max_ncr: int = 10000, kmeans_clusters: int = 3, kmeans_attempts: int = 3,
                kmeans_iterations: int = 10, kmeans_eps: float = 1.0, seed: int = 0) -> np.ndarray:
    """The official "ShaSpec*" post-processing (``postprocess.py``) of a BraTS label map ``[D, H, W]``.

    Returns a new ``uint8`` array; ``labels`` is left untouched. Defaults are the official thresholds.

    1. Connected components of the tumour (labels >= 1) with ``connectivity=2``: the 18-neighbourhood (faces and
       edges, not corners; ``scipy.ndimage.generate_binary_structure(3, 2)``). With ``remove_components``, a
       component is deleted (set to 0) when its size is below ``min(min_component_size, min_component_fraction *
       largest component)``, or when all of its voxels have an index <= ``low_slice_max`` along ``slice_axis``
       (``None`` disables this rule). The official rule reads axis 2 of the NIfTI array (240x240x155, the axial
       slice index k); our arrays are ``[D, H, W]`` = NIfTI ``(k, j, i)`` transposed, so that axis is our axis 0,
       the default.
    2. K-means NCR relabel, only when ``t1ce`` (``[D, H, W]``, same axes as ``labels``) is given. For each kept
       component, when the global ratio #ET / #tumour voxels < ``kmeans_et_wt_ratio`` and, with label *values*
       summed as in the official code (an ET voxel counts 4), the component's ET sum / label sum <
       ``kmeans_component_ratio`` and its ET sum < ``kmeans_component_et_sum``, and the current #NCR <
       ``kmeans_max_ncr``: cluster the T1ce intensities of the component's oedema (label 2), together with the
       zeros that the official code puts everywhere else, into ``kmeans_clusters`` clusters; the second-brightest
       cluster's oedema voxels become NCR (1). The official code used OpenCV's k-means with random centres;
       this is a NumPy 1-D k-means with the same stopping rule (``kmeans_iterations``, ``kmeans_eps``, best of
       ``kmeans_attempts``) seeded by ``seed``, so it is deterministic but need not match a given OpenCV run. The
       official code relabels every voxel of that cluster, including those outside the oedema when 0 falls in
       it; here only the component's oedema is relabelled, which is the same thing whenever 0 is the darkest
       value, as it is for the raw, non-negative T1ce the rule was designed for. Pass the raw T1ce, not a
       z-scored one (whose zero is mid-range).
    3. If fewer than ``et_min_voxels`` ET voxels remain, every ET voxel (4) becomes NCR (1).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a [D, H, W] label map, got shape {labels.shape}")
    if not np.all(np.isin(labels, (0, 1, 2, 4))):
        raise ValueError(f"labels must hold BraTS values 0, 1, 2, 4, got {np.unique(labels)[:8].tolist()}")
    if t1ce is not None:
        t1ce = np.asarray(t1ce)
        if t1ce.shape != labels.shape:
            raise ValueError(f"t1ce must have the label map's shape {labels.shape}, got {t1ce.shape}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    if not 0 <= slice_axis < 3:
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    out = labels.astype(np.uint8, copy=True)

    components, count = ndimage.label(out >= 1, structure=ndimage.generate_binary_structure(3, connectivity))
    if count:
        flat = components.ravel()
        sizes = np.bincount(flat, minlength=count + 1)
        boxes = ndimage.find_objects(components)
        limit = min(min_component_size, min_component_fraction * sizes[1:].max())
        remove = np.zeros(count + 1, dtype=bool)
        if t1ce is not None:
            et_count = np.bincount(flat, weights=(out == 4).ravel(), minlength=count + 1)
            ncr_count = np.bincount(flat, weights=(out == 1).ravel(), minlength=count + 1)
            value_sum = np.bincount(flat, weights=out.ravel(), minlength=count + 1)
            global_ratio = et_count[1:].sum() / sizes[1:].sum()
            ncr_now = float(ncr_count[1:].sum())
            rng = np.random.default_rng(seed)
        for i in range(1, count + 1):
            box = boxes[i - 1]
            low = low_slice_max is not None and box[slice_axis].stop - 1 <= low_slice_max
            if remove_components and (sizes[i] < limit or low):
                remove[i] = True
                if t1ce is not None:
                    ncr_now -= ncr_count[i]
                continue
            if t1ce is None:
                continue
            et_sum = 4.0 * et_count[i]
            if not (global_ratio < kmeans_et_wt_ratio and et_sum / value_sum[i] < kmeans_component_ratio
                    and et_sum < kmeans_component_et_sum and ncr_now < kmeans_max_ncr):
                continue
            edema = (components[box] == i) & (out[box] == 2)
            if not edema.any():
                continue
            values = t1ce[box][edema].astype(np.float64)
            weights = np.ones_like(values)
            zeros = out.size - values.size
            if zeros:
                values, weights = np.append(values, 0.0), np.append(weights, float(zeros))
            centres, assign = _kmeans_1d(values, weights, kmeans_clusters, kmeans_attempts, kmeans_iterations,
                                         kmeans_eps, rng)
            centres = centres.copy()
            centres[np.argmax(centres)] = centres.min()
            chosen = assign[:int(edema.sum())] == np.argmax(centres)
            target = out[box]
            relabel = np.zeros_like(edema)
            relabel[edema] = chosen
            target[relabel] = 1
            ncr_now += float(chosen.sum())
        out[remove[components]] = 0

    if np.count_nonzero(out == 4) < et_min_voxels:
        out[out == 4] = 1
    return out


def predict_case(model, image, modality_mask, *, threshold: float = 0.5, postprocess_options: dict | None = None,
                 **kwargs):
    """``(labels uint8 [D, H, W], probabilities float32 [D, H, W, 3])`` for one volume.

    ``kwargs`` go to :func:`sliding_window_predict` (``roi_size``, ``overlap``, ``mode``, ``tta_flips``, ...). The
    labels come from :func:`probabilities_to_labels`; with ``postprocess_options`` (a dict, ``{}`` for the
    defaults, possibly holding ``t1ce``) they then go through :func:`postprocess`.
    """
    prob = sliding_window_predict(model, image, modality_mask, **kwargs)
    labels = probabilities_to_labels(prob, threshold)
    if postprocess_options is not None:
        labels = postprocess(labels, **postprocess_options)
    return labels, prob
