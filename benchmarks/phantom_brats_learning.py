"""Does ShaSpec learn on phantom BraTS, and does it beat the baseline over the 15 modality subsets?

    python benchmarks/phantom_brats_learning.py [--cases 24] [--steps 400] [--seeds 0,1] [--work DIR]
                                                [--out phantom_brats.json]

Generates phantom cases (``shaspec prepare phantom``), prepares TFRecords with Beam (``shaspec prepare brats``,
20 % eval), trains ShaSpec and the baseline (``small`` preset) for the same steps with each seed, and evaluates all of
them on every subset (``shaspec evaluate``; Dice and HD95, reports, heat-maps and a side-by-side comparison under
WORK/reports). The JSON holds each run's mean over the subsets, the mean over seeds, and per region whether
ShaSpec's Dice is at or above the baseline's.
"""
from __future__ import annotations

import argparse
import os
import time

from shaspec_tf.tasks.brats import BRATS_REGIONS as REGIONS
from shaspec_tf import fileio

VARIANTS = ("shaspec", "baseline")


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def summarise(means: dict, seeds) -> dict:
    """``means[run_name]`` = the ``"mean"`` entry of a run's ``metrics.json``. Returns, per variant, the Dice and
    HD95 averaged over seeds (``None`` where every seed's HD95 is undefined), and per region whether ShaSpec's mean
    Dice is at or above the baseline's."""
    summary = {}
    for variant in VARIANTS:
        runs = [means[run_name(variant, s)] for s in seeds]
        summary[variant] = {}
        for region in REGIONS:
            hd95 = [r[region]["hd95"] for r in runs if r[region].get("hd95") is not None]
            summary[variant][region] = {"dice": sum(r[region]["dice"] for r in runs) / len(runs),
                                        "hd95": sum(hd95) / len(hd95) if hd95 else None}
    summary["shaspec_at_or_above_baseline"] = {
        region: summary["shaspec"][region]["dice"] >= summary["baseline"][region]["dice"] for region in REGIONS}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (data order, dropout, init)")
    parser.add_argument("--crop", default="32,64,64")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--work", default="phantom_brats_learning")
    parser.add_argument("--out", default="phantom_brats.json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from shaspec_tf.cli import main as shaspec

    w = args.work
    report = {"args": vars(args), "seconds": {}}
    stages = [
        ("phantoms", ["prepare", "phantom", "--out", f"{w}/nifti", "--cases", str(args.cases)]),
        ("records", ["prepare", "brats", "--input", f"{w}/nifti", "--output", f"{w}/records"]),
    ]
    for seed in seeds:
        for variant in VARIANTS:
            stages.append((f"train-{run_name(variant, seed)}", [
                "train", "--task", "brats", "--data", f"{w}/records", "--out", f"{w}/{run_name(variant, seed)}",
                "--preset", args.preset, "--variant", variant, "--seed", str(seed), "--steps", str(args.steps),
                "--warmup-steps", str(args.warmup_steps), "--crop", args.crop,
                "--checkpoint-every", str(max(1, args.steps // 4))]))
    models = [arg for seed in seeds for variant in VARIANTS for arg in ("--model", f"{w}/{run_name(variant, seed)}")]
    stages.append(("evaluate", ["evaluate", *models, "--data", f"{w}/records", "--out", f"{w}/reports",
                                "--roi", args.crop]))
    for name, command in stages:
        if name == "phantoms" and fileio.exists(f"{w}/nifti/phantoms.json"):
            continue
        start = time.time()
        if shaspec(command) != 0:
            raise SystemExit(f"stage {name} failed")
        report["seconds"][name] = round(time.time() - start, 1)
        print(f"== {name}: {report['seconds'][name]} s", flush=True)
    means = {}
    for seed in seeds:
        for variant in VARIANTS:
            means[run_name(variant, seed)] = fileio.read_json(f"{w}/reports/{run_name(variant, seed)}/metrics.json")["mean"]
    report["runs"] = means
    report.update(summarise(means, seeds))
    fileio.atomic_write_json(args.out, report)
    for variant in VARIANTS:
        print(f"{variant:9s} mean Dice over subsets and seeds: "
              + " ".join(f"{r} {100 * report[variant][r]['dice']:.2f}" for r in REGIONS))
    print("ShaSpec at or above the baseline:", report["shaspec_at_or_above_baseline"])
    return report


if __name__ == "__main__":
    main()
