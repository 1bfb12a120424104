"""Data-side helpers: modality-mask sampling and naming, toy volumes, Dice."""
import numpy as np
import pytest

from shaspec_tf.data.masks import all_subsets, random_modality_masks, subset_name
from shaspec_tf.data.toy import regions_from_labels, toy_case
from shaspec_tf.metrics import dice, region_dice

BRATS = ("flair", "t1", "t1ce", "t2")


def test_all_subsets_enumerates_every_non_empty_subset_once():
    subsets = all_subsets(BRATS)
    assert len(subsets) == 15
    masks = {tuple(m) for _, m in subsets}
    assert len(masks) == 15 and (0, 0, 0, 0) not in masks
    assert subsets[0][0] == "flair" and subsets[-1][0] == "flair+t1+t1ce+t2"
    assert dict(subsets)["t1+t2"].tolist() == [0, 1, 0, 1]
    assert [name for name, _ in all_subsets(("image", "audio"))] == ["image", "audio", "image+audio"]


def test_subset_name_rejects_an_empty_mask():
    assert subset_name([1, 0, 1, 0], BRATS) == "flair+t1ce"
    with pytest.raises(ValueError, match="all-zero"):
        subset_name([0, 0, 0, 0], BRATS)


def test_random_masks_follow_the_official_law():
    rng = np.random.default_rng(0)
    masks = random_modality_masks(rng, 8000, 4)
    assert masks.min() == 0 and masks.max() == 1 and np.all(masks.sum(1) >= 1)
    kept = masks.sum(1).astype(int)
    counts = np.bincount(kept, minlength=5)[1:]
    # k ~ U{1..4}: each count near 2000 (binomial sd ~ 39)
    assert np.all(np.abs(counts - 2000) < 200), counts
    # within k = 1, every modality equally likely
    singles = masks[kept == 1].sum(0)
    assert np.all(np.abs(singles - singles.mean()) < 0.15 * singles.mean()), singles


def test_drop_rate_zero_keeps_every_modality():
    masks = random_modality_masks(np.random.default_rng(1), 100, 4, drop_rate=0.0)
    assert np.all(masks == 1)
    half = random_modality_masks(np.random.default_rng(1), 4000, 4, drop_rate=0.5)
    full_rows = np.mean(half.sum(1) == 4)
    assert 0.55 < full_rows < 0.70  # 0.5 + 0.5 * 1/4


def test_regions_follow_brats_conventions():
    labels = np.array([0, 1, 2, 4], dtype=np.uint8)
    regions = regions_from_labels(labels)
    # channels ET, WT, TC
    assert regions.tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 0], [1, 1, 1]]


def test_toy_case_modalities_are_complementary():
    image, labels = toy_case(np.random.default_rng(2), (32, 48, 48))
    assert image.shape == (32, 48, 48, 4) and labels.shape == (32, 48, 48)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    mean = {lab: image[labels == lab].mean(0) for lab in (1, 2, 4)}
    flair, t1, t1ce, t2 = range(4)
    assert mean[4][t1ce] > mean[4][t1] + 1.0           # enhancing rim shows in T1ce only
    assert mean[2][flair] > mean[2][t1] + 1.0           # oedema bright in FLAIR
    assert mean[2][t2] > mean[2][t1] + 1.0              # and T2
    assert mean[1][t1] < mean[2][t1] and mean[1][t1ce] < mean[4][t1ce]   # necrosis dark in T1, T1ce


def test_dice_and_the_empty_policy():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0 and dice(a, b, empty_value=np.nan) != dice(a, b, empty_value=np.nan)
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(2 * 1 / 4)
    assert dice(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:2])
    logits = np.where(np.stack([a, a, b], -1), 3.0, -3.0)
    scores = region_dice(logits, np.stack([a, b, b], -1).astype(float))
    assert scores == {"ET": 1.0, "WT": pytest.approx(0.5), "TC": 1.0}
