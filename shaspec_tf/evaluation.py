"""Missing-modality evaluation: score a model on every available-modality subset and write the paper-style reports.

    results = evaluate_subsets(predict_fn, cases, BRATS_MODALITIES)          # predict_fn(case, mask) -> label map
    write_reports(results, "runs/eval", title="ShaSpec, BraTS 2018 split 1")
    compare_models({"ShaSpec": results, "Baseline": baseline}, "runs/compare")

Every table has one row per non-empty modality subset, in :func:`shaspec_tf.data.masks.all_subsets` order (singles
first, the full set last: 15 rows for BraTS, 3 for AV-MNIST), and an "Average" row, the mean of the subset means (the
paper's "Average" row, so every subset weighs the same whatever its number of cases).

Segmentation (BraTS): each case is a dict with whatever ``predict_fn`` needs plus ``"labels"`` (the reference label
map, values {0, 1, 2, 4}) and optionally ``"spacing"`` (voxel size in mm, default 1 mm isotropic) and ``"case_id"``;
``predict_fn`` returns a label map of the same shape. Regions: WT = {1, 2, 4}, TC = {1, 4}, ET = {4}. Dice: empty
prediction vs empty reference = 1 (BraTS), HD95 per :data:`shaspec_tf.metrics.HD95_EMPTY_POLICY`.

Classification (AV-MNIST): each case holds ``"label"`` (one label or an array of labels: a case may be a batch) and
``predict_fn`` returns class indices (or scores with a trailing class axis). A subset's accuracy pools all samples.

The reports are written with Matplotlib's non-interactive Agg canvas (no pyplot, no global backend change), each
file atomically through :mod:`shaspec_tf.fileio`, so a report folder may be a ``gs://`` URI as well as a local path.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from shaspec_tf import fileio
from shaspec_tf.data.masks import resolve_subsets
from shaspec_tf.figures import heatmap_panel, new_figure, save_figure
from shaspec_tf.metrics import HD95_DEFAULT_METHOD
from shaspec_tf.overlays import (OVERLAY_CASES, OVERLAY_FOLDER, OVERLAY_KEY, OverlayKeeper, markdown_section,
                                 write_overlays)
from shaspec_tf.taskspec.registry import all_tasks, get_task
from shaspec_tf.scoring import ACCURACY_POLICY, MEAN_KEY, MEAN_POLICY, csv_cell, fmt  # noqa: F401 (re-export)

MEAN_LABEL = "Average"

REPORT_KIND = "evaluation-report"  # the fileio marker kind of a folder written by write_report_folder

__all__ = ["REPORT_KIND", "check_report_folder", "compare_models", "evaluate_subsets", "load_results",
           "markdown_report", "write_report_folder", "write_reports"]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

def _case_id(index: int, case, seen: set) -> str:
    case_id = None
    if isinstance(case, Mapping):
        case_id = case.get("case_id", case.get("id"))
    case_id = f"case_{index:04d}" if case_id is None else str(case_id)
    if case_id in seen:
        raise ValueError(f"duplicate case id {case_id!r}: give every case a unique 'case_id'")
    seen.add(case_id)
    return case_id


def evaluate_subsets(predict_fn: Callable[[Any, np.ndarray], Any], cases: Iterable, modalities: Sequence[str],
                     subsets=None, progress: bool = True, task: str = "segmentation", spacing=None,
                     empty_penalty: float | None = None, regions: Mapping | None = None,
                     hd_method: str = HD95_DEFAULT_METHOD, overlay_cases: int = OVERLAY_CASES) -> dict:
    """Score ``predict_fn`` on every case under every modality subset.

    Args:
        predict_fn: ``predict_fn(case, mask) -> prediction``; ``mask`` is the float32 0/1 presence vector, one entry
            per modality (as :func:`shaspec_tf.data.masks.all_subsets` gives it). Segmentation: a label map shaped
            like ``case["labels"]``; classification: class indices shaped like ``case["label"]`` (or scores with a
            trailing class axis).
        cases: an iterable of dicts (read once: each case is loaded once and predicted under every subset, so a
            generator over large volumes is fine). Optional ``"case_id"`` (default ``case_0000``, ...).
        modalities: modality names in mask order, e.g. ``("flair", "t1", "t1ce", "t2")``.
        subsets: ``None`` (all 2^M - 1) or subset names (``"flair+t1ce"``), 0/1 masks or ``(name, mask)`` pairs.
        progress: print one line per case to stderr.
        task: a task name or kind (:func:`shaspec_tf.tasks.get_task`): its scoring decides the metrics
            (``"segmentation"``, ``"brats"``: Dice and HD95 per region; ``"classification"``, ``"avmnist"``:
            accuracy). The results name the task's kind.
        spacing: voxel size in mm when a case has no ``"spacing"`` (default: 1 mm along every axis).
        empty_penalty: HD95 when exactly one of prediction/reference is empty (default ``None``: NaN, left out of the
            means and counted under ``"hd95_undefined"``).
        regions: region name -> label values (default: the task's, for BraTS ET {4}, WT {1, 2, 4}, TC {1, 4}).
        hd_method: ``"pooled"`` (default: the official BraTS evaluation package's HD95) or ``"max"`` (MONAI's),
            see :func:`shaspec_tf.metrics.hd95`.
        overlay_cases: segmentation with an ``"image"`` per case: keep, for this many first cases, a few axial
            slices of the image, reference and every subset's prediction (left out of the JSON reports) for
            :func:`write_reports`' overlay pictures (:mod:`shaspec_tf.overlays`); 0: none.

    Returns:
        A JSON-friendly dict: ``"summary"`` maps each subset name (``all_subsets`` order) and ``"mean"`` to the metrics
        (``{"ET": {"dice", "hd95"}, "WT": ..., "TC": ...}`` or ``{"accuracy"}``); ``"per_case"`` maps subset ->
        case id -> metrics; plus ``"task"``, ``"modalities"``, ``"subsets"``, ``"columns"`` (regions or
        ``["accuracy"]``), ``"metrics"``, ``"case_ids"``, ``"n_cases"``, ``"hd95_undefined"`` (subset -> region ->
        number of cases left out of the HD95 mean), ``"policy"`` (the empty-mask and averaging rules, as text);
        and ``"overlay_slices"`` (NumPy arrays, not JSON) when ``overlay_cases`` kept any.
    """
    task = get_task(task)
    scoring = task.scoring
    modalities = tuple(modalities)
    if MEAN_KEY in modalities:
        raise ValueError(f"a modality may not be called {MEAN_KEY!r}")
    chosen = resolve_subsets(subsets, modalities)
    names = [name for name, _ in chosen]
    regions = dict(scoring.default_regions() if regions is None else regions)
    columns = scoring.columns(regions)
    per_case = {name: {} for name in names}
    keeper = OverlayKeeper(overlay_cases, task.kind, modalities, regions)
    case_ids: list = []
    seen: set = set()
    total = len(cases) if hasattr(cases, "__len__") else None
    start = time.time()
    for index, case in enumerate(cases):
        case_id = _case_id(index, case, seen)
        case_ids.append(case_id)
        tick = time.time()
        keeper.start(index, case_id, case, spacing)
        for name, mask in chosen:
            prediction = predict_fn(case, mask.copy())
            keeper.keep(name, prediction)
            try:
                per_case[name][case_id] = scoring.score_case(prediction, case, spacing=spacing,
                                                             empty_penalty=empty_penalty, regions=regions,
                                                             hd_method=hd_method)
            except (KeyError, ValueError) as error:
                raise type(error)(f"case {case_id!r}, subset {name!r}: {error}") from error
        if progress:
            of = f"/{total}" if total is not None else ""
            print(f"[{index + 1}{of}] {case_id}: {len(chosen)} subsets in {time.time() - tick:.1f} s",
                  file=sys.stderr, flush=True)
    if not case_ids:
        raise ValueError("no cases to evaluate")

    summary, undefined = scoring.summarise(per_case, names, columns)
    if progress:
        print(f"evaluated {len(case_ids)} cases x {len(names)} subsets in {time.time() - start:.1f} s",
              file=sys.stderr, flush=True)
    policy = {"mean": MEAN_POLICY, **scoring.policy(empty_penalty, hd_method, regions)}
    results = {"task": task.kind, "modalities": list(modalities), "subsets": names, "columns": columns,
               "metrics": list(scoring.metrics), "case_ids": case_ids, "n_cases": len(case_ids), "summary": summary,
               "per_case": per_case, "hd95_undefined": undefined, "empty_penalty": empty_penalty, "policy": policy}
    kept = keeper.result()
    return results if kept is None else {**results, OVERLAY_KEY: kept}


# ---------------------------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------------------------

def _jsonable(value):
    """NumPy scalars -> Python numbers; NaN/inf -> ``None`` (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _nan_from_none(value):
    if isinstance(value, dict):
        return {k: _nan_from_none(v) for k, v in value.items()}
    return float("nan") if value is None else value


def load_results(path: str) -> dict:
    """Read back the results that :func:`write_reports` saved (``metrics_per_case.json``, or its folder)."""
    if fileio.isdir(path):
        path = fileio.join(path, "metrics_per_case.json")
    results = fileio.read_json(path)
    results["summary"] = _nan_from_none(results["summary"])
    results["per_case"] = _nan_from_none(results["per_case"])
    return results


def _write_json(path: str, value) -> None:
    fileio.atomic_write_json(path, _jsonable(value), allow_nan=False)


def _write_csv(path: str, rows) -> None:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    fileio.atomic_write(path, buffer.getvalue().encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------

def _display(modality: str) -> str:
    """A modality's name in table headers (the first task that has it says how; else as it is)."""
    for task in all_tasks():
        if modality in task.modalities and task.modality_titles:
            return task.modality_titles[task.modalities.index(modality)]
    return modality


def _row_keys(results) -> list:
    return list(results["subsets"]) + [MEAN_KEY]


def _row_label(key: str) -> str:
    return MEAN_LABEL if key == MEAN_KEY else key


def _scoring(results):
    """The scoring of the task the results name (their ``"task"``: a kind, or a name)."""
    return get_task(results["task"]).scoring


def _value(results, key: str, column: str, metric: str) -> float:
    value = _scoring(results).value(results["summary"][key], column, metric)
    return float("nan") if value is None else float(value)



def _presence(results, key: str) -> list:
    if key == MEAN_KEY:
        return [""] * len(results["modalities"])
    present = key.split("+")
    return ["●" if m in present else "○" for m in results["modalities"]]


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _footer(results, daggers: bool = True) -> list:
    scoring = _scoring(results)
    return ["", f"*{scoring.counted(results)} per subset. {MEAN_POLICY}.*"] + scoring.footer(results, daggers)


def markdown_report(results, title: str = "Missing-modality evaluation") -> str:
    """The paper-style Markdown table: one row per subset (presence dots + name) and the Average row; Dice and
    accuracy in %, HD95 in mm, 2 decimals."""
    scoring = _scoring(results)
    header = [_display(m) for m in results["modalities"]] + ["Subset"] + scoring.table_header(results["columns"])
    rows = []
    for key in _row_keys(results):
        label = f"**{MEAN_LABEL}**" if key == MEAN_KEY else key
        rows.append(_presence(results, key) + [label] + scoring.table_cells(
            results, key, lambda k, column, metric: _value(results, k, column, metric)))
    return "\n".join([f"# {title}", ""] + _table(header, rows) + _footer(results)) + "\n"


def _csv_columns(results) -> list:
    return _scoring(results).csv_columns(results["columns"])



# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------

def _score_matrix(results) -> tuple:
    """Rows: subsets + Average; columns: region Dice or accuracy, in %."""
    scoring = _scoring(results)
    keys = _row_keys(results)
    columns = results["columns"]
    matrix = np.array([[100.0 * _value(results, k, c, scoring.headline) for c in columns] for k in keys], dtype=float)
    return matrix, [_row_label(k) for k in keys], scoring.headline_labels(columns), scoring.headline_title


def _save_heatmap(results, path: str, title: str) -> None:
    matrix, rows, cols, label = _score_matrix(results)
    fig = new_figure(2.6 + 1.1 * len(cols), len(rows))
    ax = fig.add_subplot(1, 1, 1)
    heatmap_panel(fig, ax, matrix, rows, cols, title, "viridis", 0.0, 100.0, "{:.1f}", label)
    ax.set_ylabel("Available modalities")
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------

def write_reports(results, out_dir: str, title: str = "Missing-modality evaluation",
                  models: Mapping[str, dict] | None = None, name: str = "This model") -> dict:
    """Write the evaluation reports into ``out_dir`` and return their paths.

    * ``metrics.json``: the summary keyed by subset name plus ``"mean"`` (NaN written as ``null``).
    * ``metrics_per_case.json``: the full results (per-case metrics, policy, counts); :func:`load_results` reads it.
    * ``metrics.csv`` (one row per subset + ``mean``; Dice/accuracy as fractions, HD95 in mm) and
      ``metrics_per_case.csv``.
    * ``metrics.md``: the paper-style table (Dice/accuracy in %, 2 decimals) with the policies in its footer.
    * ``heatmap.png``: subsets x regions Dice (or accuracy) heat-map, values annotated.
    * ``overlays/<case>.png`` when the results kept overlay slices (segmentation, :mod:`shaspec_tf.overlays`): the
      reference, full-set and worst-subset segmentations over the MRI, listed at the end of ``metrics.md``.

    ``models``: other models' results (name -> results); when given, :func:`compare_models` also writes
    ``comparison.{md,csv,png}`` here, with these results called ``name``.
    """
    fileio.makedirs(out_dir)
    paths = {key: fileio.join(out_dir, file) for key, file in
             (("json", "metrics.json"), ("per_case_json", "metrics_per_case.json"), ("csv", "metrics.csv"),
              ("per_case_csv", "metrics_per_case.csv"), ("markdown", "metrics.md"), ("heatmap", "heatmap.png"))}
    _write_json(paths["json"], {key: results["summary"][key] for key in _row_keys(results)})
    _write_json(paths["per_case_json"], {**{k: v for k, v in results.items() if k != OVERLAY_KEY}, "title": title})

    columns = _csv_columns(results)
    rows = [["subset", *results["modalities"], *[c[0] for c in columns]]]
    for key in _row_keys(results):
        present = key.split("+")
        flags = [""] * len(results["modalities"]) if key == MEAN_KEY else \
            [int(m in present) for m in results["modalities"]]
        rows.append([key, *flags, *[csv_cell(_value(results, key, c, m)) for _, c, m in columns]])
    _write_csv(paths["csv"], rows)

    header, rows = _scoring(results).per_case_rows(results)
    _write_csv(paths["per_case_csv"], [header, *rows])

    overlays = write_overlays(results, out_dir)
    paths.update({f"overlay:{case_id}": path for case_id, path in overlays.items()})
    listed = {case_id: f"{OVERLAY_FOLDER}/{fileio.basename(path)}" for case_id, path in overlays.items()}
    fileio.atomic_write(paths["markdown"], (markdown_report(results, title) + markdown_section(results, listed))
                        .encode("utf-8"))
    _save_heatmap(results, paths["heatmap"], title)
    if models:
        paths.update({f"comparison_{k}": v for k, v in
                      compare_models({name: results, **dict(models)}, out_dir, title=f"{title}: comparison").items()})
    return paths


def _check_comparable(models: Mapping[str, dict]) -> dict:
    if not models:
        raise ValueError("compare_models needs at least one model's results")
    first_name, first = next(iter(models.items()))
    for model, results in models.items():
        for key in ("task", "modalities", "columns"):
            a = list(results[key]) if isinstance(results[key], (list, tuple)) else results[key]
            b = list(first[key]) if isinstance(first[key], (list, tuple)) else first[key]
            if a != b:
                raise ValueError(f"{model!r} and {first_name!r} differ in {key}: {a} vs {b}")
        if set(results["subsets"]) != set(first["subsets"]):
            raise ValueError(f"{model!r} and {first_name!r} were evaluated on different subsets, so their averages "
                             f"are not comparable: {sorted(set(results['subsets']) ^ set(first['subsets']))}")
    return first


def compare_models(models: Mapping[str, dict], out_dir: str, title: str = "Model comparison") -> dict:
    """Side-by-side tables and heat-maps of several models' :func:`evaluate_subsets` results.

    Writes ``comparison.md`` (Dice or accuracy in %, then HD95 in mm for segmentation; one column per region per
    model, the best value of each row and region in bold, the Average row last), ``comparison.csv`` (one row per
    subset + ``mean``; columns ``<model>:<region>_dice`` etc., raw fractions and mm) and ``comparison.png`` (one
    heat-map panel per model on a shared 0-100 scale, plus a difference panel, first model minus second, when there
    are exactly two). The models must share task, modalities, regions and evaluated subsets. Returns the paths.
    """
    first = _check_comparable(models)
    names = list(models)
    ordered = {n: {**r, "subsets": list(first["subsets"])} for n, r in models.items()}
    fileio.makedirs(out_dir)
    paths = {"markdown": fileio.join(out_dir, "comparison.md"), "csv": fileio.join(out_dir, "comparison.csv"),
             "heatmap": fileio.join(out_dir, "comparison.png")}
    scoring = _scoring(first)
    keys = _row_keys(ordered[names[0]])

    def section(metric: str, percent: bool, higher_is_better: bool, heading: str) -> list:
        columns = first["columns"]
        header = [_display(m) for m in first["modalities"]] + ["Subset"]
        header += [f"{scoring.column_label(c)} · {n}" for c in columns for n in names]
        rows = []
        for key in keys:
            cells = _presence(first, key) + [f"**{MEAN_LABEL}**" if key == MEAN_KEY else key]
            for c in columns:
                values = [_value(ordered[n], key, c, metric) for n in names]
                finite = [v for v in values if not math.isnan(v)]
                best = (max(finite) if higher_is_better else min(finite)) if len(set(finite)) > 1 else None
                cells += [f"**{fmt(v, percent)}**" if best is not None and v == best else fmt(v, percent)
                          for v in values]
            rows.append(cells)
        return [f"## {heading}", ""] + _table(header, rows) + [""]

    lines = [f"# {title}", "", "Models: " + ", ".join(f"**{n}** ({scoring.counted(ordered[n])})" for n in names), ""]
    for section_args in scoring.sections:
        lines += section(*section_args)
    lines += ["**Average** rows: " + "; ".join(
        f"{n}: " + ", ".join(f"{c} {fmt(_value(ordered[n], MEAN_KEY, c, scoring.headline), True)}"
                             for c in first["columns"]) for n in names) + scoring.averages_note]
    lines += _footer(first, daggers=False)[1:]
    lines.append(f"*Bold: the best value of the row for that {scoring.column_noun} (none on ties).*")
    fileio.atomic_write(paths["markdown"], ("\n".join(lines) + "\n").encode("utf-8"))

    columns = _csv_columns(first)
    _write_csv(paths["csv"], [["subset"] + [f"{n}:{col}" for col, _, _ in columns for n in names]] + [
        [key] + [csv_cell(_value(ordered[n], key, c, m)) for _, c, m in columns for n in names] for key in keys])

    panels = [(n, *_score_matrix(ordered[n])) for n in names]
    count = len(panels) + (1 if len(names) == 2 else 0)
    width_per = 2.6 + 1.1 * len(first["columns"])
    fig = new_figure(width_per * count, len(keys))
    for k, (n, matrix, rows, cols, label) in enumerate(panels):
        ax = fig.add_subplot(1, count, k + 1)
        heatmap_panel(fig, ax, matrix, rows if k == 0 else [""] * len(rows), cols, n, "viridis", 0.0, 100.0,
                       "{:.1f}", label, colorbar=k == len(panels) - 1)
    if len(names) == 2:
        diff = panels[0][1] - panels[1][1]
        finite = np.abs(diff[np.isfinite(diff)])
        limit = max(float(finite.max()) if finite.size else 0.0, 1.0)
        ax = fig.add_subplot(1, count, count)
        heatmap_panel(fig, ax, diff, [""] * len(keys), panels[0][3], f"{names[0]} − {names[1]}", "RdBu", -limit,
                       limit, "{:+.1f}", "difference (points)")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, paths["heatmap"])
    return paths


def check_report_folder(out_dir: str) -> bool:
    """Whether :func:`write_report_folder` may write ``out_dir``: ``False`` when it is absent or empty, ``True`` when
    it is an earlier report folder of ours left as written; otherwise a one-line ``FileExistsError`` (a user's
    folder is never replaced). Call it before a long evaluation to fail early."""
    return fileio.ensure_replaceable(out_dir, REPORT_KIND)


def write_report_folder(models: Mapping[str, dict], out_dir: str, titles: Mapping[str, str] | None = None,
                        comparison_title: str = "Model comparison") -> dict:
    """Write the reports of one model, or of several side by side, as one report folder ``out_dir``.

    One model: the :func:`write_reports` files in ``out_dir`` itself. Several: one subfolder per model (named by
    its key) plus :func:`compare_models`' ``comparison.{md,csv,png}`` at the top. ``titles``: model name -> report
    title (default: the name).

    The folder is built in a hidden staging folder beside ``out_dir`` and moved into place with
    :func:`shaspec_tf.fileio.replace_dir`, marked as a :data:`REPORT_KIND` output: an existing ``out_dir`` is
    replaced only when it is an earlier report folder of ours that nobody added files to; anything else is a
    one-line ``FileExistsError`` and nothing is touched. A failure leaves ``out_dir`` as it was. Returns
    ``{model name: paths}`` (plus ``"comparison"`` with several models), paths under ``out_dir``.
    """
    if not models:
        raise ValueError("write_report_folder needs at least one model's results")
    names = list(models)
    for name in names:
        if len(names) > 1 and (not name or name in (".", "..") or "/" in name or os.sep in name
                               or name.startswith(".")):
            raise ValueError(f"model name {name!r} cannot be a report subfolder; give a plain folder name")
    titles = dict(titles or {})
    check_report_folder(out_dir)
    staging = fileio.staging_dir(out_dir)
    try:
        written = {}
        for name in names:
            folder = staging if len(names) == 1 else fileio.join(staging, name)
            written[name] = write_reports(models[name], folder, title=titles.get(name, name), name=name)
        if len(names) > 1:
            written["comparison"] = compare_models(models, staging, title=comparison_title)
        fileio.replace_dir(staging, out_dir, REPORT_KIND)
    except BaseException:
        fileio.remove_tree(staging)
        raise
    prefix = len(staging.rstrip("/")) + 1  # every path written lies under staging, spelt as joined onto it
    return {key: {k: fileio.join(str(out_dir), v[prefix:]) for k, v in paths.items()}
            for key, paths in written.items()}
