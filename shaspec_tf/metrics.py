"""Evaluation metrics on NumPy arrays (the training losses live in ``shaspec_tf.losses``)."""
from __future__ import annotations

import numpy as np

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


def region_dice(logits, regions, names=("ET", "WT", "TC"), threshold: float = 0.0) -> dict:
    """Dice per region channel of ``[..., K]`` logits (thresholded at ``threshold``, i.e. p = 0.5) against
    ``[..., K]`` binary regions, pooled over the batch."""
    logits = np.asarray(logits)
    regions = np.asarray(regions)
    return {name: dice(logits[..., k] > threshold, regions[..., k] > 0.5) for k, name in enumerate(names)}
