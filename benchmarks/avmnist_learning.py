"""AV-MNIST over seeds: the default's evidence, ShaSpec against dedicated and plain models, the paper's Table 3, and
ablations. Each study writes a table (Markdown), a plot and the raw results; every number is a mean over seeds.

    python benchmarks/avmnist_learning.py [--study defaults comparison table3 ablations] [--seeds 5]
                                          [--epochs 60] [--work avmnist_study] [--data DIR]

The data is AV-MNIST by the SMIL protocol (``shaspec prepare avmnist``: training recordings 15-49, test 5-14,
speakers jackson, nicolas, theo), built once into WORK/data from ``$SHASPEC_DATA`` or ``../shared/data`` unless
``--data`` names a prepared folder. Every training is ``shaspec train --task avmnist --epochs E`` with the options
below and ``--seed K --deterministic``, scored on the test split (300 samples) on every subset its model serves:

* ``defaults``: ShaSpec under several modality-dropout laws (none, rate 0.5, the official law at rate 1.0, with a
  10-epoch warm-up, independent per-modality dropout at 0.5), against the shipped default;
* ``comparison``: ShaSpec with the default command against a dedicated model per subset (one encoder per modality
  and the same head, trained and tested with that subset only), the zero-fill baseline (the shared encoder alone on
  zero-filled inputs, same dropout) and the concatenation model (the per-modality encoders, features concatenated,
  trained with both modalities: also the dedicated model of image + audio);
* ``table3``: the paper's Table 3 setting, audio kept for 5/10/15/20 % of training samples, images-only test,
  beside the paper's figures;
* ``ablations``: ShaSpec without the distribution-alignment loss (alpha 0), without the domain loss (beta 0), and
  shared features only (the baseline). The fusion projection is already linear in the classifier; the 3x3x3
  against linear fusion ablation is the segmenter's (``benchmarks/phantom_brats_learning.py``).

WORK keeps every run (``runs/NAME/seedK/``): a killed study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.study import Run, markdown_table, plot_study, progress_log, run_study, summarise  # noqa: E402
from shaspec_tf import fileio  # noqa: E402

SUBSETS = ("image", "audio", "image+audio")
PAPER_TABLE3 = {0.05: 93.33, 0.10: 93.56, 0.15: 93.78, 0.20: 94.67}   # ShaSpec, images-only test
PAPER_LOWER_BOUND = 92.35                                            # LeNet on images only
WARMUP_EPOCHS = 10


def default_options() -> dict:
    """The modality-dropout options the default command trains with, spelled out (so that a result is tied to the
    default it was trained under, see :func:`benchmarks.study.run_key`)."""
    from shaspec_tf.training.trainer import TrainConfig

    c = TrainConfig(task="avmnist", data="-", out="-", epochs=1).resolved()
    options = {"drop_rate": c.drop_rate, "warmup_steps": c.warmup_steps, "ramp_steps": c.ramp_steps}
    if c.drop_probs is not None:
        options["drop_probs"] = c.drop_probs
    return options


def studies(steps_per_epoch: int) -> dict:
    """Each study: its runs (the first is the reference of the paired verdicts) and the subsets of its table."""
    default = Run("shaspec-default", default_options(), label="ShaSpec (default command)")
    candidates = [Run("drop-none", {"drop_rate": 0.0, "warmup_steps": 0, "ramp_steps": 0},
                      label="no modality dropout"),
                  Run("drop-0.5", {"drop_rate": 0.5, "warmup_steps": 0, "ramp_steps": 0},
                      label="official law, rate 0.5"),
                  Run("drop-1.0", {"drop_rate": 1.0, "warmup_steps": 0, "ramp_steps": 0},
                      label="official law, rate 1.0"),
                  Run("drop-1.0-warmup", {"drop_rate": 1.0, "warmup_steps": WARMUP_EPOCHS * steps_per_epoch,
                                          "ramp_steps": 0},
                      label=f"official law, rate 1.0, after {WARMUP_EPOCHS} epochs with both"),
                  Run("drop-independent-0.5", {"drop_rate": 0.0, "warmup_steps": 0, "ramp_steps": 0,
                                               "drop_probs": {"image": 0.5, "audio": 0.5}},
                      label="independent per modality, 0.5 each")]
    # the default is one of the candidates: list it first (the reference) under the default's name
    same = [c for c in candidates if c.options == default.options]
    candidates = [Run(default.name, default.options, label=f"{same[0].label} (the default)")] + \
        [c for c in candidates if c.options != default.options] if same else [default] + candidates
    return {
        "defaults": (candidates, SUBSETS),
        "comparison": ([default,
                        Run("dedicated-image", {"variant": "concat", "regime": "dedicated", "subset": "image"},
                            subsets=("image",), label="dedicated, image only"),
                        Run("dedicated-audio", {"variant": "concat", "regime": "dedicated", "subset": "audio"},
                            subsets=("audio",), label="dedicated, audio only"),
                        Run("concat", {"variant": "concat", "drop_rate": 0.0},
                            label="concatenation (dedicated image + audio)"),
                        Run("baseline", {"variant": "baseline"}, label="zero-fill baseline (shared encoder)")],
                       SUBSETS),
        "table3": ([Run(f"audio-{int(round(100 * r))}", {"audio_rate": r}, subsets=("image",),
                        label=f"ShaSpec, audio for {int(round(100 * r))} %") for r in sorted(PAPER_TABLE3)],
                   ("image",)),
        "ablations": ([default,
                       Run("no-alignment", {"model_options": {"alpha": 0.0}}, label="without alignment loss"),
                       Run("no-domain", {"model_options": {"beta": 0.0}}, label="without domain loss"),
                       Run("baseline", {"variant": "baseline"}, label="shared features only")], SUBSETS),
    }


def train_and_score(data: str, epochs: int):
    def go(run: Run, seed: int, folder: str) -> dict:
        import keras

        from shaspec_tf.trained import evaluate_trained
        from shaspec_tf.training.trainer import TrainConfig, train

        keras.backend.clear_session()
        train(TrainConfig(task="avmnist", data=data, out=folder, epochs=epochs, seed=seed, deterministic=True,
                          checkpoint_every=10_000, **run.options))
        summary = evaluate_trained(folder, data, subsets=run.subsets)["summary"]
        return {subset: round(100 * summary[subset]["accuracy"], 4) for subset in (run.subsets or SUBSETS)}
    return go


def table3_lines(summary: dict, runs) -> list:
    lines = ["| audio kept for | ours (mean ± std) | paper ShaSpec | paper lower bound (images only) |",
             "|---|---|---|---|"]
    for run, rate in zip(runs, sorted(PAPER_TABLE3)):
        cell = summary["runs"][run.name]["image"]
        lines.append(f"| {int(round(100 * rate))} % | {cell['mean']:.2f} ± {cell['std']:.2f} | "
                     f"{PAPER_TABLE3[rate]:.2f} | {PAPER_LOWER_BOUND:.2f} |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", default=["defaults", "comparison", "table3", "ablations"],
                        choices=("defaults", "comparison", "table3", "ablations"))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--work", default="avmnist_study", help="runs, data and reports (resumable)")
    parser.add_argument("--data", help="a prepared AV-MNIST folder (default: built into WORK/data)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from shaspec_tf.data.avmnist import build_avmnist

    data = args.data or fileio.join(args.work, "data")
    if not fileio.exists(fileio.join(data, "manifest.json")):
        build_avmnist(out_dir=data, progress=True)
    manifest = fileio.read_json(fileio.join(data, "manifest.json"))
    steps_per_epoch = -(-int(manifest["splits"]["train"]["count"]) // 32)    # batch 32: the task's default
    seeds = list(range(args.seeds))
    report = {}
    for name in args.study:
        runs, subsets = studies(steps_per_epoch)[name]
        results = run_study(runs, seeds, args.work, train_and_score(data, args.epochs), log=progress_log)
        summary = summarise(results, runs, reference=runs[0].name if name != "table3" else None)
        lines = [f"# AV-MNIST, {name}: {args.epochs} epochs, {len(seeds)} seeds (accuracy %, test split)", ""]
        lines += table3_lines(summary, runs) if name == "table3" else markdown_table(summary, runs, subsets)
        fileio.atomic_write(fileio.join(args.work, f"{name}.md"), "\n".join(lines) + "\n")
        fileio.atomic_write_json(fileio.join(args.work, f"{name}.json"),
                                 {"epochs": args.epochs, "seeds": seeds, "summary": summary,
                                  "runs": {r.name: {"options": r.options, "label": r.label} for r in runs}})
        plot_study(summary, runs, subsets, fileio.join(args.work, f"{name}.png"),
                   f"AV-MNIST {name}: mean ± std over {len(seeds)} seeds")
        print("\n".join(lines), flush=True)
        report[name] = summary
    return report


if __name__ == "__main__":
    main()
