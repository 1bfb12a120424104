"""``MissingModalityEvaluator``: scores a trained model on every modality subset and blesses it or not.

A missing-modality model is only as good as its worst subset, so the blessing looks at two numbers per model: the
mean over the 2^M - 1 subsets and the worst subset, where a subset's score is its mean Dice over ET / WT / TC
(BraTS) or its accuracy (AV-MNIST). The candidate is blessed when

* ``mean >= min_mean`` and ``worst >= min_worst`` (absolute thresholds from the pipeline config), and
* when a blessed model exists (``baseline_model``, from TFX's latest-blessed-model resolver), neither its mean nor its
  worst subset falls more than ``max_regression`` below that model's on the same evaluation data.

The thresholds have no defaults here: they come from the pipeline config (``pipeline.configs.TaskConfig``), as do
``split`` (default: the task's evaluation split) and ``overlap`` (default: ``shaspec_tf.inference``'s).

The ``evaluation`` artifact holds the candidate's report (``metrics.json``, ``metrics.csv``, ``metrics.md``,
``heatmap.png``, and for segmentation ``overlays/<case>.png``: the reference, full-set and worst-subset label maps
over the MRI of the first cases, listed in ``metrics.md``; ``shaspec_tf.evaluation.write_reports``, HD95 as the
official BraTS evaluation package computes it), the baseline's beside it and a side-by-side comparison when there is
one, and ``verdict.json``. The ``blessing`` artifact carries the properties the Pusher and the resolver read
(``blessed``, ``current_model``, ``current_model_id``) and a ``BLESSED`` or ``NOT_BLESSED`` file, as TFX's Evaluator.
Every file goes through :mod:`shaspec_tf.fileio`, so the artifacts may live on ``gs://`` (Kubeflow, Vertex AI).
"""

from typing import Optional, Tuple

from tfx import v1 as tfx
from tfx.components.evaluator import executor as tfx_evaluator
from tfx.types import standard_artifacts

from shaspec_tf import fileio

InputArtifact = tfx.dsl.components.InputArtifact
OutputArtifact = tfx.dsl.components.OutputArtifact
Parameter = tfx.dsl.components.Parameter

SHASPEC_FORMAT = "Format-Shaspec"     # inside a Model artifact: model_config.json + model.weights.h5 (shaspec train)


def subset_scores(results: dict) -> dict:
    """Subset name -> score from ``evaluate_subsets`` results: the task's blessing metric
    (``Scoring.subset_score``: mean Dice over the regions, or accuracy)."""
    from shaspec_tf.tasks import get_task

    scoring = get_task(results["task"]).scoring
    return {name: scoring.subset_score(results["summary"][name], results["columns"]) for name in results["subsets"]}


def summarise(results: dict) -> dict:
    """``{"mean", "worst", "worst_subset", "scores"}`` of one model's results."""
    scores = subset_scores(results)
    worst = min(scores, key=scores.get)
    return {"mean": sum(scores.values()) / len(scores), "worst": scores[worst], "worst_subset": worst,
            "scores": scores}


def judge(candidate: dict, baseline: Optional[dict], min_mean: float, min_worst: float,
          max_regression: float) -> Tuple[bool, list]:
    """Bless or not, with the reasons: ``(blessed, ["mean 0.71 < min_mean 0.80", ...])`` (empty when blessed)."""
    reasons = []
    if candidate["mean"] < min_mean:
        reasons.append(f"mean {candidate['mean']:.4f} < min_mean {min_mean:.4f}")
    if candidate["worst"] < min_worst:
        reasons.append(f"worst subset {candidate['worst_subset']} {candidate['worst']:.4f} < min_worst "
                       f"{min_worst:.4f}")
    if baseline is not None:
        for key in ("mean", "worst"):
            if candidate[key] < baseline[key] - max_regression:
                reasons.append(f"{key} {candidate[key]:.4f} falls below the blessed model's {baseline[key]:.4f} "
                               f"by more than {max_regression:.4f}")
    return not reasons, reasons


def model_folder(model) -> str:
    """The ``shaspec train`` folder inside a TFX ``Model`` artifact."""
    return fileio.join(model.uri, SHASPEC_FORMAT)


@tfx.dsl.components.component
def MissingModalityEvaluator(
        examples: InputArtifact[standard_artifacts.Examples],
        model: InputArtifact[standard_artifacts.Model],
        evaluation: OutputArtifact[standard_artifacts.ModelEvaluation],
        blessing: OutputArtifact[standard_artifacts.ModelBlessing],
        task: Parameter[str],
        min_mean: Parameter[float],
        min_worst: Parameter[float],
        max_regression: Parameter[float],
        baseline_model: InputArtifact[standard_artifacts.Model] = None,
        split: Parameter[str] = None,
        overlap: Parameter[float] = None):
    """Evaluate ``model`` on every modality subset of ``examples`` (``split``; default the task's evaluation split)
    and bless it against the thresholds and the latest blessed ``baseline_model``."""
    from shaspec_tf.compile_cache import enable_compile_cache
    from shaspec_tf.evaluation import compare_models, write_reports
    from shaspec_tf.tasks import get_task
    from shaspec_tf.trained import evaluate_trained

    split = get_task(task).split(split)
    out = evaluation.uri

    def score(artifact, folder):
        enable_compile_cache()  # the whole-volume program is compiled once per machine (shaspec_tf.compile_cache)
        results = evaluate_trained(model_folder(artifact), examples.uri, split=split, overlap=overlap)
        write_reports(results, fileio.join(out, folder), title=f"{task}: {folder} model (artifact "
                                                                 f"{artifact.id}), split {split}")
        return results

    candidate = score(model, "candidate")
    verdict = {"task": task, "split": split, "thresholds": {"min_mean": min_mean, "min_worst": min_worst,
                                                            "max_regression": max_regression},
               "candidate": {"model": model.uri, "model_id": model.id, **summarise(candidate)}}
    baseline_summary = None
    if baseline_model is not None and baseline_model.id != model.id:
        baseline = score(baseline_model, "baseline")
        baseline_summary = summarise(baseline)
        verdict["baseline"] = {"model": baseline_model.uri, "model_id": baseline_model.id, **baseline_summary}
        compare_models({"candidate": candidate, "blessed": baseline}, fileio.join(out, "comparison"),
                       title=f"{task}: candidate vs the latest blessed model")
    blessed, reasons = judge(verdict["candidate"], baseline_summary, min_mean, min_worst, max_regression)
    verdict.update(blessed=blessed, reasons=reasons)
    fileio.atomic_write_json(fileio.join(out, "verdict.json"), verdict, sort_keys=True)

    blessing.set_int_custom_property("blessed", int(blessed))
    blessing.set_string_custom_property("current_model", model.uri)
    blessing.set_int_custom_property("current_model_id", model.id)
    blessing.set_float_custom_property("mean_score", verdict["candidate"]["mean"])
    blessing.set_float_custom_property("worst_score", verdict["candidate"]["worst"])
    if baseline_summary is not None:
        blessing.set_string_custom_property("baseline_model", baseline_model.uri)
        blessing.set_int_custom_property("baseline_model_id", baseline_model.id)
    if reasons:
        blessing.set_string_custom_property("reasons", "; ".join(reasons))
    fileio.makedirs(blessing.uri)
    fileio.atomic_write(fileio.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"),
                        "\n".join(reasons) + ("\n" if reasons else ""))


class VertexEvaluatorExecutor(MissingModalityEvaluator.EXECUTOR_SPEC.executor_class, tfx_evaluator.Executor):
    """The evaluator's executor as the Kubeflow V2 / Vertex AI pipeline runs it. TFX's container entrypoint turns the
    blessing's ``current_model_id`` into the model's Vertex resource name only for executors that are TFX Evaluators,
    and the latest-blessed-model resolver matches models by that name: with the plain executor the resolver never
    finds the blessed model, and the regression check against it never runs in the cloud. The work is the same (this
    class's ``Do`` is the component's)."""
