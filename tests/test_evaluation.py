"""Evaluation metrics (HD95, BraTS regions, accuracy), the per-subset evaluator and its reports.

Expected values are computed independently of ``shaspec_tf.metrics``: surfaces by an explicit neighbour loop, surface
distances by brute force over all point pairs, Dice by counting.
"""
import csv
import json
import math
import os

import numpy as np
import pytest

from shaspec_tf.data.masks import all_subsets
from shaspec_tf.evaluation import compare_models, evaluate_subsets, load_results, markdown_report, write_reports
from shaspec_tf.metrics import (BRATS2023_LABEL_REGIONS, BRATS_CHALLENGE_HD95_PENALTY, accuracy, dice, hd95,
                                region_metrics, surface_distances)

BRATS = ("flair", "t1", "t1ce", "t2")
AVMNIST = ("image", "audio")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- independent references

def brute_surface_points(mask):
    """Indices of mask voxels with a face neighbour outside the mask or outside the array (explicit loop)."""
    mask = np.asarray(mask, dtype=bool)
    points = []
    for index in zip(*np.nonzero(mask)):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                neighbour = list(index)
                neighbour[axis] += step
                if not 0 <= neighbour[axis] < mask.shape[axis] or not mask[tuple(neighbour)]:
                    points.append(index)
                    break
            else:
                continue
            break
    return np.array(points, dtype=float)


def brute_directed(a, b, spacing):
    pa = brute_surface_points(a) * np.asarray(spacing, dtype=float)
    pb = brute_surface_points(b) * np.asarray(spacing, dtype=float)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return distances.min(axis=1), distances.min(axis=0)


def brute_hd95(a, b, spacing, method="pooled"):
    ab, ba = brute_directed(a, b, spacing)
    if method == "max":
        return max(np.percentile(ab, 95), np.percentile(ba, 95))
    return float(np.percentile(np.concatenate([ab, ba]), 95))


def count_dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.sum() + b.sum() == 0:
        return 1.0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def random_blob(rng, shape, seeds=3, grow=2):
    mask = np.zeros(shape, dtype=bool)
    for _ in range(seeds):
        mask[tuple(rng.integers(0, s) for s in shape)] = True
    for _ in range(grow):  # grow by random face-neighbour steps: irregular, sometimes touching the array border
        grown = mask.copy()
        for axis in range(len(shape)):
            for step in (-1, 1):
                grown |= np.roll(mask, step, axis=axis) & (rng.random(shape) < 0.6)
        mask = grown
    return mask


# ------------------------------------------------------------------------------------------------------------- HD95

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["pooled", "max"])
def test_hd95_matches_brute_force_on_random_masks(seed, method):
    rng = np.random.default_rng(seed)
    shape = (9, 10, 11)
    a, b = random_blob(rng, shape), random_blob(rng, shape)
    spacing = (1.0, 0.5, 2.5)
    assert hd95(a, b, spacing, method=method) == pytest.approx(brute_hd95(a, b, spacing, method), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_directed_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(50 + seed)
    a, b = random_blob(rng, (8, 9, 7), grow=2), random_blob(rng, (8, 9, 7), grow=3)
    spacing = (0.8, 1.5, 3.0)
    ab, ba = surface_distances(a, b, spacing)
    expected_ab, expected_ba = brute_directed(a, b, spacing)
    # same multiset of distances per direction (the order of surface voxels is C order in both)
    np.testing.assert_allclose(ab, expected_ab, atol=1e-9)
    np.testing.assert_allclose(ba, expected_ba, atol=1e-9)


def test_hd95_is_surface_to_surface_inside_the_other_mask():
    # the prediction is the reference with an internal cavity: the cavity wall lies *inside* the reference, 1 voxel
    # (1.5 mm along every axis here) from the nearest reference surface -- a surface-to-mask distance would say 0
    reference = np.zeros((11, 11, 11), dtype=bool)
    reference[1:10, 1:10, 1:10] = True
    prediction = reference.copy()
    prediction[3:8, 3:8, 3:8] = False
    spacing = (1.5, 1.5, 1.5)
    expected = brute_hd95(prediction, reference, spacing)
    assert expected == pytest.approx(1.5)
    assert hd95(prediction, reference, spacing) == pytest.approx(expected)
    assert hd95(reference, prediction, spacing) == pytest.approx(expected)


def test_hd95_default_is_pooled_not_the_max_of_directed():
    found = 0
    for seed in range(20):
        rng = np.random.default_rng(200 + seed)
        a, b = random_blob(rng, (8, 8, 8), seeds=1, grow=3), random_blob(rng, (8, 8, 8), seeds=4, grow=1)
        pooled, largest = brute_hd95(a, b, (1, 1, 1)), brute_hd95(a, b, (1, 1, 1), "max")
        if abs(pooled - largest) > 1e-6:
            found += 1
            assert hd95(a, b) == pytest.approx(pooled)  # the official BraTS package's (test_metrics_official.py)
            assert hd95(a, b, method="max") == pytest.approx(largest)  # MONAI's
    assert found >= 3  # the test really distinguishes the two conventions


def test_hd95_two_cubes_offset_with_anisotropic_spacing():
    a = np.zeros((8, 10, 14), dtype=bool)
    a[2:5, 3:7, 1:5] = True
    b = np.zeros_like(a)
    b[4:7, 3:7, 7:11] = True  # shifted by 2 voxels along axis 0 and 6 along axis 2
    spacing = (2.0, 1.0, 0.7)
    expected = brute_hd95(a, b, spacing)
    assert hd95(a, b, spacing) == pytest.approx(expected, abs=1e-9)
    # the spacing matters: isotropic voxels give another (brute-force) answer
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(brute_hd95(a, b, (1, 1, 1)), abs=1e-9)
    assert abs(expected - brute_hd95(a, b, (1, 1, 1))) > 0.5


def test_hd95_closed_forms():
    # a one-voxel-thick slab and the same slab 3 voxels further along axis 0: every surface distance is 3 * 2.5 mm
    a = np.zeros((10, 5, 6), dtype=bool)
    a[2] = True
    b = np.zeros_like(a)
    b[5] = True
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(7.5)
    assert hd95(a, b, (2.5, 1.0, 1.0), method="max") == pytest.approx(7.5)
    # two single voxels: the distance between them in mm
    p = np.zeros((6, 6, 6), dtype=bool)
    q = np.zeros_like(p)
    p[1, 1, 1] = q[4, 3, 2] = True
    assert hd95(p, q, (2.0, 1.0, 0.5)) == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2 + 0.5 ** 2))
    # identical masks: 0
    assert hd95(a, a, (2.5, 1.0, 1.0)) == 0.0


def test_hd95_empty_policy():
    empty = np.zeros((5, 5, 5), dtype=bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(full, empty))
    assert math.isnan(hd95(empty, full))
    assert hd95(full, empty, empty_penalty=373.13) == 373.13
    assert hd95(empty, full, empty_penalty=BRATS_CHALLENGE_HD95_PENALTY) == pytest.approx(373.12866)
    assert hd95(empty, empty, empty_penalty=373.13) == 0.0  # the penalty is for exactly one empty mask only
    assert dice(empty, empty) == 1.0 and dice(full, empty) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_dice_and_hd95_are_symmetric_and_max_is_not_below_pooled(seed):
    rng = np.random.default_rng(100 + seed)
    a, b = random_blob(rng, (8, 9, 10), grow=3), random_blob(rng, (8, 9, 10), grow=1)
    assert dice(a, b) == pytest.approx(dice(b, a))
    assert dice(a, b) == pytest.approx(count_dice(a, b))
    assert hd95(a, b, (1.0, 2.0, 0.5)) == pytest.approx(hd95(b, a, (1.0, 2.0, 0.5)))
    assert hd95(a, b, (1.0, 2.0, 0.5), method="max") >= hd95(a, b, (1.0, 2.0, 0.5)) - 1e-12


def test_hd95_rejects_bad_input():
    with pytest.raises(ValueError):
        hd95(np.ones((3, 3)), np.ones((3, 4)))
    with pytest.raises(ValueError):
        hd95(np.ones((3, 3)), np.ones((3, 3)), method="mean")


# ---------------------------------------------------------------------------------------------- BraTS regions, accuracy

def test_region_metrics_uses_brats_label_sets():
    truth = np.zeros((10, 10, 10), dtype=np.uint8)
    pred = np.zeros_like(truth)
    et, necrosis, oedema = np.zeros((3,) + truth.shape, dtype=bool)
    et[4:6, 4:6, 4:6] = True                            # 8 voxels
    necrosis[2:4, 4:6, 4:6] = True                      # 8 voxels
    oedema[6:8, 4:6, 4:6] = True                        # 8 voxels
    truth[et], truth[necrosis], truth[oedema] = 4, 1, 2
    pred[et], pred[necrosis], pred[oedema] = 4, 2, 2     # necrosis called oedema: TC loses it, WT and ET do not
    scores = region_metrics(pred, truth, spacing=(1.0, 1.0, 1.0))
    assert list(scores) == ["ET", "WT", "TC"]
    assert scores["ET"]["dice"] == pytest.approx(1.0)
    assert scores["WT"]["dice"] == pytest.approx(1.0)
    assert scores["TC"]["dice"] == pytest.approx(2 * 8 / (8 + 16))
    assert scores["ET"]["hd95"] == 0.0 and scores["WT"]["hd95"] == 0.0
    assert scores["TC"]["hd95"] == pytest.approx(brute_hd95(et, et | necrosis, (1, 1, 1)))
    assert scores["TC"]["hd95"] > 0

    # label 3 means nothing to the default (BraTS 2018-2021) regions, but is ET under the BraTS 2023 labels
    truth23 = np.where(truth == 4, 3, truth)
    pred23 = np.where(pred == 4, 3, pred)
    old = region_metrics(pred23, truth23)
    assert old["ET"]["dice"] == 1.0 and old["ET"]["hd95"] == 0.0       # both ET masks are empty
    assert old["WT"]["dice"] == pytest.approx(count_dice(oedema | necrosis, oedema | necrosis))
    new = region_metrics(pred23, truth23, regions=BRATS2023_LABEL_REGIONS)
    assert new["TC"]["dice"] == pytest.approx(2 / 3) and new["WT"]["dice"] == 1.0


def test_region_metrics_empty_regions_follow_the_policies():
    truth = np.zeros((6, 6, 6), dtype=np.uint8)
    truth[1:4, 1:4, 1:4] = 2                      # oedema only: ET and TC empty in the reference
    pred = truth.copy()
    pred[2, 2, 2] = 4                             # a spurious ET voxel
    scores = region_metrics(pred, truth)
    assert scores["ET"]["dice"] == 0.0 and math.isnan(scores["ET"]["hd95"])
    assert scores["WT"]["dice"] == 1.0 and scores["WT"]["hd95"] == 0.0
    scores = region_metrics(truth, truth, empty_penalty=373.13)
    assert scores["ET"] == {"dice": 1.0, "hd95": 0.0} and scores["TC"] == {"dice": 1.0, "hd95": 0.0}
    assert region_metrics(pred, truth, empty_penalty=99.0)["ET"]["hd95"] == 99.0


def test_accuracy():
    labels = np.array([0, 1, 2, 3, 1])
    assert accuracy(np.array([0, 1, 2, 0, 0]), labels) == pytest.approx(3 / 5)
    scores = np.eye(4)[[0, 1, 2, 3, 3]]          # class scores: argmax taken
    assert accuracy(scores, labels) == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        accuracy(np.array([0, 1]), labels)


# ----------------------------------------------------------------------------------------------- evaluate_subsets

def _brats_cases():
    hgg = np.zeros((12, 12, 12), dtype=np.uint8)
    hgg[2:9, 2:9, 2:9] = 2
    hgg[3:8, 3:8, 3:8] = 1
    hgg[4:7, 4:7, 4:7] = 4
    lgg = np.zeros((12, 12, 12), dtype=np.uint8)   # no enhancing tumour
    lgg[3:9, 2:8, 3:10] = 2
    lgg[5:7, 4:6, 5:8] = 1
    return [{"case_id": "hgg", "labels": hgg, "spacing": (1.0, 1.0, 2.0)}, {"case_id": "lgg", "labels": lgg}]


def _fake_segmenter(case, mask):
    """Perfect with T1ce. With FLAIR but no T1ce: the whole tumour as oedema, shifted one voxel along the last axis
    (2 mm in the HGG case). Otherwise: the HGG case's whole tumour as oedema, shifted two voxels along axis 1, and
    nothing for the LGG case."""
    present = dict(zip(BRATS, mask.astype(bool)))
    if present["t1ce"]:
        return case["labels"].copy()
    if present["flair"]:
        return (np.roll(case["labels"] > 0, 1, axis=2) * 2).astype(np.uint8)
    if case["case_id"] == "hgg":
        return (np.roll(case["labels"] > 0, 2, axis=1) * 2).astype(np.uint8)
    return np.zeros_like(case["labels"])


def _expected_case(case, subset):
    """Independent expectation for one case and subset: (region -> (dice, hd95))."""
    labels, spacing = case["labels"], case.get("spacing", (1.0, 1.0, 1.0))
    present = subset.split("+")
    wt, tc, et = labels > 0, np.isin(labels, [1, 4]), labels == 4

    def empty_vs(ref):          # empty prediction
        return (1.0, 0.0) if not ref.any() else (0.0, float("nan"))

    if "t1ce" in present:
        return {"ET": (1.0, 0.0), "WT": (1.0, 0.0), "TC": (1.0, 0.0)}
    if "flair" in present:
        shifted = np.roll(wt, 1, axis=2)
        return {"ET": empty_vs(et), "WT": (count_dice(shifted, wt), brute_hd95(shifted, wt, spacing)),
                "TC": empty_vs(tc)}
    if case["case_id"] == "hgg":
        shifted = np.roll(wt, 2, axis=1)
        return {"ET": empty_vs(et), "WT": (count_dice(shifted, wt), brute_hd95(shifted, wt, spacing)),
                "TC": empty_vs(tc)}
    return {"ET": empty_vs(et), "WT": empty_vs(wt), "TC": empty_vs(tc)}


@pytest.fixture(scope="module")
def seg_results():
    return evaluate_subsets(_fake_segmenter, _brats_cases(), BRATS, progress=False)


@pytest.fixture(scope="module")
def baseline_results():
    return evaluate_subsets(lambda case, mask: np.zeros_like(case["labels"]), _brats_cases(), BRATS, progress=False)


def test_evaluate_subsets_segmentation_values(seg_results):
    names = [name for name, _ in all_subsets(BRATS)]
    assert len(names) == 15
    assert seg_results["subsets"] == names
    assert list(seg_results["summary"]) == names + ["mean"]
    cases = _brats_cases()
    expected_means = {}
    for name in names:
        per_case = [_expected_case(case, name) for case in cases]
        for case, expected in zip(cases, per_case):
            got = seg_results["per_case"][name][case["case_id"]]
            for region, (d, h) in expected.items():
                assert got[region]["dice"] == pytest.approx(d), (name, case["case_id"], region)
                assert (math.isnan(got[region]["hd95"]) and math.isnan(h)) or got[region]["hd95"] == pytest.approx(h)
        expected_means[name] = {}
        for region in ("ET", "WT", "TC"):
            d = np.mean([e[region][0] for e in per_case])
            hs = [e[region][1] for e in per_case if not math.isnan(e[region][1])]
            expected_means[name][region] = (d, np.mean(hs) if hs else float("nan"))
            got = seg_results["summary"][name][region]
            assert got["dice"] == pytest.approx(d)
            assert (math.isnan(got["hd95"]) and not hs) or got["hd95"] == pytest.approx(np.mean(hs))
            assert seg_results["hd95_undefined"][name][region] == len(per_case) - len(hs)

    # spot checks against hand-worked values: T1ce present -> perfect; no FLAIR, no T1ce -> ET from the LGG case only
    assert seg_results["summary"]["flair+t1ce"]["TC"] == {"dice": 1.0, "hd95": 0.0}
    assert seg_results["summary"]["t1+t2"]["ET"]["dice"] == pytest.approx(0.5)      # LGG: empty vs empty = 1
    assert seg_results["summary"]["t1+t2"]["TC"]["dice"] == 0.0
    assert 0 < seg_results["summary"]["t1+t2"]["WT"]["dice"] < 0.5
    assert seg_results["hd95_undefined"]["t1+t2"] == {"ET": 1, "WT": 1, "TC": 2}
    assert 0 < seg_results["summary"]["flair"]["WT"]["dice"] < 1

    # the Average row is the mean of the 15 subset means (not of the cases), ignoring undefined HD95 subset means
    for region in ("ET", "WT", "TC"):
        mean = seg_results["summary"]["mean"][region]
        assert mean["dice"] == pytest.approx(np.mean([expected_means[n][region][0] for n in names]))
        assert mean["dice"] == pytest.approx(np.mean([seg_results["summary"][n][region]["dice"] for n in names]))
        finite = [expected_means[n][region][1] for n in names if not math.isnan(expected_means[n][region][1])]
        assert mean["hd95"] == pytest.approx(np.mean(finite))
    assert seg_results["summary"]["mean"]["TC"]["dice"] == pytest.approx(8 / 15)


def test_evaluate_subsets_chosen_subsets_penalty_and_progress(capsys):
    calls = []

    def predict(case, mask):
        calls.append(tuple(mask))
        return _fake_segmenter(case, mask)

    hgg_wt = _brats_cases()[0]["labels"] > 0
    results = evaluate_subsets(predict, iter(_brats_cases()), BRATS, subsets=["t2", "t1ce+flair", [0, 1, 0, 0]],
                               empty_penalty=373.13, progress=True)
    assert results["subsets"] == ["t1", "t2", "flair+t1ce"]          # all_subsets order, canonical names
    assert len(calls) == 2 * 3 and (1.0, 0.0, 1.0, 0.0) in calls
    assert results["summary"]["t2"]["TC"] == {"dice": 0.0, "hd95": 373.13}
    assert results["hd95_undefined"]["t2"] == {"ET": 0, "WT": 0, "TC": 0}
    assert results["summary"]["t2"]["WT"]["hd95"] == pytest.approx(
        (373.13 + brute_hd95(np.roll(hgg_wt, 2, axis=1), hgg_wt, (1.0, 1.0, 2.0))) / 2)
    assert results["summary"]["mean"]["TC"]["dice"] == pytest.approx(1 / 3)
    err = capsys.readouterr().err
    assert "hgg" in err and "lgg" in err and "3 subsets" in err
    with pytest.raises(ValueError):
        evaluate_subsets(predict, _brats_cases(), BRATS, subsets=["t3"], progress=False)
    with pytest.raises(ValueError):
        evaluate_subsets(predict, [], BRATS, progress=False)
    with pytest.raises(ValueError):
        evaluate_subsets(predict, _brats_cases() * 2, BRATS, progress=False)   # duplicate case ids


def _avmnist_cases():
    return [{"case_id": "batch0", "label": np.arange(10) % 10},
            {"case_id": "batch1", "label": np.array([3, 1, 4, 1, 5])}]


def _fake_classifier(case, mask):
    """Perfect with the image; audio only: right on the first 4 samples of each batch, wrong on the rest."""
    label = case["label"]
    if mask[0]:
        return label.copy()
    wrong = (label + 1) % 10
    return np.where(np.arange(label.size) < 4, label, wrong)


@pytest.fixture(scope="module")
def cls_results():
    return evaluate_subsets(_fake_classifier, _avmnist_cases(), AVMNIST, task="classification", progress=False)


def test_evaluate_subsets_classification_pools_samples(cls_results):
    assert cls_results["subsets"] == ["image", "audio", "image+audio"]
    summary = cls_results["summary"]
    assert summary["image"]["accuracy"] == 1.0 and summary["image+audio"]["accuracy"] == 1.0
    assert summary["audio"]["accuracy"] == pytest.approx(8 / 15)     # pooled; the mean of the batches would be 0.6
    assert cls_results["per_case"]["audio"]["batch0"]["accuracy"] == pytest.approx(0.4)
    assert cls_results["per_case"]["audio"]["batch1"]["accuracy"] == pytest.approx(0.8)
    assert summary["mean"]["accuracy"] == pytest.approx((1 + 8 / 15 + 1) / 3)
    # the report counts the samples a subset pools, not the batches they came in
    assert "*15 samples per subset." in markdown_report(cls_results)
    with pytest.raises(ValueError):
        evaluate_subsets(_fake_classifier, _avmnist_cases(), AVMNIST, task="regression", progress=False)


# ------------------------------------------------------------------------------------------------------------ reports

def _table_rows(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert set(lines[1].replace("|", "").split()) == {"---"}
    return lines[0], lines[2:]


def _check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 10_000


def test_write_reports_segmentation(seg_results, tmp_path):
    paths = write_reports(seg_results, str(tmp_path), title="Fake ShaSpec")
    for name in ("metrics.json", "metrics.csv", "metrics.md", "heatmap.png", "metrics_per_case.json"):
        assert (tmp_path / name).is_file(), name
    names = [name for name, _ in all_subsets(BRATS)]

    with open(tmp_path / "metrics.json") as f:
        summary = json.load(f)
    assert list(summary) == names + ["mean"]
    assert summary["flair+t1ce"]["ET"] == {"dice": 1.0, "hd95": 0.0}
    assert summary["t1+t2"]["TC"]["hd95"] is None                      # undefined -> null, the file is strict JSON
    assert summary["mean"]["TC"]["dice"] == pytest.approx(8 / 15)

    markdown = (tmp_path / "metrics.md").read_text()
    header, rows = _table_rows(markdown)
    assert len(rows) == 16
    assert "ET Dice (%)" in header and "WT HD95 (mm)" in header
    assert [row.split("|")[5].strip() for row in rows[:15]] == names
    t1ce_row = rows[names.index("t1ce")]
    assert t1ce_row.count("100.00") == 3
    assert "Average" in rows[-1] and f"{100 * 8 / 15:.2f}" in rows[-1]
    wt_flair = seg_results["summary"]["flair"]["WT"]["dice"]
    assert f"{100 * wt_flair:.2f}" in rows[names.index("flair")]
    footer = markdown.split(rows[-1])[1]
    assert "empty" in footer and "1" in footer and "BraTS" in footer and "HD95" in footer

    with open(tmp_path / "metrics.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["subset"] for r in records] == names + ["mean"]
    for record in records:
        key = record["subset"]
        for region in ("ET", "WT", "TC"):
            assert float(record[f"{region}_dice"]) == pytest.approx(seg_results["summary"][key][region]["dice"])
    assert records[names.index("t1+t2")]["TC_hd95_mm"] == ""
    assert records[names.index("flair+t2")]["flair"] == "1" and records[names.index("flair+t2")]["t1"] == "0"

    _check_png(paths["heatmap"])

    reloaded = load_results(str(tmp_path))
    assert reloaded["subsets"] == names
    assert math.isnan(reloaded["summary"]["t1+t2"]["TC"]["hd95"])
    assert reloaded["per_case"]["flair"]["hgg"]["WT"]["dice"] == pytest.approx(
        seg_results["per_case"]["flair"]["hgg"]["WT"]["dice"])


def test_write_reports_classification(cls_results, tmp_path):
    write_reports(cls_results, str(tmp_path), title="AV-MNIST")
    with open(tmp_path / "metrics.json") as f:
        summary = json.load(f)
    assert list(summary) == ["image", "audio", "image+audio", "mean"]
    assert summary["audio"] == {"accuracy": pytest.approx(8 / 15)}
    header, rows = _table_rows((tmp_path / "metrics.md").read_text())
    assert len(rows) == 4 and "Accuracy (%)" in header
    assert "53.33" in rows[1] and "100.00" in rows[0] and f"{100 * (2 + 8 / 15) / 3:.2f}" in rows[3]
    with open(tmp_path / "metrics.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert float(records[1]["accuracy"]) == pytest.approx(8 / 15)
    _check_png(tmp_path / "heatmap.png")


def test_compare_models(seg_results, baseline_results, tmp_path):
    paths = compare_models({"ShaSpec": seg_results, "Baseline": baseline_results}, str(tmp_path))
    markdown = (tmp_path / "comparison.md").read_text()
    assert "ShaSpec" in markdown and "Baseline" in markdown
    for results in (seg_results, baseline_results):
        assert f"{100 * results['summary']['mean']['WT']['dice']:.2f}" in markdown
    assert seg_results["summary"]["mean"]["WT"]["dice"] != baseline_results["summary"]["mean"]["WT"]["dice"]
    dice_table = markdown.split("## HD95")[0]
    header, rows = _table_rows(dice_table)
    assert len(rows) == 16 and "ET · ShaSpec" in header and "ET · Baseline" in header
    assert "Average" in rows[-1]
    names = [name for name, _ in all_subsets(BRATS)]
    t1ce_cells = [c.strip() for c in rows[names.index("t1ce")].split("|")]
    flair_cells = [c.strip() for c in rows[names.index("flair")].split("|")]
    assert t1ce_cells[6:8] == ["**100.00**", "50.00"]          # ET: ShaSpec better -> bold
    assert flair_cells[6:8] == ["50.00", "50.00"]              # a tie: no bold

    with open(tmp_path / "comparison.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 16 and records[-1]["subset"] == "mean"
    assert float(records[-1]["ShaSpec:WT_dice"]) == pytest.approx(seg_results["summary"]["mean"]["WT"]["dice"])
    assert float(records[-1]["Baseline:WT_dice"]) == pytest.approx(baseline_results["summary"]["mean"]["WT"]["dice"])
    _check_png(paths["heatmap"])

    partial = evaluate_subsets(_fake_segmenter, _brats_cases(), BRATS, subsets=["t1ce"], progress=False)
    with pytest.raises(ValueError):
        compare_models({"ShaSpec": seg_results, "Partial": partial}, str(tmp_path))


def test_write_reports_with_models_writes_comparison(cls_results, tmp_path):
    other = evaluate_subsets(lambda case, mask: case["label"], _avmnist_cases(), AVMNIST, task="classification",
                             progress=False)
    paths = write_reports(cls_results, str(tmp_path), models={"Oracle": other}, name="ShaSpec")
    assert os.path.isfile(paths["comparison_markdown"])
    markdown = (tmp_path / "comparison.md").read_text()
    assert "Oracle" in markdown and "ShaSpec" in markdown and "100.00" in markdown


def test_write_report_folder_is_one_folder_of_ours(seg_results, baseline_results, tmp_path):
    from shaspec_tf.evaluation import write_report_folder
    from shaspec_tf.fileio import MARKER

    out = tmp_path / "report"
    paths = write_report_folder({"ShaSpec": seg_results}, str(out))
    assert sorted(os.listdir(out)) == sorted([MARKER, "heatmap.png", "metrics.csv", "metrics.json", "metrics.md",
                                              "metrics_per_case.csv", "metrics_per_case.json"])
    assert paths["ShaSpec"]["json"] == str(out / "metrics.json")
    assert json.loads((out / MARKER).read_text())["kind"] == "evaluation-report"
    # Our own report is replaced by a new one, several models as subfolders plus the comparison at the top.
    write_report_folder({"ShaSpec": seg_results, "Baseline": baseline_results}, str(out),
                        titles={"ShaSpec": "ShaSpec on X"}, comparison_title="Both")
    assert sorted(os.listdir(out)) == sorted([MARKER, "Baseline", "ShaSpec", "comparison.csv", "comparison.md",
                                              "comparison.png"])
    assert (out / "ShaSpec" / "metrics.md").read_text().startswith("# ShaSpec on X")
    assert (out / "comparison.md").read_text().startswith("# Both")
    assert sorted(os.listdir(tmp_path)) == ["report"]  # no staging or old folder left

    # A folder the user wrote into, or one holding their files, is refused and left as it was.
    (out / "ShaSpec" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        write_report_folder({"ShaSpec": seg_results}, str(out))
    assert (out / "ShaSpec" / "notes.txt").read_text() == "mine"
    users = tmp_path / "users"
    users.mkdir()
    (users / "metrics.json").write_text("my metrics")
    with pytest.raises(FileExistsError, match="not written by shaspec"):
        write_report_folder({"ShaSpec": seg_results}, str(users))
    assert os.listdir(users) == ["metrics.json"] and (users / "metrics.json").read_text() == "my metrics"
    assert sorted(os.listdir(tmp_path)) == ["report", "users"]
