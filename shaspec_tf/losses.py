"""ShaSpec objectives (paper Eq. 9): task + alpha * distribution alignment + beta * domain classification.

Backend-agnostic (``keras.ops``). Every auxiliary loss takes the modality-presence mask ``[B, M]``; with
``masked=True`` (the paper's rule, the default) absent modalities contribute nothing, with ``masked=False`` they count
as in the official code (zero-filled inputs included).
"""
from __future__ import annotations

from keras import ops

ALPHA = 0.1   # distribution alignment (shared features)
BETA = 0.02   # domain classification (specific features)


def soft_dice_loss(y_true, logits, smooth: float = 1.0):
    """Soft Dice on sigmoid probabilities, per region channel: ``1 - mean_b 2 sum(p t) / (sum p + sum t + smooth)``,
    averaged over channels (official ``DiceLoss4BraTS``). ``y_true`` and ``logits`` are ``[B, ..., K]``."""
    p = ops.sigmoid(ops.cast(logits, "float32"))
    t = ops.cast(y_true, "float32")
    axes = tuple(range(1, len(p.shape) - 1))
    num = 2.0 * ops.sum(p * t, axis=axes)
    den = ops.sum(p, axis=axes) + ops.sum(t, axis=axes) + smooth
    return ops.mean(1.0 - ops.mean(num / den, axis=0))


def region_bce_loss(y_true, logits):
    """Binary cross-entropy with logits, mean per region channel, summed over channels (official
    ``BCELoss4BraTS``)."""
    x = ops.cast(logits, "float32")
    t = ops.cast(y_true, "float32")
    per_voxel = ops.relu(x) - x * t + ops.log1p(ops.exp(-ops.abs(x)))
    axes = tuple(range(len(x.shape) - 1))
    return ops.sum(ops.mean(per_voxel, axis=axes))


def segmentation_loss(y_true, logits):
    """Dice + BCE over the region channels, the official segmentation task loss."""
    return soft_dice_loss(y_true, logits) + region_bce_loss(y_true, logits)


def classification_loss(labels, logits):
    """Mean softmax cross-entropy; ``labels`` are integer classes ``[B]``."""
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    return ops.mean(ops.sparse_categorical_crossentropy(labels, ops.cast(logits, "float32"), from_logits=True))


def alignment_pairs(num_modalities: int, kind: str = "cyclic"):
    """Modality pairs compared by the alignment loss: ``cyclic`` ((0,1), (1,2), ..., (M-1,0); the official four pairs
    for BraTS; one pair when M = 2) or ``all`` (every unordered pair)."""
    if kind not in ("cyclic", "all"):
        raise ValueError(f"unknown pair kind {kind!r}: expected cyclic or all")
    if num_modalities < 2:
        return []
    if kind == "all" or num_modalities == 2:
        return [(i, j) for i in range(num_modalities) for j in range(i + 1, num_modalities)]
    return [(i, (i + 1) % num_modalities) for i in range(num_modalities)]


def distribution_alignment_loss(shared, mask, masked: bool = True, pairs: str = "cyclic"):
    """L1 distance between shared features of modality pairs (paper Eq. 8 with p = 1).

    ``shared`` is ``[B, M, ...]``. Per pair, the mean absolute difference per sample; summed over pairs and averaged
    over the batch, which equals the official ``sum_pairs L1Loss(r_i, r_j)`` when every modality is present.
    With ``masked=True`` a pair counts for a sample only when both of its modalities are present.
    """
    shared = ops.cast(shared, "float32")
    m = ops.cast(mask, "float32")
    axes = tuple(range(1, len(shared.shape) - 1))
    total = ops.zeros(())
    for i, j in alignment_pairs(shared.shape[1], pairs):
        dist = ops.mean(ops.abs(shared[:, i] - shared[:, j]), axis=axes)
        weight = m[:, i] * m[:, j] if masked else ops.ones_like(dist)
        total = total + ops.mean(dist * weight)
    return total


def domain_classification_loss(domain_logits, mask, masked: bool = True):
    """Cross-entropy of the domain classifier on each modality's specific feature (paper Eq. 5).

    ``domain_logits`` is ``[B, M, M]``; the target of slot ``i`` is modality ``i``. With ``masked=True`` the mean runs
    over present modalities only; otherwise over every slot, as the official code.
    """
    logits = ops.cast(domain_logits, "float32")
    num_modalities = logits.shape[-1]
    log_probs = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
    ce = -ops.sum(log_probs * ops.eye(num_modalities, dtype="float32"), axis=-1)  # [B, M]
    if not masked:
        return ops.mean(ce)
    m = ops.cast(mask, "float32")
    return ops.sum(ce * m) / ops.maximum(ops.sum(m), 1.0)


def shaspec_loss(task_loss, shared, domain_logits, mask, alpha: float = ALPHA, beta: float = BETA,
                 masked: bool = True, pairs: str = "cyclic"):
    """The total objective and its terms: ``{"total", "task", "alignment", "domain"}``."""
    alignment = distribution_alignment_loss(shared, mask, masked=masked, pairs=pairs)
    domain = domain_classification_loss(domain_logits, mask, masked=masked)
    total = task_loss + alpha * alignment + beta * domain
    return {"total": total, "task": task_loss, "alignment": alignment, "domain": domain}
