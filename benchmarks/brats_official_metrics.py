"""Dice and HD95 of the official BraTS evaluation package on fixed synthetic label maps: the reference numbers that
``tests/test_metrics_official.py`` pins our metrics to.

The official package (``brats-evaluation`` on PyPI, built on ``panoptica``) needs pandas 2, which our environment
cannot have (TFDV 1.16 needs pandas < 2), so it runs in a throwaway environment of its own:

    python3.10 -m venv /tmp/bratseval-venv && /tmp/bratseval-venv/bin/pip install brats-evaluation
    /tmp/bratseval-venv/bin/python benchmarks/brats_official_metrics.py [--out official.json] [--python-literal]

It evaluates every pair of :func:`make_pairs` with the package's bundled BraTS glioma config (``config_gli.yaml``:
labels 1 = NETC, 2 = SNFH, 3 = ET; regions ET = {3}, TC = {1, 3}, WT = {1, 2, 3}) through
``Panoptica_Evaluator.evaluate(prediction, reference, voxelspacing=spacing)`` and prints, per pair and region, the
global (whole-mask, not lesion-wise) Dice ``global_bin_dsc`` and HD95 ``global_bin_hd95`` that the package's
``parse_seg_results`` reports as ``global_dsc_*`` / ``global_hd95_*`` (an infinite HD95 is reported there as 373).
``--python-literal`` prints them as the dict the test holds (``INF`` for infinite, ``None`` for NaN). Only NumPy
is needed to build the pairs (the same bytes under NumPy 1.26 and 2.2, checked by the test's digest), so the test
imports :func:`make_pairs` from here in our own environment.

What the package does, read from its code and seen in these numbers (brats-evaluation 0.0.10, panoptica 2.1.7):
its global HD95 pools the surface distances of both directions and takes one 95th percentile (our default); it is
computed in voxels, the ``voxelspacing`` given to ``evaluate`` (or a NIfTI header's zooms) reaching only the
lesion-wise metrics; two non-empty masks with no voxel in common score Dice 0 and HD95 infinite; one empty mask
scores Dice 0 and HD95 infinite; both empty score NaN for both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

SEED = 20261215
SHAPE = (24, 28, 20)
REGIONS_2023 = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}        # the official config's region label values
OFFICIAL_GROUPS = {"ET": "et", "TC": "tc", "WT": "wt"}            # our region name -> the config's group name


def _ellipsoid(shape, centre, radii, rng=None, jitter: float = 0.0) -> np.ndarray:
    """A boolean ellipsoid; with ``rng``, a ragged one (each voxel's radius test moved by up to ``jitter``)."""
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    level = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    if rng is not None and jitter:
        level = level + jitter * (rng.random(shape) - 0.5)
    return level <= 1.0


def _tumour(rng, shape, centre, scale: float) -> np.ndarray:
    """A label map in the BraTS 2023 labels: oedema (2) around a core (1) that holds an enhancing part (3)."""
    labels = np.zeros(shape, dtype=np.uint8)
    radii = scale * np.array([5.0, 6.0, 4.5]) * (0.85 + 0.3 * rng.random(3))
    labels[_ellipsoid(shape, centre, radii, rng, 0.6)] = 2
    labels[_ellipsoid(shape, centre, 0.6 * radii, rng, 0.5)] = 1
    labels[_ellipsoid(shape, np.asarray(centre) + rng.integers(-1, 2, 3), 0.35 * radii, rng, 0.5)] = 3
    return labels


def make_pairs() -> list:
    """``[(name, prediction, reference, spacing), ...]``: fixed synthetic BraTS-2023-label pairs (uint8, values
    {0, 1, 2, 3}) from :data:`SEED`, covering isotropic and anisotropic spacing, a shifted and a ragged prediction,
    a far false-positive blob (where the two HD95 conventions part most), a prediction without ET, a reference
    without ET, both without ET, one-voxel lesions, and an empty reference against a non-empty prediction."""
    rng = np.random.default_rng(SEED)
    centre = np.array(SHAPE) / 2.0 - 0.5
    pairs = []

    reference = _tumour(rng, SHAPE, centre, 1.0)
    prediction = _tumour(rng, SHAPE, centre + np.array([1.0, -1.0, 0.5]), 1.0)
    pairs.append(("shifted", prediction, reference, (1.0, 1.0, 1.0)))
    pairs.append(("shifted_anisotropic", prediction, reference, (1.0, 0.5, 2.5)))

    ragged = reference.copy()
    flips = rng.random(SHAPE) < 0.04
    ragged[flips] = rng.integers(0, 4, SHAPE, dtype=np.uint8)[flips]
    pairs.append(("ragged", ragged, reference, (1.2, 1.2, 3.0)))

    far = _tumour(rng, SHAPE, centre, 0.8)
    far_prediction = far.copy()
    far_prediction[1:4, 1:4, 15:18] = 3                      # a false-positive enhancing blob in a far corner
    far_prediction[20:22, 24:26, 1:3] = 2
    pairs.append(("far_false_positive", far_prediction, far, (1.0, 1.0, 1.0)))

    no_et = _tumour(rng, SHAPE, centre, 0.9)
    no_et_prediction = no_et.copy()
    no_et_prediction[no_et_prediction == 3] = 1              # the prediction calls the enhancing part necrosis
    pairs.append(("prediction_without_et", no_et_prediction, no_et, (1.0, 1.0, 1.0)))
    pairs.append(("reference_without_et", no_et, no_et_prediction, (1.0, 1.0, 1.0)))
    both_without = _tumour(rng, SHAPE, centre, 0.9)
    both_without[both_without == 3] = 1
    shifted_without = np.roll(both_without, 2, axis=1)
    pairs.append(("both_without_et", shifted_without, both_without, (1.0, 1.0, 1.0)))

    tiny_reference = np.zeros(SHAPE, dtype=np.uint8)
    tiny_reference[10:12, 12:14, 9] = 2
    tiny_reference[10, 13, 9] = 1
    tiny_reference[10, 12, 9] = 3
    tiny_prediction = np.zeros(SHAPE, dtype=np.uint8)
    tiny_prediction[10:13, 12:14, 9:11] = 2
    tiny_prediction[10, 12:14, 9] = 3                        # one ET voxel right, one too many; the NETC missed
    tiny_prediction[11, 12, 10] = 1
    pairs.append(("tiny_lesions", tiny_prediction, tiny_reference, (1.0, 1.0, 1.0)))
    pairs.append(("tiny_disjoint", np.roll(tiny_reference, (3, 3, 1), axis=(0, 1, 2)), tiny_reference,
                  (1.0, 1.0, 1.0)))

    empty = np.zeros(SHAPE, dtype=np.uint8)
    pairs.append(("empty_reference", _tumour(rng, SHAPE, centre, 0.7), empty, (1.0, 1.0, 1.0)))
    pairs.append(("both_empty", empty, empty.copy(), (1.0, 1.0, 1.0)))
    return pairs


def official_metrics(pairs) -> dict:
    """Pair name -> region -> ``{"dice", "hd95"}`` from the official package (``None`` for NaN, ``"inf"`` for an
    infinite HD95, so the result is plain JSON)."""
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    results = {}
    for name, prediction, reference, spacing in pairs:
        groups = evaluator.evaluate(prediction, reference, voxelspacing=spacing, verbose=False)
        entry = {}
        for region, group in OFFICIAL_GROUPS.items():
            row = groups[group].to_dict()
            entry[region] = {"dice": _plain(row["global_bin_dsc"]), "hd95": _plain(row["global_bin_hd95"])}
        results[name] = entry
    return results


def _plain(value):
    value = float(value)
    if math.isnan(value):
        return None
    return "inf" if math.isinf(value) else value


def _literal(value) -> str:
    return "INF" if value == "inf" else repr(value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the versions and figures as JSON here")
    parser.add_argument("--python-literal", action="store_true", help="print the figures as a Python dict literal")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    report = {"brats-evaluation": version("brats-evaluation"), "panoptica": version("panoptica"),
              "numpy": np.__version__, "scipy": version("scipy"), "seed": SEED, "shape": list(SHAPE),
              "metrics": official_metrics(make_pairs())}
    if args.python_literal:
        print("{")
        for name, regions in report["metrics"].items():
            cells = ", ".join(f'"{r}": ({_literal(v["dice"])}, {_literal(v["hd95"])})' for r, v in regions.items())
            print(f'    "{name}": {{{cells}}},')
        print("}")
    else:
        json.dump(report, sys.stdout, indent=1)
        print()
    if args.out:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, not
        from shaspec_tf import fileio                                                    # installed in that venv

        fileio.atomic_write_json(args.out, report, indent=1)
    return report


if __name__ == "__main__":
    main()
