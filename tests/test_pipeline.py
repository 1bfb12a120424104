"""The TFX pipeline end to end under LocalDagRunner (tiny presets), its metadata after a failure, the curated schema's
anomalies, the blessing rule, the idempotent Pusher and the Kubeflow V2 / Vertex AI spec."""
import glob
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("tfx")

from components.evaluator import judge, summarise  # noqa: E402
from components.pusher import pushed_version_of  # noqa: E402
from components.schema_curation import curate_schema, stats_features  # noqa: E402
from pipeline import configs  # noqa: E402
from pipeline.local_runner import run  # noqa: E402

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]


def _has_avmnist() -> bool:
    try:
        configs.avmnist_data_dir()
        return True
    except (FileNotFoundError, OSError):
        return False


needs_avmnist = pytest.mark.skipif(not _has_avmnist(), reason="AV-MNIST data not found (SHASPEC_DATA, ../shared/data)")
COMPLETE, FAILED, CACHED = 3, 4, 5   # ml_metadata Execution.State


def executions_by_run(metadata_path):
    """``[{node_id: state}, ...]`` per pipeline run, oldest first, read from the SQLite metadata store."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = metadata_path
    store = metadata_store.MetadataStore(connection)
    kinds = {t.id: t.name for t in store.get_context_types()}
    runs, started = {}, {}
    for execution in store.get_executions():
        names = {kinds[c.type_id]: c.name for c in store.get_contexts_by_execution(execution.id)}
        run_name, node = names.get("pipeline_run"), names.get("node", "").split(".", 1)[-1]
        runs.setdefault(run_name, {})[node] = execution.last_known_state
        started[run_name] = min(started.get(run_name, execution.id), execution.id)
    return [runs[name] for name in sorted(runs, key=started.get)]


def _versions(config, task):
    return sorted(glob.glob(os.path.join(config.serving_dir, config.task(task).model_name, "[0-9]*")))


def _latest(root, component, output):
    folders = glob.glob(os.path.join(root, component, output, "*"))
    return max(folders, key=lambda p: int(os.path.basename(p)))


@needs_avmnist
def test_avmnist_pipeline_failure_resume_blessing_caching_and_gated_push(tmp_path):
    root = str(tmp_path / "root")
    good = configs.tiny(root, tasks=["avmnist"])
    broken = replace(good, tasks=[replace(good.tasks[0], preset="no-such-preset")])

    # 1. The Trainer fails: the run stops there, and the store says so.
    with pytest.raises(Exception, match="no-such-preset"):
        run(broken, "tiny")
    (first,) = executions_by_run(good.metadata_path)
    assert first["Trainer.avmnist"] == FAILED
    assert first["ExampleGen.avmnist"] == first["StatisticsGen.avmnist"] == first["CurateSchema.avmnist"] == COMPLETE
    assert "MissingModalityEvaluator.avmnist" not in first and "Pusher.avmnist" not in first
    assert _versions(good, "avmnist") == []

    # 2. Fixed: what ran before comes from the cache, the rest runs, the model is blessed and pushed.
    result = run(good, "tiny")
    second = executions_by_run(good.metadata_path)[-1]
    assert second["ExampleGen.avmnist"] == second["SchemaGen.avmnist"] == CACHED
    for node in ("Trainer", "MissingModalityEvaluator", "Pusher"):
        assert second[f"{node}.avmnist"] == COMPLETE
    examples = _latest(root, "ExampleGen.avmnist", "examples")
    assert sorted(os.listdir(examples)) == ["Split-test", "Split-train", "manifest.json"]
    assert glob.glob(os.path.join(examples, "Split-train", "*.gz"))
    anomalies = _latest(root, "ExampleValidator.avmnist", "anomalies")
    from tensorflow_metadata.proto.v0 import anomalies_pb2
    for path in glob.glob(os.path.join(anomalies, "*", "SchemaDiff.pb")):
        parsed = anomalies_pb2.Anomalies()
        parsed.ParseFromString(open(path, "rb").read())
        assert not parsed.anomaly_info, f"{path}: {dict(parsed.anomaly_info)}"
    model = _latest(root, "Trainer.avmnist", "model")
    assert os.path.exists(os.path.join(model, "Format-Serving", "saved_model.pb"))
    assert os.path.exists(os.path.join(model, "Format-Shaspec", "model.weights.h5"))
    manifest = json.load(open(os.path.join(model, "Format-Serving", "assets.extra", "shaspec_export.json")))
    assert manifest["version"] is None and manifest["task"] == "classification"
    report = result["tasks"]["avmnist"]["report"]
    metrics = json.load(open(os.path.join(report, "candidate", "metrics.json")))
    assert set(metrics) == {"image", "audio", "image+audio", "mean"}
    assert os.path.getsize(os.path.join(report, "candidate", "heatmap.png")) > 1000
    verdict = json.load(open(os.path.join(report, "verdict.json")))
    assert verdict["blessed"] is True and verdict["reasons"] == []
    versions = _versions(good, "avmnist")
    assert len(versions) == 1 and os.path.exists(os.path.join(versions[0], "saved_model.pb"))
    assert result["tasks"]["avmnist"]["pushed"] == versions[0]

    # 3. Unchanged inputs: data and model come from the cache, and the same model is not pushed twice.
    run(good, "tiny")
    third = executions_by_run(good.metadata_path)[-1]
    assert third["ExampleGen.avmnist"] == third["Trainer.avmnist"] == third["StatisticsGen.avmnist"] == CACHED
    assert _versions(good, "avmnist") == versions

    # 4. A threshold the model cannot meet: not blessed, nothing pushed.
    strict = replace(good, tasks=[replace(good.tasks[0], min_mean=1.01)])
    result = run(strict, "tiny")
    verdict = json.load(open(os.path.join(result["tasks"]["avmnist"]["report"], "verdict.json")))
    assert verdict["blessed"] is False and "min_mean" in verdict["reasons"][0]
    blessing = _latest(root, "MissingModalityEvaluator.avmnist", "blessing")
    assert os.listdir(blessing) == ["NOT_BLESSED"]
    assert _versions(good, "avmnist") == versions


def test_brats_pipeline_on_phantoms_evaluates_every_subset_and_pushes(tmp_path):
    config = configs.tiny(str(tmp_path / "root"), tasks=["brats"])
    result = run(config, "tiny")
    report = result["tasks"]["brats"]["report"]
    metrics = json.load(open(os.path.join(report, "candidate", "metrics.json")))
    assert len(metrics) == 16 and "flair+t1ce" in metrics and "mean" in metrics
    assert 0.0 <= metrics["mean"]["WT"]["dice"] <= 1.0
    for name in ("metrics.csv", "metrics.md", "heatmap.png"):
        assert os.path.exists(os.path.join(report, "candidate", name))
    manifest = json.load(open(os.path.join(_latest(config.root, "ExampleGen.brats", "examples"), "manifest.json")))
    assert manifest["written"] == configs.PHANTOM_CASES["tiny"] and manifest["rejected"] == []
    versions = _versions(config, "brats")
    assert len(versions) == 1 and result["tasks"]["brats"]["pushed"] == versions[0]
    loaded = tf.saved_model.load(versions[0])
    assert {"serving_default", "segment_volume"} <= set(loaded.signatures)


def _stats(tmp_path, examples, task):
    import tensorflow_data_validation as tfdv

    path = str(tmp_path / f"{len(examples)}-{task}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    return tfdv.generate_statistics_from_tfrecord(
        path, stats_options=tfdv.StatsOptions(feature_allowlist=stats_features(task)))


def test_curated_schema_flags_an_all_absent_case_and_a_stray_label(tmp_path):
    import tensorflow_data_validation as tfdv

    from shaspec_tf.data.schema import BratsRecord, brats_example

    def record(case_id, mask):
        image = np.ones((4, 4, 4, 4), np.float32) * np.asarray(mask, np.float32)
        label = np.zeros((4, 4, 4), np.uint8)
        label[1, 1, 1], label[2, 2, 2] = 2, 4
        return brats_example(BratsRecord(case_id, image, np.asarray(mask), label))

    good = [record("a", (1, 1, 1, 1)), record("b", (0, 1, 0, 1))]
    schema = curate_schema(tfdv.infer_schema(_stats(tmp_path, good, "brats")), "brats")
    assert not tfdv.validate_statistics(_stats(tmp_path, good + [record("c", (1, 0, 0, 0))], "brats"),
                                        schema).anomaly_info

    bad = record("d", (1, 0, 0, 0))
    f = bad.features.feature
    del f["present_modalities"].bytes_list.value[:]           # what an all-absent case looks like
    f["modality_mask"].int64_list.value[:] = [0, 0, 0, 0]
    stray = record("e", (1, 1, 1, 1))
    stray.features.feature["label_values"].bytes_list.value.append(b"3")   # BraTS 2023's ET label
    anomalies = tfdv.validate_statistics(_stats(tmp_path, good + [bad, stray], "brats"), schema).anomaly_info
    assert "present_modalities" in anomalies and "label_values" in anomalies
    assert "3" in anomalies["label_values"].description


def _results(scores, task="classification"):
    return {"task": task, "subsets": list(scores), "columns": ["accuracy"],
            "summary": {k: {"accuracy": v} for k, v in scores.items()}}


def test_blessing_needs_the_thresholds_and_no_regression_against_the_blessed_model():
    candidate = summarise(_results({"image": 0.9, "audio": 0.6, "image+audio": 0.95}))
    assert candidate["worst_subset"] == "audio" and abs(candidate["mean"] - 2.45 / 3) < 1e-9
    assert judge(candidate, None, 0.8, 0.5, 0.0) == (True, [])
    blessed, reasons = judge(candidate, None, 0.9, 0.7, 0.0)
    assert not blessed and len(reasons) == 2 and "worst subset audio" in reasons[1]
    previous = summarise(_results({"image": 0.9, "audio": 0.7, "image+audio": 0.95}))
    assert judge(candidate, previous, 0.0, 0.0, 0.2)[0]           # within the allowed regression
    blessed, reasons = judge(candidate, previous, 0.0, 0.0, 0.05)
    assert not blessed and "worst" in reasons[0]
    seg = {"task": "segmentation", "subsets": ["t1"], "columns": ["ET", "WT", "TC"],
           "summary": {"t1": {"ET": {"dice": 0.3}, "WT": {"dice": 0.6}, "TC": {"dice": 0.9}}}}
    assert abs(summarise(seg)["mean"] - 0.6) < 1e-9


def test_pushed_version_is_found_by_the_savedmodel_fingerprint(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "fingerprint.pb").write_bytes(b"abc")
    base = tmp_path / "serving"
    assert pushed_version_of(str(model), str(base)) is None
    (base / "17").mkdir(parents=True)
    (base / "17" / "fingerprint.pb").write_bytes(b"other")
    assert pushed_version_of(str(model), str(base)) is None
    (base / "23").mkdir()
    (base / "23" / "fingerprint.pb").write_bytes(b"abc")
    assert pushed_version_of(str(model), str(base)) == "23"


@pytest.mark.parametrize("vertex_training", [False, True])
def test_kubeflow_v2_spec_lists_every_component_with_its_parameters(tmp_path, vertex_training):
    from pipeline.kubeflow_v2_runner import compile_pipeline

    # Inputs on this disk (the fingerprint of an example gen's input is taken while the pipeline is built); the
    # cloud config refuses a local input, so it is set after: what is checked here is the spec's shape.
    config = configs.cloud("gs://bucket/shaspec", "gcr.io/p/shaspec:1",
                           {"brats": "gs://bucket/brats", "avmnist": "gs://bucket/avmnist"}, project="proj",
                           region="europe-west4", accelerator="NVIDIA_L4", accelerator_count=2,
                           machine_type="g2-standard-24", strategy="mirrored", vertex_training=vertex_training,
                           dataflow=True)
    for t in config.tasks:
        t.input_dir = str(tmp_path / t.task)
    written = compile_pipeline(config, str(tmp_path / "spec.json"))
    assert written == str(tmp_path / "spec.json")
    spec = json.load(open(written))["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    for task in ("brats", "avmnist"):
        for node in ("ExampleGen", "StatisticsGen", "SchemaGen", "CurateSchema", "ExampleValidator", "Trainer",
                     "MissingModalityEvaluator", "Pusher"):
            assert f"{node}.{task}" in tasks
        assert any(name.startswith(f"LatestBlessedModelResolver.{task}") for name in tasks)
    executors = spec["deploymentSpec"]["executors"]
    container = executors["Trainer.brats_executor"]["container"]
    assert "--runner=DataflowRunner" in container["args"] and "--project=proj" in container["args"]
    params = json.dumps(spec["components"]["Trainer.brats"]["inputDefinitions"]["parameters"])
    assert "custom_config" in params
    values = json.dumps(tasks["Trainer.brats"])
    assert '\\"strategy\\": \\"mirrored\\"' in values and '\\"preset\\": \\"paper\\"' in values
    evaluator = json.dumps(tasks["MissingModalityEvaluator.brats"])
    assert "min_worst" in evaluator and "0.2" in evaluator
    if vertex_training:
        assert "g2-standard-24" in values and "NVIDIA_L4" in values
    else:
        assert container["resources"]["accelerator"] == {"count": "2", "type": "NVIDIA_L4"}
    assert spec["pipelineInfo"]["name"] == "shaspec"


def test_tfx_cli_registers_the_local_pipeline(tmp_path):
    """``tfx pipeline create --engine local`` runs the DSL file with LocalDagRunner.run patched: it must register
    exactly one pipeline without running it."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LOCAL_HOME=str(tmp_path / "home"), SHASPEC_PIPELINE_SIZE="tiny",
               SHASPEC_PIPELINE_ROOT=str(tmp_path / "root"), SHASPEC_PIPELINE_TASKS="brats")
    tfx_cli = os.path.join(os.path.dirname(sys.executable), "tfx")
    done = subprocess.run([tfx_cli, "pipeline", "create", "--engine", "local", "--pipeline_path",
                           os.path.join(repo, "pipeline", "local_runner.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Pipeline "shaspec-tiny" created successfully' in done.stdout
    args = json.load(open(tmp_path / "home" / "shaspec-tiny" / "pipeline_args.json"))
    assert args["pipeline_name"] == "shaspec-tiny" and args["pipeline_root"] == str(tmp_path / "root")
    assert not os.path.exists(tmp_path / "root" / "data")         # registering generates and runs nothing
