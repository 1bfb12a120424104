"""Toy multi-modal volumes for demos and tests: a brain-like ellipsoid with a spherical tumour whose sub-regions
show in different modalities, so that a missing modality costs information (as in BraTS):

* oedema: bright in FLAIR and T2;
* enhancing rim: bright in T1ce only;
* necrotic core: dark in T1 and T1ce.

Labels follow BraTS (1 necrosis, 2 oedema, 4 enhancing); targets are the region channels ET, WT, TC. The realistic
phantom generator (MNI152 anatomy, NIfTI cases) lives in the data pipeline; this one is NumPy only and instant.
"""
from __future__ import annotations

import numpy as np

# Mean intensity per tissue (background, brain, oedema, enhancing, necrosis) for FLAIR, T1, T1ce, T2.
_CONTRAST = np.array([
    [0.0, 1.0, 2.2, 1.4, 1.2],   # FLAIR
    [0.0, 1.0, 0.8, 1.0, 0.3],   # T1
    [0.0, 1.0, 0.8, 2.5, 0.3],   # T1ce
    [0.0, 1.0, 2.0, 1.2, 1.8],   # T2
], dtype=np.float32)


def regions_from_labels(labels: np.ndarray) -> np.ndarray:
    """BraTS labels {0, 1, 2, 4} -> float32 region channels ``[..., 3]`` in the order ET, WT, TC."""
    et = labels == 4
    wt = labels > 0
    tc = (labels == 1) | (labels == 4)
    return np.stack([et, wt, tc], axis=-1).astype(np.float32)


def toy_case(rng: np.random.Generator, shape=(32, 64, 64)):
    """One case: ``image`` float32 ``[D, H, W, 4]`` (FLAIR, T1, T1ce, T2; z-scored inside the brain) and BraTS
    ``labels`` uint8 ``[D, H, W]``."""
    d, h, w = shape
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                                indexing="ij"), axis=-1).astype(np.float32)
    brain = np.sum((grid / np.array([0.85, 0.8, 0.7])) ** 2, axis=-1) < 1.0
    centre = rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    radius = rng.uniform(0.18, 0.35)
    dist = np.sqrt(np.sum((grid - centre) ** 2, axis=-1)) / radius
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(dist < 1.6) & brain] = 2
    labels[(dist < 1.0) & brain] = 4
    labels[(dist < rng.uniform(0.4, 0.75)) & brain] = 1
    tissue = np.select([labels == 2, labels == 4, labels == 1, brain], [2, 3, 4, 1], default=0)
    image = _CONTRAST[:, tissue].transpose(1, 2, 3, 0)
    image = image + rng.normal(0.0, 0.15, size=image.shape).astype(np.float32) * brain[..., None]
    inside = image[brain]
    image = np.where(brain[..., None], (image - inside.mean(0)) / (inside.std(0) + 1e-7), 0.0).astype(np.float32)
    return image, labels


def toy_batch(rng: np.random.Generator, batch: int, shape=(32, 64, 64)):
    """``(images [B, D, H, W, 4], regions [B, D, H, W, 3])``."""
    cases = [toy_case(rng, shape) for _ in range(batch)]
    images = np.stack([c[0] for c in cases])
    regions = np.stack([regions_from_labels(c[1]) for c in cases])
    return images, regions
