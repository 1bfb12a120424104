"""The task abstraction: the registry, each task's constants and defaults in one place, the mask rule, and a third
(toy) task defined here going through the generic code paths (splits, files, defaults, mask rule, evaluation and
its reports, schema rules, pipeline config) without any of them knowing its name."""
import dataclasses
import json

import numpy as np
import pytest

from shaspec_tf import tasks
from shaspec_tf.data.masks import check_modality_mask, subset_name
from shaspec_tf.tasks import AVMNIST, BRATS, FeatureRule, Task, TrainDefaults, get_task
from shaspec_tf.scoring import RegionScoring


# ------------------------------------------------------------------------------------------------------------ registry

def test_get_task_takes_names_kinds_and_tasks_and_refuses_the_rest_in_one_line():
    assert get_task("brats") is BRATS and get_task("avmnist") is AVMNIST
    assert get_task("segmentation") is BRATS and get_task("classification") is AVMNIST
    assert get_task(BRATS) is BRATS
    for bad in ("regression", "", None, 3):
        with pytest.raises(ValueError, match="unknown task") as error:
            get_task(bad)
        assert "\n" not in str(error.value) and "brats, avmnist" in str(error.value)
    assert tasks.task_names()[:2] == ("brats", "avmnist")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(BRATS)
    with pytest.raises(ValueError, match="already a task kind"):
        tasks.register(dataclasses.replace(BRATS, name="segmentation"))


def test_models_are_matched_to_their_task_by_kind_and_modalities():
    assert tasks.task_for_model({"task": "segmentation", "modalities": list(BRATS.modalities)}) is BRATS
    assert tasks.task_for_model({"task": "classification"}) is AVMNIST
    with pytest.raises(ValueError, match="unknown task 'regression' in the model configuration"):
        tasks.task_for_model({"task": "regression"})


def test_presets_belong_to_one_task():
    assert tasks.task_for_preset("small") is BRATS and tasks.task_for_preset("paper") is BRATS
    assert tasks.task_for_preset("avmnist-tiny") is AVMNIST
    with pytest.raises(ValueError, match="unknown preset 'huge': expected one of .*tiny.*avmnist"):
        tasks.task_for_preset("huge")


# ------------------------------------------------------------------------------------------- each constant, once

def test_splits_defaults_and_constants_are_the_tasks():
    assert (BRATS.train_split, BRATS.eval_split) == ("train", "eval")
    assert (AVMNIST.train_split, AVMNIST.eval_split) == ("train", "test")
    assert BRATS.split(None) == BRATS.split("") == "eval" and AVMNIST.split("train") == "train"
    assert BRATS.train_defaults.preset == "small" and AVMNIST.train_defaults.preset == "avmnist"
    assert (BRATS.kind, AVMNIST.kind) == ("segmentation", "classification")

    from shaspec_tf.data import beam_brats, schema
    from shaspec_tf.metrics import BRATS_LABEL_REGIONS
    from shaspec_tf.models import presets

    # the Keras-only model library keeps its own copy: it must agree with the task's
    assert presets.BRATS_MODALITIES == BRATS.modalities == schema.BRATS_MODALITIES
    assert presets.BRATS_REGIONS == BRATS.regions == tuple(BRATS_LABEL_REGIONS)
    assert presets.AVMNIST_MODALITIES == AVMNIST.modalities == schema.AVMNIST_MODALITIES
    assert presets.SEGMENTER_PRESETS["paper"]["task"] == BRATS.kind
    assert presets.CLASSIFIER_PRESETS["avmnist"]["task"] == AVMNIST.kind
    assert BRATS.label_values == (0, 1, 2, 4) and AVMNIST.label_values == tuple(range(10))
    assert beam_brats.SPLITS == BRATS.splits


def test_inference_settings_come_from_the_crop_and_the_inference_module():
    import inspect

    from shaspec_tf.inference import sliding_window_predict

    defaults = inspect.signature(sliding_window_predict).parameters
    options = BRATS.inference_options({"crop_size": [32, 64, 64]})
    assert options["roi_size"] == (32, 64, 64) and options["overlap"] == defaults["overlap"].default
    assert options["sigma_scale"] == defaults["sigma_scale"].default and options["mode"] == defaults["mode"].default
    assert BRATS.inference_options({"crop_size": [32, 64, 64]}, roi_size=(16, 32, 32), overlap=0.5)[
        "roi_size"] == (16, 32, 32)
    assert "precision" not in options  # the window's own default (fp32) unless asked
    assert BRATS.inference_options({"crop_size": [32, 64, 64]}, precision="bf16")["precision"] == "bf16"
    assert AVMNIST.inference_options({}) == {} and AVMNIST.inference_options({}, precision="fp32") == {}
    with pytest.raises(ValueError, match="precision 'bf16' applies to sliding-window inference, which task 'avmnist'"):
        AVMNIST.inference_options({}, precision="bf16")


def test_record_features_are_what_the_writers_write():
    from shaspec_tf.data.schema import BratsRecord, avmnist_example, brats_example

    image = np.ones((4, 4, 4, 4), np.float32)
    brats = brats_example(BratsRecord("a", image, np.ones(4, np.int64), np.zeros((4, 4, 4), np.uint8)))
    assert set(brats.features.feature) == set(BRATS.record_features)
    av = avmnist_example("s", np.zeros((28, 28)), np.zeros((20, 20)), [1, 0], 3)
    assert set(av.features.feature) == set(AVMNIST.record_features)
    assert set(BRATS.stats_features) <= set(BRATS.record_features)
    assert set(AVMNIST.stats_features) <= set(AVMNIST.record_features)


# ------------------------------------------------------------------------------------------------------- mask rule

def test_the_mask_rule_is_one_function_that_the_writers_and_tasks_call():
    assert check_modality_mask([0, 1, 0, 1], BRATS.modalities).tolist() == [0, 1, 0, 1]
    assert check_modality_mask(np.array([1.0, 0.0]), 2).tolist() == [1.0, 0.0]
    for bad, message in (([1, 0, 1], "4 values"), ([1, 2, 0, 0], "each 0 or 1"), ([0, 0, 0, 0], "all-zero"),
                         ([[1, 0, 1, 1]], "4 values"), (["a", 0, 1, 1], "each 0 or 1")):
        with pytest.raises(ValueError, match=message) as error:
            check_modality_mask(bad, BRATS.modalities, "case 'x'")
        assert str(error.value).startswith("case 'x': ") and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="all-zero"):
        AVMNIST.check_mask([0, 0])
    assert BRATS.subset_mask("flair+t1ce") == [1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"unknown modalities \['t3'\]"):
        BRATS.subset_mask("t3")

    from shaspec_tf.data.schema import BratsRecord, avmnist_example, brats_example

    with pytest.raises(ValueError, match="case 'c': all-zero modality mask"):
        brats_example(BratsRecord("c", np.zeros((4, 4, 4, 4), np.float32), np.zeros(4, np.int64)))
    with pytest.raises(ValueError, match="sample 's': modality_mask must be 2 values"):
        avmnist_example("s", np.zeros((28, 28)), np.zeros((20, 20)), [1, 1, 0], 3)
    with pytest.raises(ValueError, match="all-zero"):
        subset_name([0, 0], AVMNIST.modalities)


# ------------------------------------------------------------------------------------------------- a third task

@dataclasses.dataclass(frozen=True)
class ToyTask(Task):
    """A two-modality 2D segmentation task: ultrasound and CT slices, one lesion region."""

    def model_inputs(self, features):
        return {"image": features["image"], "modality_mask": features["modality_mask"]}, features["label"]


TOY = ToyTask(
    name="toy2d", kind="toy-segmentation", title="Toy 2D", modalities=("us", "ct"), modality_titles=("US", "CT"),
    regions=("lesion",), train_defaults=TrainDefaults(preset="tiny", batch_size=8, learning_rate=3e-4,
                                                      optimizer="adam", weight_decay=0.0, drop_rate=0.5),
    scoring=RegionScoring({"lesion": (1, 2)}, kind="toy-segmentation"), splits=("fit", "holdout"),
    record_layout="{data}/{split}.toy.tfrecord", stats_features=("task", "modality_mask"), label_values=(0, 1, 2))


@pytest.fixture
def toy():
    tasks.register(TOY)
    try:
        yield TOY
    finally:
        tasks.unregister(TOY.name)
    assert TOY.name not in tasks.task_names()


def test_a_third_task_is_found_by_name_and_kind_and_its_model_configs(toy):
    assert get_task("toy2d") is toy and get_task("toy-segmentation") is toy
    assert get_task("segmentation") is BRATS            # the kinds of the others are untouched
    assert tasks.task_for_model({"task": "toy-segmentation", "modalities": ["us", "ct"]}) is toy
    assert toy.model_inputs({"image": 1, "modality_mask": 2, "label": 3}) == ({"image": 1, "modality_mask": 2}, 3)


def test_a_third_task_brings_its_splits_and_record_layout(toy, tmp_path):
    import tensorflow as tf

    from shaspec_tf.data.files import split_files, split_patterns

    assert split_patterns(str(tmp_path), "fit", "toy2d") == [f"{tmp_path}/fit.toy.tfrecord",
                                                             f"{tmp_path}/Split-fit/*"]
    for split in ("fit", "holdout"):
        with tf.io.TFRecordWriter(str(tmp_path / f"{split}.toy.tfrecord")) as writer:
            writer.write(b"x")
    assert split_files(str(tmp_path), None, "toy2d") == [str(tmp_path / "holdout.toy.tfrecord")]
    assert split_files(str(tmp_path), toy.train_split, "toy2d") == [str(tmp_path / "fit.toy.tfrecord")]
    with pytest.raises(FileNotFoundError, match="no test TFRecords .*run 'shaspec prepare toy2d'"):
        split_files(str(tmp_path), "test", "toy2d")


def test_a_third_task_brings_its_training_defaults_and_mask_rule(toy):
    from shaspec_tf.training.trainer import TrainConfig

    resolved = TrainConfig(task="toy2d", data="d", out="o", steps=1).resolved()
    assert (resolved.preset, resolved.batch_size, resolved.learning_rate, resolved.optimizer, resolved.drop_rate) \
        == ("tiny", 8, 3e-4, "adam", 0.5)
    assert TrainConfig(task="toy-segmentation", data="d", out="o", steps=1).resolved().task == "toy2d"
    assert toy.subset_mask("ct") == [0, 1]
    with pytest.raises(ValueError, match="all-zero"):
        toy.check_mask([0, 0])
    with pytest.raises(ValueError, match="unknown modalities"):
        toy.subset_mask("flair")


def test_a_third_task_is_evaluated_and_reported_by_the_generic_evaluation(toy, tmp_path):
    from shaspec_tf.evaluation import compare_models, evaluate_subsets, load_results, markdown_report, write_reports

    labels = np.zeros((16, 16), np.uint8)
    labels[4:10, 4:10] = 1
    labels[6:8, 6:8] = 2
    cases = [{"case_id": "slice0", "labels": labels}, {"case_id": "slice1", "labels": np.roll(labels, 3, axis=0)}]

    def predict(case, mask):   # perfect with CT, the lesion shifted by one pixel with ultrasound only
        return case["labels"] if mask[1] else np.roll(case["labels"], 1, axis=1)

    results = evaluate_subsets(predict, cases, toy.modalities, task="toy2d", progress=False)
    assert results["task"] == "toy-segmentation" and results["columns"] == ["lesion"]
    assert results["subsets"] == ["us", "ct", "us+ct"] and results["policy"]["regions"] == {"lesion": [1, 2]}
    summary = results["summary"]
    assert summary["ct"]["lesion"]["dice"] == 1.0 and summary["us+ct"]["lesion"]["hd95"] == 0.0
    assert summary["us"]["lesion"]["dice"] == pytest.approx(2 * 30 / 72)   # 6x6 lesion shifted by one column
    assert summary["mean"]["lesion"]["dice"] == pytest.approx((2 * 30 / 72 + 2) / 3)
    assert toy.scoring.subset_score(summary["us"], results["columns"]) == summary["us"]["lesion"]["dice"]

    table = markdown_report(results, "Toy")
    assert "| US | CT | Subset | lesion Dice (%) | lesion HD95 (mm) |" in table
    assert "*Regions: lesion = {1, 2}.*" in table
    paths = write_reports(results, str(tmp_path / "report"), title="Toy")
    assert json.load(open(paths["json"]))["ct"]["lesion"]["dice"] == 1.0
    assert load_results(paths["per_case_json"])["task"] == "toy-segmentation"
    other = evaluate_subsets(lambda case, mask: case["labels"], cases, toy.modalities, task="toy2d", progress=False)
    compared = compare_models({"toy": results, "oracle": other}, str(tmp_path / "compare"))
    assert "lesion · oracle" in open(compared["markdown"]).read()


def test_a_third_task_brings_its_schema_rules_and_pipeline_branch(toy):
    from pipeline.configs import TaskConfig
    from shaspec_tf.data.schema import SCHEMA_VERSION

    rules = {rule.name: rule for rule in toy.schema_rules()}
    assert rules["present_modalities"] == FeatureRule("present_modalities", strings=("us", "ct"), min_count=1,
                                                      max_count=2)
    assert rules["task"].strings == ("toy2d",) and rules["modality_mask"].ints == (0, 1)
    assert rules["schema_version"].ints == (SCHEMA_VERSION, SCHEMA_VERSION)
    branch = TaskConfig(task="toy2d", input_dir="in", steps=5)
    assert branch.model_name == "shaspec-toy2d"
    assert branch.evaluator_options()["split"] == "holdout"
    assert branch.train_custom_config() == {"task": "toy2d", "steps": 5}


# --------------------------------------------------------------------------- configs: one default, the same names

def test_pipeline_configs_pass_trainconfig_names_and_set_no_defaults_of_their_own():
    from pipeline.configs import TaskConfig
    from shaspec_tf.training.trainer import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    branch = TaskConfig(task="brats", input_dir="in", steps=7, run_eagerly=True, jit_compile=False,
                        crop_size=(32, 64, 64), overlap=0.5)
    custom = branch.train_custom_config()
    assert custom == {"task": "brats", "steps": 7, "run_eagerly": True, "jit_compile": False,
                      "crop_size": [32, 64, 64], "overlap": 0.5}
    assert set(custom) - {"overlap"} <= train_fields
    # every TrainConfig option is a TaskConfig field of the same name, which defaults to None (its default lives in
    # TrainConfig or the task), except the branch's length
    assert train_fields - {"task", "data", "out"} <= {f.name for f in dataclasses.fields(TaskConfig)}
    for f in dataclasses.fields(TaskConfig):
        if f.name in train_fields - {"task"}:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert default in (None, {}) or f.name == "steps", f.name
    assert TrainConfig(task="brats", data="d", out="o", **{k: v for k, v in custom.items()
                                                          if k in train_fields - {"task"}}).resolved().steps == 7
    options = branch.evaluator_options()
    assert options == {"task": "brats", "split": "eval", "min_mean": 0.0, "min_worst": 0.0, "max_regression": 0.05,
                       "overlap": 0.5}
    assert TaskConfig(task="avmnist", input_dir="in").evaluator_options()["split"] == "test"
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        TaskConfig(task="mnist", input_dir="in")
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        TaskConfig(task="avmnist", input_dir="in", epochs=3)
