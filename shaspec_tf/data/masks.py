"""The modality-presence mask on the data side: the mask rule, sampling for training, naming and enumerating
subsets."""
from __future__ import annotations

import itertools

import numpy as np


def check_modality_mask(mask, modalities, where: str = "") -> np.ndarray:
    """The mask rule, once for the data side: ``M`` values (one per modality, in order), each 0 or 1, at least one 1.

    ``modalities``: the modality names (or their number). Returns the mask as a 1-D array; a one-line ``ValueError``
    (prefixed with ``where``, e.g. ``"case 'x'"``) when it breaks the rule. The model's graph-side check is
    :func:`shaspec_tf.models.validate_modality_mask` (Keras only)."""
    m = modalities if isinstance(modalities, int) else len(modalities)
    prefix = f"{where}: " if where else ""
    array = np.asarray(mask)
    try:
        ok = array.shape == (m,) and bool(np.all((array == 0) | (array == 1)))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{prefix}modality_mask must be {m} values (one per modality), each 0 or 1, got "
                         f"{array.tolist() if hasattr(array, 'tolist') else mask!r}")
    if not array.any():
        raise ValueError(f"{prefix}all-zero modality mask: at least one modality must be present")
    return array


def subset_name(mask, modalities) -> str:
    """``[0, 1, 0, 1]`` with BraTS modalities -> ``"t1+t2"`` (the key used in evaluation tables)."""
    mask = check_modality_mask(np.asarray(mask).reshape(-1), modalities, "subset name")
    return "+".join(name for bit, name in zip(mask, modalities) if bit)


def all_subsets(modalities):
    """Every non-empty subset, as ``(name, mask)`` pairs: singles first, the full set last (2^M - 1 entries)."""
    m = len(modalities)
    subsets = []
    for k in range(1, m + 1):
        for present in itertools.combinations(range(m), k):
            mask = np.zeros(m, dtype=np.float32)
            mask[list(present)] = 1.0
            subsets.append((subset_name(mask, modalities), mask))
    return subsets


def resolve_subsets(subsets, modalities) -> list:
    """``None`` | names | 0/1 masks | (name, mask) pairs -> ``(name, mask)`` pairs in ``all_subsets`` order."""
    canonical = all_subsets(modalities)
    if subsets is None:
        return canonical
    order = {name: k for k, (name, _) in enumerate(canonical)}
    chosen = {}
    for item in subsets:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            item = item[1]
        if isinstance(item, str):
            parts = item.split("+")
            unknown = [p for p in parts if p not in modalities]
            if unknown or not parts:
                raise ValueError(f"subset {item!r} names unknown modalities {unknown}; "
                                 f"modalities are {list(modalities)}")
            mask = np.array([m in parts for m in modalities], dtype=np.float32)
        else:
            mask = np.asarray(item, dtype=np.float32).reshape(-1)
            if mask.shape != (len(modalities),):
                raise ValueError(f"subset mask {item!r} does not have one entry per modality {list(modalities)}")
            mask = (mask > 0).astype(np.float32)
        name = subset_name(mask, modalities)
        chosen[name] = canonical[order[name]]
    if not chosen:
        raise ValueError("no subsets to evaluate")
    return sorted(chosen.values(), key=lambda pair: order[pair[0]])


def random_modality_masks(rng: np.random.Generator, batch: int, num_modalities: int,
                          drop_rate: float = 1.0) -> np.ndarray:
    """Per-sample masks by the official dropout law: keep ``k ~ U{1..M}`` modalities chosen at random.

    ``drop_rate`` in [0, 1] is the probability that a sample is dropped this way at all (1: always, as the official
    ``--mode=random``; 0: every modality kept); ramping it up from 0 gives the curriculum the authors suggest.
    """
    masks = np.ones((batch, num_modalities), dtype=np.float32)
    for row in masks:
        if rng.random() < drop_rate:
            keep = rng.integers(1, num_modalities + 1)
            row[:] = 0.0
            row[rng.choice(num_modalities, size=keep, replace=False)] = 1.0
    return masks
