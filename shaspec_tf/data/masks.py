"""The modality-presence mask on the data side: sampling for training, naming and enumerating subsets."""
from __future__ import annotations

import itertools

import numpy as np


def subset_name(mask, modalities) -> str:
    """``[0, 1, 0, 1]`` with BraTS modalities -> ``"t1+t2"`` (the key used in evaluation tables)."""
    names = [name for bit, name in zip(np.asarray(mask).reshape(-1), modalities) if bit]
    if not names:
        raise ValueError("an all-zero modality mask has no subset name: at least one modality must be present")
    return "+".join(names)


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
