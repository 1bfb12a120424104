"""Multi-seed comparison studies: run many trainings, keep each result, and report mean, spread and paired verdicts.

A study is a list of :class:`Run` s (a name, training options, the subsets it is scored on), each trained once per
seed. :func:`run_study` trains and scores what is missing (a finished run's ``result.json`` is kept, so a killed
study resumes where it stopped, and a half-trained run resumes from its checkpoints), then :func:`summarise` gives,
per run and subset, the mean and sample standard deviation over seeds, and per pair (every run against the
reference run) the paired difference over the same seeds with a two-sided paired t-test: ``better`` / ``worse``
when p < 0.05, else ``tie``. :func:`markdown_table` and :func:`plot_study` write what the README shows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from shaspec_tf import fileio

ALPHA = 0.05  # the paired test's level


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration of a study: ``options`` are :class:`shaspec_tf.training.trainer.TrainConfig` fields;
    ``subsets`` the subsets it is scored on (``None``: every one; a dedicated model: its own)."""

    name: str
    options: dict
    subsets: Optional[Sequence[str]] = None
    label: str = ""


def run_key(run: Run) -> str:
    """The folder of a run's seeds: a digest of its options (and subsets), so that two studies, or two names, with the
    same training share one result, and a changed default never reuses a result trained under the old one."""
    text = json.dumps({"options": run.options, "subsets": list(run.subsets or [])}, sort_keys=True, default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_folder(work: str, run: Run, seed: int) -> str:
    return fileio.join(work, "runs", run_key(run), f"seed{seed}")


def run_study(runs: Sequence[Run], seeds: Sequence[int], work: str, train_and_score: Callable[[Run, int, str], dict],
              log=print) -> Dict[str, Dict[int, dict]]:
    """``{run name: {seed: scores}}``, training what has no ``result.json`` yet: ``train_and_score(run, seed,
    folder)`` trains into ``folder`` and returns ``{subset: score}``; the result is written atomically with the
    run's options, so a kill at any moment loses at most the run in progress (which resumes from its checkpoints)."""
    results: Dict[str, Dict[int, dict]] = {}
    todo = [(run, seed) for seed in seeds for run in runs]
    start = time.time()
    for done, (run, seed) in enumerate(todo, 1):
        folder = run_folder(work, run, seed)
        path = fileio.join(folder, "result.json")
        if fileio.exists(path):
            stored = fileio.read_json(path)
            if stored.get("options") != _jsonable(run.options) or stored.get("seed") != seed:
                raise ValueError(f"{path} holds another run: use another work folder")
            results.setdefault(run.name, {})[seed] = stored["scores"]
            continue
        tick = time.time()
        scores = train_and_score(run, seed, fileio.join(folder, "train"))
        fileio.atomic_write_json(path, {"name": run.name, "options": _jsonable(run.options), "seed": seed,
                                        "scores": scores, "seconds": round(time.time() - tick, 1)})
        results.setdefault(run.name, {})[seed] = scores
        left = (time.time() - start) / done * (len(todo) - done)
        log(f"[{done}/{len(todo)}] {run.name} seed {seed}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f" ({time.time() - tick:.0f} s; ~{left / 60:.0f} "
            "min left at this pace)")
    return results


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=list))


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (``n - 1``; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a`` against ``b`` over the same seeds: mean difference, its standard deviation, the two-sided paired t-test's
    p-value (``None`` below two pairs or when every difference is equal) and the verdict at :data:`ALPHA`."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    p = None
    if len(diffs) > 1 and std > 0:
        p = float(stats.ttest_rel(a, b).pvalue)
    elif len(diffs) > 1 and mean != 0:
        p = 0.0  # the same non-zero difference on every seed
    verdict = "tie" if p is None or p >= ALPHA else ("better" if mean > 0 else "worse")
    return {"diff_mean": mean, "diff_std": std, "p": p, "verdict": verdict, "n": len(diffs)}


def summarise(results: Dict[str, Dict[int, dict]], runs: Sequence[Run], reference: Optional[str] = None) -> dict:
    """Per run and subset: ``{"mean", "std", "n", "values"}``; with ``reference`` (a run name), per other run and
    shared subset, :func:`paired` of the reference against it over the seeds both have."""
    summary = {"runs": {}, "paired": {}, "reference": reference}
    for run in runs:
        by_seed = results.get(run.name, {})
        subsets = sorted({s for scores in by_seed.values() for s in scores}, key=_subset_order)
        summary["runs"][run.name] = {}
        for subset in subsets:
            values = [by_seed[seed][subset] for seed in sorted(by_seed) if subset in by_seed[seed]]
            mean, std = mean_std(values)
            summary["runs"][run.name][subset] = {"mean": mean, "std": std, "n": len(values), "values": values}
    if reference is not None:
        ref = results.get(reference, {})
        for run in runs:
            if run.name == reference:
                continue
            other = results.get(run.name, {})
            seeds = sorted(set(ref) & set(other))
            shared = [s for s in summary["runs"][run.name] if s in summary["runs"].get(reference, {})]
            summary["paired"][run.name] = {
                subset: paired([ref[k][subset] for k in seeds], [other[k][subset] for k in seeds])
                for subset in shared}
    return summary


def _subset_order(name: str):
    return (name == "mean", name.count("+"), name)


def markdown_table(summary: dict, runs: Sequence[Run], subsets: Sequence[str], unit: str = "%") -> List[str]:
    """Rows: runs; columns: subsets; cells ``mean ± std``, and against the reference its verdict (``▲`` better for
    the reference, ``▼`` worse, ``=`` tie, with the paired mean difference)."""
    ref = summary.get("reference")
    lines = ["| model | " + " | ".join(subsets) + " |", "|---|" + "---|" * len(subsets)]
    for run in runs:
        cells = []
        for subset in subsets:
            cell = summary["runs"].get(run.name, {}).get(subset)
            if cell is None:
                cells.append("")
                continue
            text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
            pair = summary["paired"].get(run.name, {}).get(subset)
            if pair is not None:
                mark = {"better": "▲", "worse": "▼", "tie": "="}[pair["verdict"]]
                text += f" ({mark} {pair['diff_mean']:+.2f})"
            cells.append(text)
        name = f"**{run.label or run.name}**" if run.name == ref else (run.label or run.name)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ref is not None:
        n = max((c["n"] for r in summary["runs"].values() for c in r.values()), default=0)
        lines.append("")
        lines.append(f"Mean ± sample standard deviation over {n} seeds ({unit}). In brackets, the reference "
                     f"(bold) minus that model, paired over the seeds: ▲ the reference is better, ▼ worse "
                     f"(two-sided paired t-test, p < {ALPHA}), = no significant difference.")
    return lines


def plot_study(summary: dict, runs: Sequence[Run], subsets: Sequence[str], path: str, title: str,
               ylabel: str = "accuracy (%)") -> None:
    """Grouped bars (one group per subset, one bar per run) with the standard deviation as error bars; every
    seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(subsets) + 2), 4.2 + 0.25 * ((len(runs) + 1) // 2)))
    width = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        xs, means, stds = [], [], []
        for j, subset in enumerate(subsets):
            cell = summary["runs"].get(run.name, {}).get(subset)
            if cell is None:
                continue
            x = j - 0.4 + width * (k + 0.5)
            xs.append(x)
            means.append(cell["mean"])
            stds.append(cell["std"])
            ax.scatter([x] * len(cell["values"]), cell["values"], s=6, color="black", zorder=3)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=run.label or run.name)
    ax.set_xticks(range(len(subsets)))
    ax.set_xticklabels(subsets)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    low = min((c["mean"] - c["std"] for r in summary["runs"].values() for c in r.values()), default=0.0)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    with fileio.atomic_path(path, ".png") as local:
        fig.savefig(local, dpi=120)
    plt.close(fig)


def progress_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
