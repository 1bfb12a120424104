"""How a task's predictions are scored and reported, per kind of output: the strategies behind
:mod:`shaspec_tf.evaluation` (which stays generic) and the TFX evaluator's blessing score.

* :class:`RegionScoring` (segmentation): Dice and HD95 per region of a label map; a region is a set of label values
  (BraTS: ET {4}, WT {1, 2, 4}, TC {1, 4}). A subset's numbers are means over its cases.
* :class:`AccuracyScoring` (classification): accuracy, pooled over every sample of a subset.

A task holds one (``Task.scoring``); the results dict :func:`shaspec_tf.evaluation.evaluate_subsets` returns names
the task's kind under ``"task"``, and the reports find the scoring again through
:func:`shaspec_tf.tasks.get_task`.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

MEAN_KEY = "mean"
MEAN_POLICY = "Average = mean of the subset means (every subset weighs the same)"
ACCURACY_POLICY = "Accuracy pools every sample of a subset (correct / total)"


def nanmean(values) -> float:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(values)) if values else float("nan")


def fmt(value: float, percent: bool) -> str:
    """A table cell: ``n/a`` for NaN, else 2 decimals (fractions as %)."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100.0 * value:.2f}" if percent else f"{value:.2f}"


def csv_cell(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))


class Scoring:
    """The interface (and the shared parts) of a scoring; see the subclasses."""

    kind = ""                       # the model configuration's "task" these results carry
    metrics: tuple = ()             # metric names of a column, in report order
    headline = ""                   # the metric of heat-maps, averages and the blessing score
    headline_title = ""             # its colour-bar label, e.g. "Dice (%)"
    averages_note = ""              # closes the comparison's line of Average rows
    column_noun = "metric"          # what a column is, in the comparison's footnote
    sections: tuple = ()            # comparison sections: (metric, percent, higher is better, heading)

    # -- computing --------------------------------------------------------------------------------------------------
    def default_regions(self) -> dict:
        return {}

    def columns(self, regions: Mapping) -> list:
        raise NotImplementedError

    def score_case(self, prediction, case, *, spacing, empty_penalty, regions, hd_method) -> dict:
        raise NotImplementedError

    def summarise(self, per_case: dict, names: list, columns: list) -> tuple:
        """``(summary, undefined)``: subset -> metrics, plus ``MEAN_KEY`` (the mean of the subset means)."""
        raise NotImplementedError

    def policy(self, empty_penalty, hd_method: str, regions: Mapping) -> dict:
        raise NotImplementedError

    # -- reading results --------------------------------------------------------------------------------------------
    def value(self, row: dict, column: str, metric: str) -> float:
        raise NotImplementedError

    def subset_score(self, row: dict, columns) -> float:
        """One number per subset (the TFX evaluator's blessing score): the headline metric averaged over columns."""
        columns = list(columns)
        return float(sum(float(self.value(row, c, self.headline)) for c in columns) / len(columns))

    def column_label(self, column: str) -> str:
        return column

    def headline_labels(self, columns) -> list:
        raise NotImplementedError

    # -- reports ----------------------------------------------------------------------------------------------------
    def table_header(self, columns) -> list:
        raise NotImplementedError

    def table_cells(self, results: dict, key: str, value) -> list:
        """The metric cells of one Markdown row; ``value(key, column, metric)`` reads the summary."""
        raise NotImplementedError

    def csv_columns(self, columns) -> list:
        """``[(header, column, metric), ...]`` of ``metrics.csv``."""
        raise NotImplementedError

    def per_case_rows(self, results: dict) -> tuple:
        """``(header, rows)`` of ``metrics_per_case.csv``."""
        raise NotImplementedError

    def footer(self, results: dict, daggers: bool) -> list:
        """The policy lines under a table (after the cases/averaging line)."""
        raise NotImplementedError

    def counted(self, results: dict) -> str:
        """What one subset's figures are computed over, e.g. ``"6 cases"``."""
        return f"{results['n_cases']} cases"



class RegionScoring(Scoring):
    """Segmentation: Dice and HD95 per region of predicted vs reference label maps (``case["labels"]``)."""

    kind = "segmentation"
    metrics = ("dice", "hd95")
    headline = "dice"
    headline_title = "Dice (%)"
    averages_note = " (Dice %)."
    column_noun = "region"
    sections = (("dice", True, True, "Dice (%)"), ("hd95", False, False, "HD95 (mm)"))

    def __init__(self, label_regions: Mapping, kind: str = "segmentation"):
        self.label_regions = {name: tuple(values) for name, values in label_regions.items()}
        self.kind = kind

    def default_regions(self) -> dict:
        return dict(self.label_regions)

    def columns(self, regions: Mapping) -> list:
        return list(regions)

    def score_case(self, prediction, case, *, spacing, empty_penalty, regions, hd_method) -> dict:
        from shaspec_tf.metrics import region_metrics

        return region_metrics(prediction, case["labels"], case.get("spacing", spacing) if isinstance(case, Mapping)
                              else spacing, empty_penalty=empty_penalty, regions=regions, hd_method=hd_method)

    def summarise(self, per_case: dict, names: list, columns: list) -> tuple:
        summary, undefined = {}, {}
        for name in names:
            scores = per_case[name].values()
            summary[name] = {r: {"dice": float(np.mean([s[r]["dice"] for s in scores])),
                                 "hd95": nanmean(s[r]["hd95"] for s in scores)} for r in columns}
            undefined[name] = {r: int(sum(math.isnan(s[r]["hd95"]) for s in scores)) for r in columns}
        summary[MEAN_KEY] = {r: {"dice": float(np.mean([summary[n][r]["dice"] for n in names])),
                                 "hd95": nanmean(summary[n][r]["hd95"] for n in names)} for r in columns}
        return summary, undefined

    def policy(self, empty_penalty, hd_method: str, regions: Mapping) -> dict:
        from shaspec_tf.metrics import BRATS_EMPTY_POLICY, HD95_EMPTY_POLICY, hd95_method_text

        return dict(dice=BRATS_EMPTY_POLICY, hd95=HD95_EMPTY_POLICY if empty_penalty is None else
                    f"HD95: both masks empty -> 0 mm; exactly one mask empty -> {empty_penalty:g} mm",
                    hd95_method=hd95_method_text(hd_method), hd95_convention=hd_method,
                    regions={r: list(v) for r, v in regions.items()})

    def value(self, row: dict, column: str, metric: str) -> float:
        return row[column][metric]

    def headline_labels(self, columns) -> list:
        return [f"{c} Dice" for c in columns]

    def table_header(self, columns) -> list:
        return [f"{r} Dice (%)" for r in columns] + [f"{r} HD95 (mm)" for r in columns]

    def table_cells(self, results: dict, key: str, value) -> list:
        undefined = results.get("hd95_undefined", {})
        cells = [fmt(value(key, r, "dice"), True) for r in results["columns"]]
        return cells + [fmt(value(key, r, "hd95"), False) + ("†" if undefined.get(key, {}).get(r) else "")
                        for r in results["columns"]]

    def csv_columns(self, columns) -> list:
        return [(f"{r}_dice", r, "dice") for r in columns] + [(f"{r}_hd95_mm", r, "hd95") for r in columns]

    def per_case_rows(self, results: dict) -> tuple:
        rows = [[subset, case_id, region, csv_cell(scores[region]["dice"]), csv_cell(scores[region]["hd95"])]
                for subset in results["subsets"] for case_id, scores in results["per_case"][subset].items()
                for region in results["columns"]]
        return ["subset", "case_id", "region", "dice", "hd95_mm"], rows

    def footer(self, results: dict, daggers: bool) -> list:
        from shaspec_tf.metrics import BRATS_EMPTY_POLICY, HD95_EMPTY_POLICY, HD95_METHOD

        policy = results.get("policy", {})
        regions = policy.get("regions", {r: list(v) for r, v in self.label_regions.items()})
        lines = ["*Regions: " + ", ".join(f"{r} = {{{', '.join(str(v) for v in vals)}}}"
                                          for r, vals in regions.items()) + ".*",
                 f"*Empty-mask policy: {BRATS_EMPTY_POLICY}; an empty prediction against a non-empty reference "
                 f"scores 0. {policy.get('hd95', HD95_EMPTY_POLICY)}.*",
                 f"*{policy.get('hd95_method', HD95_METHOD)}.*"]
        if results.get("empty_penalty") is None:
            lines.append("*HD95 means leave out the undefined cases (n/a: undefined for every case), so they can look "
                         "better than the Dice; evaluate with empty_penalty=373.13 for BraTS-challenge-style means.*")
        if daggers and any(n for row in results.get("hd95_undefined", {}).values() for n in row.values()):
            lines.append("*† HD95 undefined (exactly one mask empty) for some cases of this subset: those cases are "
                         "left out of its HD95 mean; see metrics_per_case.json.*")
        return lines


class AccuracyScoring(Scoring):
    """Classification: accuracy against ``case["label"]`` (one label or a batch of them), pooled per subset."""

    kind = "classification"
    metrics = ("accuracy",)
    headline = "accuracy"
    headline_title = "Accuracy (%)"
    averages_note = " (accuracy %)."
    sections = (("accuracy", True, True, "Accuracy (%)"),)

    def __init__(self, kind: str = "classification"):
        self.kind = kind

    def columns(self, regions: Mapping) -> list:
        return ["accuracy"]

    def score_case(self, prediction, case, *, spacing, empty_penalty, regions, hd_method) -> dict:
        from shaspec_tf.metrics import accuracy

        label = np.asarray(case["label"])
        scores = {"accuracy": accuracy(prediction, label), "count": int(label.size)}
        scores["correct"] = int(round(scores["accuracy"] * label.size))
        return scores

    def summarise(self, per_case: dict, names: list, columns: list) -> tuple:
        summary = {}
        for name in names:
            scores = per_case[name].values()
            summary[name] = {"accuracy": sum(s["correct"] for s in scores) / sum(s["count"] for s in scores)}
        summary[MEAN_KEY] = {"accuracy": float(np.mean([summary[n]["accuracy"] for n in names]))}
        return summary, {}

    def policy(self, empty_penalty, hd_method: str, regions: Mapping) -> dict:
        return dict(accuracy=ACCURACY_POLICY)

    def value(self, row: dict, column: str, metric: str) -> float:
        return row[metric]

    def column_label(self, column: str) -> str:
        return "Accuracy"

    def headline_labels(self, columns) -> list:
        return ["Accuracy"]

    def table_header(self, columns) -> list:
        return ["Accuracy (%)"]

    def table_cells(self, results: dict, key: str, value) -> list:
        return [fmt(value(key, "accuracy", "accuracy"), True)]

    def csv_columns(self, columns) -> list:
        return [("accuracy", "accuracy", "accuracy")]

    def per_case_rows(self, results: dict) -> tuple:
        rows = [[subset, case_id, csv_cell(scores["accuracy"]), scores["correct"], scores["count"]]
                for subset in results["subsets"] for case_id, scores in results["per_case"][subset].items()]
        return ["subset", "case_id", "accuracy", "correct", "count"], rows

    def footer(self, results: dict, daggers: bool) -> list:
        return [f"*{results.get('policy', {}).get('accuracy', ACCURACY_POLICY)}.*"]

    def counted(self, results: dict) -> str:
        """The samples pooled per subset (a "case" here is a batch of them)."""
        per_case = results.get("per_case") or {}
        first = next(iter(per_case.values()), None)
        if not first or not all("count" in scores for scores in first.values()):
            return super().counted(results)
        return f"{sum(int(scores['count']) for scores in first.values())} samples"
