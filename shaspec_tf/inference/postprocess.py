"""BraTS label maps from region probabilities, and the official "ShaSpec*" post-processing (NumPy and SciPy, on the
host)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["probabilities_to_labels", "postprocess"]


def probabilities_to_labels(prob, threshold: float = 0.5) -> np.ndarray:
    """BraTS label map ``uint8 [D, H, W]`` from region probabilities ``[D, H, W, 3]`` (ET, WT, TC).

    A region is on where its probability exceeds ``threshold`` (strictly: the official ``np.around`` sends 0.5 to
    0). Labels are written in the official order, later rules overwriting earlier ones: WT -> 2, then TC -> 1, then
    ET -> 4. So a voxel with ET on is 4 whatever the other channels say, TC without ET is 1, WT alone is 2.
    """
    prob = np.asarray(prob)
    if prob.ndim != 4 or prob.shape[-1] != 3:
        raise ValueError(f"prob must be [D, H, W, 3] (ET, WT, TC), got shape {prob.shape}")
    from shaspec_tf.taskspec.constants import BRATS_LABEL_PRECEDENCE

    on = prob > threshold
    labels = np.zeros(prob.shape[:3], dtype=np.uint8)
    for channel, value in BRATS_LABEL_PRECEDENCE:
        labels[on[..., channel]] = value
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
