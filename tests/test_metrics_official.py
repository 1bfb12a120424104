"""Our Dice and default HD95 are the official BraTS evaluation package's, pinned to that package's own numbers.

The official package, ``brats-evaluation`` on PyPI (version 0.0.10, on panoptica 2.1.7, run with NumPy 2.2.6 and
SciPy 1.15.3), needs pandas 2 and so cannot live in our environment. ``benchmarks/brats_official_metrics.py`` runs
it in a throwaway one on the synthetic pairs its ``make_pairs`` builds from a fixed seed (its docstring says how);
``OFFICIAL`` below is what that script printed with ``--python-literal``: per pair and region, the package's global
Dice (``global_bin_dsc``) and HD95 (``global_bin_hd95``) under its bundled BraTS glioma config (labels 1, 2, 3;
ET = {3}, TC = {1, 3}, WT = {1, 2, 3}). ``None`` is NaN there, ``INF`` infinite (its result parser reports 373).

Where the package gives a finite number, ours must equal it to the last digit. Where it does not, the test states
the two conventions, which differ on purpose (see ``shaspec_tf.metrics.hd95``).
"""
import hashlib
import math

import numpy as np
import pytest

from benchmarks.brats_official_metrics import REGIONS_2023, make_pairs
from shaspec_tf.evaluation import evaluate_subsets, markdown_report
from shaspec_tf.metrics import (BRATS_LABEL_REGIONS, HD95_DEFAULT_METHOD, hd95, hd95_method_text, region_masks,
                                region_metrics)

INF = float("inf")
PAIRS_SHA256 = "943ed54c9ff364978fe496fb0aa7de01d1318d422e7ffcd629de3af3d2031b5c"  # the pairs OFFICIAL was made on
OFFICIAL = {
    "shifted": {
        "ET": (0.0, INF),
        "TC": (0.5636363636363636, 1.7320508075688772),
        "WT": (0.722117202268431, 1.7320508075688772),
    },
    "shifted_anisotropic": {
        "ET": (0.0, INF),
        "TC": (0.5636363636363636, 1.7320508075688772),
        "WT": (0.722117202268431, 1.7320508075688772),
    },
    "ragged": {
        "ET": (0.2222222222222222, 15.336198313753671),
        "TC": (0.43209876543209874, 13.416407864998739),
        "WT": (0.7221396731054978, 10.65361203238298),
    },
    "far_false_positive": {
        "ET": (0.5263157894736842, 14.543009164582068),
        "TC": (0.8439306358381503, 14.071247279470288),
        "WT": (0.9525101763907734, 11.575836902790225),
    },
    "prediction_without_et": {
        "ET": (0.0, INF),
        "TC": (1.0, 0.0),
        "WT": (1.0, 0.0),
    },
    "reference_without_et": {
        "ET": (0.0, INF),
        "TC": (1.0, 0.0),
        "WT": (1.0, 0.0),
    },
    "both_without_et": {
        "ET": (None, None),
        "TC": (0.5529411764705883, 2.0),
        "WT": (0.7077625570776256, 1.7320508075688772),
    },
    "tiny_lesions": {
        "ET": (0.6666666666666666, 0.8999999999999999),
        "TC": (0.8, 1.1313708498984758),
        "WT": (0.5, 1.4142135623730951),
    },
    "tiny_disjoint": {
        "ET": (0.0, INF),
        "TC": (0.0, INF),
        "WT": (0.0, INF),
    },
    "empty_reference": {
        "ET": (0.0, INF),
        "TC": (0.0, INF),
        "WT": (0.0, INF),
    },
    "both_empty": {
        "ET": (None, None),
        "TC": (None, None),
        "WT": (None, None),
    },
}

PAIRS = {name: (prediction, reference, spacing) for name, prediction, reference, spacing in make_pairs()}


def test_the_pairs_are_the_ones_the_official_numbers_were_computed_on():
    digest = hashlib.sha256()
    for name, (prediction, reference, _) in PAIRS.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(prediction, np.uint8).tobytes())
        digest.update(np.ascontiguousarray(reference, np.uint8).tobytes())
    assert digest.hexdigest() == PAIRS_SHA256, "make_pairs changed: rerun benchmarks/brats_official_metrics.py"
    assert list(PAIRS) == list(OFFICIAL)


def _official_case(name, region):
    """How the package treats this pair: "finite", "both empty", "one empty" or "disjoint" (both non-empty, no
    voxel in common)."""
    prediction, reference, _ = PAIRS[name]
    p = region_masks(prediction, REGIONS_2023)[region]
    r = region_masks(reference, REGIONS_2023)[region]
    if not p.any() and not r.any():
        return "both empty"
    if not p.any() or not r.any():
        return "one empty"
    return "finite" if (p & r).any() else "disjoint"


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_default_dice_and_hd95_equal_the_official_package(name):
    prediction, reference, _ = PAIRS[name]
    # the package's global HD95 is in voxels whatever the spacing (see the next test): compare at 1 mm
    ours = region_metrics(prediction, reference, spacing=(1.0, 1.0, 1.0), regions=REGIONS_2023)
    # our default BraTS 2018-2021 regions (ET = 4) on the same maps relabelled give the same numbers
    relabel = np.array([0, 1, 2, 4], np.uint8)
    legacy = region_metrics(relabel[prediction], relabel[reference], regions=BRATS_LABEL_REGIONS)
    for region in ours:
        assert legacy[region] == pytest.approx(ours[region], nan_ok=True)
    for region, (dice, hd) in OFFICIAL[name].items():
        got = ours[region]
        case = _official_case(name, region)
        if case == "finite":
            assert got["dice"] == dice and got["hd95"] == hd, (name, region)     # to the last digit
        elif case == "both empty":
            # official: undefined (NaN, left out of its means); ours: Dice 1 and HD95 0 (our empty-mask policies)
            assert dice is None and hd is None
            assert got == {"dice": 1.0, "hd95": 0.0}
        elif case == "one empty":
            # official: Dice 0, HD95 infinite (reported as 373); ours: Dice 0, HD95 undefined unless a penalty
            assert dice == 0.0 and hd == INF
            assert got["dice"] == 0.0 and math.isnan(got["hd95"])
            penalised = region_metrics(prediction, reference, regions=REGIONS_2023, empty_penalty=373.0)
            assert penalised[region]["hd95"] == 373.0
        else:
            # official: no voxel in common counts as infinitely far (373); ours measures the surfaces
            assert case == "disjoint" and dice == 0.0 and hd == INF
            assert got["dice"] == 0.0 and 0.0 < got["hd95"] < 373.0


def test_official_hd95_is_in_voxels_ours_in_mm():
    prediction, reference, spacing = PAIRS["shifted_anisotropic"]
    assert spacing != (1.0, 1.0, 1.0) and OFFICIAL["shifted_anisotropic"] == OFFICIAL["shifted"]
    in_mm = region_metrics(prediction, reference, spacing=spacing, regions=REGIONS_2023)
    assert in_mm["TC"]["hd95"] != OFFICIAL["shifted"]["TC"][1]                # the spacing matters to us
    assert in_mm["TC"]["dice"] == OFFICIAL["shifted"]["TC"][0]                # and not to the Dice


def test_max_is_the_other_convention_and_never_below_pooled():
    differs = 0
    for name, (prediction, reference, _) in PAIRS.items():
        for region, (_, official) in OFFICIAL[name].items():
            if _official_case(name, region) != "finite":
                continue
            p = region_masks(prediction, REGIONS_2023)[region]
            r = region_masks(reference, REGIONS_2023)[region]
            assert hd95(p, r) == official                       # the default is the official package's
            largest = hd95(p, r, method="max")
            assert largest >= official
            differs += largest > official + 1e-9
    assert HD95_DEFAULT_METHOD == "pooled" and differs >= 5    # the pairs tell the two conventions apart


def test_reports_say_which_hd95_convention_they_use():
    prediction, reference, _ = PAIRS["ragged"]
    cases = [{"case_id": "ragged", "labels": reference}]
    results = evaluate_subsets(lambda case, mask: prediction, cases, ("t1",), task="brats", regions=REGIONS_2023,
                               progress=False)
    assert results["policy"]["hd95_convention"] == "pooled"
    assert "official BraTS evaluation package" in results["policy"]["hd95_method"]
    assert results["summary"]["t1"]["ET"]["hd95"] == OFFICIAL["ragged"]["ET"][1]
    assert hd95_method_text("pooled") in markdown_report(results)
    other = evaluate_subsets(lambda case, mask: prediction, cases, ("t1",), task="brats", regions=REGIONS_2023,
                             hd_method="max", progress=False)
    assert other["policy"]["hd95_convention"] == "max" and "MONAI" in other["policy"]["hd95_method"]
    assert "MONAI" in markdown_report(other) and "official" not in hd95_method_text("max")
    with pytest.raises(ValueError, match="HD95 method"):
        hd95(prediction > 0, reference > 0, method="mean")
