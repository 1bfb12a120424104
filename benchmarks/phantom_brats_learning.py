"""Does ShaSpec learn on phantom BraTS, and does it beat the baseline over the 15 modality subsets?

    python benchmarks/phantom_brats_learning.py [--cases 24] [--steps 400] [--work DIR] [--out phantom_brats.json]

Generates phantom cases (``shaspec prepare phantom``), prepares TFRecords with Beam (``shaspec prepare brats``,
20 % eval), trains ShaSpec and the baseline (``small`` preset) for the same steps, and evaluates both on every
subset (``shaspec evaluate``; Dice and HD95, reports and heat-maps under WORK/reports).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--crop", default="32,64,64")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--work", default="phantom_brats_learning")
    parser.add_argument("--out", default="phantom_brats.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from shaspec_tf.cli import main as shaspec

    w = args.work
    report = {"args": vars(args), "seconds": {}}
    stages = [
        ("phantoms", ["prepare", "phantom", "--out", f"{w}/nifti", "--cases", str(args.cases)]),
        ("records", ["prepare", "brats", "--input", f"{w}/nifti", "--output", f"{w}/records"]),
    ]
    for variant in ("shaspec", "baseline"):
        stages.append((f"train-{variant}", [
            "train", "--task", "brats", "--data", f"{w}/records", "--out", f"{w}/{variant}", "--preset", args.preset,
            "--variant", variant, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
            "--crop", args.crop, "--checkpoint-every", str(max(1, args.steps // 4))]))
    stages.append(("evaluate", ["evaluate", "--model", f"{w}/shaspec", "--model", f"{w}/baseline",
                                "--data", f"{w}/records", "--out", f"{w}/reports", "--roi", args.crop]))
    for name, command in stages:
        if name == "phantoms" and os.path.exists(f"{w}/nifti/phantoms.json"):
            continue
        start = time.time()
        if shaspec(command) != 0:
            raise SystemExit(f"stage {name} failed")
        report["seconds"][name] = round(time.time() - start, 1)
        print(f"== {name}: {report['seconds'][name]} s", flush=True)
    for variant in ("shaspec", "baseline"):
        with open(f"{w}/reports/{variant}/metrics.json") as f:
            report[variant] = json.load(f)["mean"]
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
