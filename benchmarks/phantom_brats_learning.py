"""Phantom BraTS over seeds: ShaSpec against the baseline on the 15 modality subsets, and against dedicated models.

    python benchmarks/phantom_brats_learning.py [--seeds 5] [--cases 24] [--steps 400] [--warmup-steps 100]
                                                [--preset small] [--crop 32,64,64] [--work phantom_study]
                                                [--dedicated t1 flair flair+t1+t1ce+t2 | --dedicated]
                                                [--runs shaspec baseline linear-fusion encoded-absent
                                                        zeros-absent dedicated-t1 ...]

Generates phantom cases (``shaspec prepare phantom``) and their TFRecords (``shaspec prepare brats``, 20 % eval) once
into WORK, then trains, per seed (``--seed K --deterministic``): ShaSpec and the baseline (the shared encoder alone on
zero-filled inputs) with the task's default modality dropout; the one ablation of the paper's Table 6 that only the
segmenter has (a linear, 1x1x1 fusion projection instead of the official 3x3x3); ShaSpec with the official code's
skip maps for absent modalities (``absent_features="encoded"``: the shared encoder's output on the zero input, with
its gradient, instead of the same values without it), and with zeros there instead (``"zeros"``); and a dedicated
model (``--regime dedicated``: trained and tested with one subset) for each of :data:`DEDICATED`. Every model is
scored on the eval phantoms (Dice, %): the non-dedicated ones on all 15 subsets, a dedicated one on its own. Named
in ``--runs`` only: ``dedicated-t1-encoded`` and ``dedicated-t1-zeros``, the model dedicated to T1 (three modalities
absent from the first step on) with the other two routes for absent skips.

The dedicated subsets: ``t1`` alone, the weakest sequence for every region in the paper's Table 1 and where a
missing-modality model has the most to add; ``flair`` alone, the whole-tumour sequence and the usual single
sequence a clinic keeps; and all four, where the dedicated model is the plain full-modality model (the bound a
missing-modality model should not fall below when nothing is missing).

Writes WORK/phantom.md (tables, mean ± std over seeds, paired verdicts of ShaSpec against each model),
WORK/phantom.json and WORK/phantom.png. WORK keeps every run: a killed study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.study import Run, markdown_table, plot_study, progress_log, run_study, summarise  # noqa: E402
from shaspec_tf import fileio  # noqa: E402

REGIONS = ("ET", "WT", "TC")
DEDICATED = ("t1", "flair", "flair+t1+t1ce+t2")


def scores_of(summary: dict, subsets) -> dict:
    """Dice in % from an evaluation summary: ``"ET"``, ``"WT"``, ``"TC"`` (each the mean over ``subsets``),
    ``"mean"`` (over regions and subsets) and, per subset, its mean over the regions."""
    out = {}
    for region in REGIONS:
        out[region] = 100 * sum(summary[s][region]["dice"] for s in subsets) / len(subsets)
    out["mean"] = sum(out[r] for r in REGIONS) / len(REGIONS)
    for s in subsets:
        out[s] = 100 * sum(summary[s][r]["dice"] for r in REGIONS) / len(REGIONS)
    return {k: round(v, 4) for k, v in out.items()}


# Runs trained only when named in --runs: the model dedicated to T1 (three modalities absent from the first step on)
# under the other two routes for absent modalities' skips
ON_REQUEST_ROUTES = ("encoded", "zeros")


def runs(args) -> list:
    """The study's runs. Each names ``absent_features`` explicitly: runs are keyed by their options, so a work folder
    from before that option (whose models took the official "encoded" route) is never mistaken for this one."""
    from shaspec_tf.models.presets import SEGMENTER_PRESETS

    common = {"preset": args.preset, "steps": args.steps, "crop_size": list(args.crop)}
    dropout = dict(common, warmup_steps=args.warmup_steps)
    default = {"absent_features": SEGMENTER_PRESETS[args.preset]["absent_features"]}

    def shaspec(name, label, variant="shaspec", **model_options):
        return Run(name, dict(dropout, variant=variant, model_options=dict(default, **model_options)), label=label)

    def dedicated(subset, route=None):
        options = {"absent_features": route} if route else default
        return Run(f"dedicated-{subset}" + (f"-{route}" if route else ""),
                   dict(common, variant="shaspec", regime="dedicated", subset=subset, model_options=options),
                   subsets=(subset,), label=f"dedicated to {subset}" + (f", absent skips {route}" if route else ""))

    every = [shaspec("shaspec", "ShaSpec (one model)"),
             shaspec("baseline", "baseline (shared encoder, zero-filled)", variant="baseline"),
             shaspec("linear-fusion", "ShaSpec, linear (1x1x1) fusion", fusion_kernel=1),
             shaspec("encoded-absent", "ShaSpec, absent skips with gradient (official)", absent_features="encoded"),
             shaspec("zeros-absent", "ShaSpec, absent skips zeroed", absent_features="zeros")]
    every += [dedicated(s) for s in args.dedicated]
    on_request = [dedicated("t1", route) for route in ON_REQUEST_ROUTES]
    unknown = sorted(set(args.runs or ()) - {run.name for run in every + on_request})
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}: expected names from {[run.name for run in every]} and, on "
                         f"request only, {[run.name for run in on_request]}")
    return [run for run in every + on_request if run.name in (args.runs or [r.name for r in every])]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--crop", default="32,64,64")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--work", default="phantom_study")
    parser.add_argument("--dedicated", nargs="*", default=list(DEDICATED),
                        help="subsets to train dedicated models for (none: ShaSpec and the baseline only; their "
                             "results are kept, so a later run with dedicated models adds only those)")
    parser.add_argument("--runs", nargs="+", metavar="NAME",
                        help="train and report only these runs (default: all), e.g. shaspec baseline encoded-absent "
                             "zeros-absent")
    args = parser.parse_args(argv)
    args.crop = tuple(int(v) for v in args.crop.split(","))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from shaspec_tf.cli import main as shaspec
    from shaspec_tf.data.masks import all_subsets
    from shaspec_tf.tasks.brats import BRATS_MODALITIES

    w = args.work
    if not fileio.exists(fileio.join(w, "nifti", "phantoms.json")):
        if shaspec(["prepare", "phantom", "--out", fileio.join(w, "nifti"), "--cases", str(args.cases)]) != 0:
            raise SystemExit("preparing the phantoms failed")
    records = fileio.join(w, "records")
    if not fileio.exists(fileio.join(records, "manifest.json")):
        if shaspec(["prepare", "brats", "--input", fileio.join(w, "nifti"), "--output", records]) != 0:
            raise SystemExit("preparing the records failed")
    every = [name for name, _ in all_subsets(BRATS_MODALITIES)]

    def train_and_score(run: Run, seed: int, folder: str) -> dict:
        import keras

        from shaspec_tf.trained import evaluate_trained
        from shaspec_tf.training.trainer import TrainConfig, train

        keras.backend.clear_session()
        options = dict(run.options, crop_size=tuple(run.options["crop_size"]))
        train(TrainConfig(task="brats", data=records, out=folder, seed=seed, deterministic=True,
                          checkpoint_every=max(1, args.steps // 4), **options))
        subsets = list(run.subsets or every)
        summary = evaluate_trained(folder, records, roi_size=args.crop, subsets=subsets)["summary"]
        return scores_of(summary, subsets)

    study = runs(args)
    seeds = list(range(args.seeds))
    results = run_study(study, seeds, w, train_and_score, log=progress_log)
    summary = summarise(results, study, reference="shaspec")
    title = (f"# Phantom BraTS: {args.preset} preset, {args.steps} steps ({args.warmup_steps} with every modality), "
             f"{args.cases} phantoms, {len(seeds)} seeds (Dice %, eval phantoms)")
    lines = [title, "", "Mean over the 15 subsets, per region:", ""]
    lines += markdown_table(summary, [run for run in study if not run.name.startswith("dedicated-")],
                            list(REGIONS) + ["mean"])
    if args.dedicated:
        lines += ["", "On the dedicated models' subsets (mean over the regions):", ""]
        lines += markdown_table(summary, study, list(args.dedicated))
    fileio.atomic_write(fileio.join(w, "phantom.md"), "\n".join(lines) + "\n")
    fileio.atomic_write_json(fileio.join(w, "phantom.json"), {"args": {k: v for k, v in vars(args).items()},
                                                              "seeds": seeds, "summary": summary})
    # A dedicated model's "mean" is that of its one subset: left out of the plot's mean-over-subsets group.
    plotted = dict(summary, runs={name: {k: v for k, v in cells.items() if k in args.dedicated}
                                  if name.startswith("dedicated-") else cells
                                  for name, cells in summary["runs"].items()})
    plot_study(plotted, study, list(args.dedicated) + ["mean"], fileio.join(w, "phantom.png"),
               f"Phantom BraTS: mean ± std over {len(seeds)} seeds", ylabel="Dice (%)")
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    main()
