"""The Kubeflow V2 / Vertex AI spec (``pipeline/kubeflow_v2_runner.py``) is runnable: the tiny AV-MNIST branch, task by
task, through TFX's container entrypoint with the executor inputs Vertex would build (``tests/vertex_sim.py``), first
with a local pipeline root, then with the pipeline root and the inputs on the Cloud Storage emulator."""
import json
import os

import pytest
from conftest import run_with_gcs
from vertex_sim import VertexSimulator

pytest.importorskip("tfx")

from pipeline import configs  # noqa: E402
from pipeline.kubeflow_v2_runner import compile_pipeline  # noqa: E402

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow, pytest.mark.slow]

TESTS = os.path.dirname(os.path.abspath(__file__))
TO_PUSHER = ["ExampleGen", "StatisticsGen", "SchemaGen", "CurateSchema", "Trainer", "MissingModalityEvaluator",
             "Pusher"]


def _check(outputs: dict, serving: str, containers=TO_PUSHER) -> dict:
    """What every run must show, whatever the root: the container tasks ran in this order (the resolvers before the
    evaluator), each output artifact has its metadata from the container's executor_output.json, the model was
    blessed and pushed under ``serving``."""
    ran = list(outputs)
    assert [name.split(".")[0] for name in ran if not name.startswith("Latest")] == list(containers)
    resolvers = [name for name in ran if name.startswith("LatestBlessedModelResolver.avmnist")]
    assert len(resolvers) == 2 and max(map(ran.index, resolvers)) < ran.index("MissingModalityEvaluator.avmnist")
    (examples,) = outputs["ExampleGen.avmnist"]["examples"]
    assert json.loads(examples["metadata"]["split_names"]) == ["train", "test"]
    assert examples["metadata"]["payload_format"] == "FORMAT_TF_EXAMPLE"
    assert examples["metadata"]["samples"] == 70                # 10 digits x (5 train + 2 test) recordings of theo
    # first run: no blessed model yet, so both resolvers hand the evaluator nothing
    assert all(not listed for name in ran if name.startswith("Latest") for listed in outputs[name].values())
    (blessing,) = outputs["MissingModalityEvaluator.avmnist"]["blessing"]
    assert blessing["metadata"]["blessed"] == 1.0                 # the tiny branch's thresholds are 0
    assert blessing["metadata"]["current_model"] == outputs["Trainer.avmnist"]["model"][0]["uri"]
    (pushed,) = outputs["Pusher.avmnist"]["pushed_model"]
    assert pushed["metadata"]["pushed"] == 1.0
    destination = pushed["metadata"]["pushed_destination"]
    assert destination.startswith(f"{serving}/shaspec-avmnist/") and destination.rsplit("/", 1)[1].isdigit()
    return pushed


def test_the_vertex_spec_runs_through_the_container_entrypoint_locally(tmp_path):
    """The whole tiny AV-MNIST branch (the validator too), compiled with a local pipeline root and the JAX Trainer
    (``trainer_backend="jax"``; the bucket test below keeps TensorFlow's): the Trainer's container starts with its
    spec's ``KERAS_BACKEND=jax``, trains under JAX and exports the SavedModel that the TensorFlow steps after it
    evaluate, bless, push and load. The same Trainer container without that env stops with run_fn's one-line
    error instead of training under another backend."""
    import tensorflow as tf

    from vertex_sim import TaskFailed

    root = str(tmp_path / "root")
    config = configs.tiny(root, tasks=["avmnist"])
    config.trainer_backend = "jax"
    spec = compile_pipeline(config, str(tmp_path / "spec.json"))
    sim = VertexSimulator(spec, workdir=str(tmp_path / "work"), env={"KERAS_BACKEND": "tensorflow"})
    assert sim.root == root                                       # the spec's runtimeConfig.gcsOutputDirectory
    outputs = sim.run(sim.branch("avmnist"))
    (anomalies,) = outputs["ExampleValidator.avmnist"]["anomalies"]
    assert json.loads(anomalies["metadata"]["split_names"]) == ["train", "test"]

    (model,) = outputs["Trainer.avmnist"]["model"]
    assert model["uri"].startswith(f"{root}/123456789/shaspec-")   # ROOT/PROJECT/JOB/TASK_ID/model, as Vertex
    assert os.path.exists(os.path.join(model["uri"], "Format-Serving", "saved_model.pb"))
    assert os.path.exists(os.path.join(model["uri"], "Format-Shaspec", "model.weights.h5"))
    (evaluation,) = outputs["MissingModalityEvaluator.avmnist"]["evaluation"]
    verdict = json.load(open(os.path.join(evaluation["uri"], "verdict.json")))
    assert verdict["blessed"] is True and "baseline" not in verdict
    assert set(json.load(open(os.path.join(evaluation["uri"], "candidate", "metrics.json")))) == {
        "image", "audio", "image+audio", "mean"}
    pushed = _check(outputs, f"{root}/serving", TO_PUSHER[:4] + ["ExampleValidator"] + TO_PUSHER[4:])
    loaded = tf.saved_model.load(pushed["metadata"]["pushed_destination"])
    assert "serving_default" in loaded.signatures
    # It trained under JAX: run_fn got keras_backend "jax" (custom_config) and refuses any other backend, as the
    # same container without the spec's env shows.
    task = sim.tasks["Trainer.avmnist"]
    component = sim.spec["components"][task["componentRef"]["name"]]
    container = dict(sim.spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"])
    assert container.pop("env") == [{"name": "KERAS_BACKEND", "value": "jax"}]
    with pytest.raises(TaskFailed) as failed:
        sim._run_container("Trainer.avmnist-without-env", "no-env", task, component, container,
                           sim._input_artifacts(task, outputs))
    assert "the pipeline trains under Keras backend 'jax' but this Trainer runs 'tensorflow'" in str(failed.value)


def test_the_vertex_spec_runs_on_a_bucket_and_pushes_the_model_there(gcs, tmp_path):
    """The spec as ``kubeflow_v2_runner.py`` makes it (``configs.cloud``, the tiny AV-MNIST settings), everything on
    the bucket: the inputs, the pipeline root, the artifacts, the pushed SavedModel."""
    bucket = gcs.create_bucket("vertex-entrypoint")
    data = configs.avmnist_data_dir()
    wavs = [f"{d}_theo_{i}.wav" for d in range(10) for i in (5, 6, 15, 16, 17, 18, 19)]
    # the tiny branch's settings over the cloud size (which sets epochs and the thresholds)
    tiny = {**configs.TINY["avmnist"], "epochs": None, "min_mean": 0.0, "min_worst": 0.0}
    out = run_with_gcs(gcs, f"""
        import json, os, sys
        sys.path.insert(0, {TESTS!r})
        from shaspec_tf import fileio
        from pipeline import configs
        from pipeline.kubeflow_v2_runner import compile_pipeline
        from vertex_sim import VertexSimulator

        data, bucket = {data!r}, {bucket!r}
        fileio.copy(os.path.join(data, "mnist8k.npz"), bucket + "/avmnist/mnist8k.npz")
        for name in {wavs!r}:
            fileio.copy(os.path.join(data, "fsdd", "recordings", name), bucket + "/avmnist/fsdd/recordings/" + name)
        config = configs.cloud(bucket + "/shaspec", "gcr.io/p/shaspec-tf:test", {{"avmnist": bucket + "/avmnist"}},
                               accelerator_count=0, name="shaspec-tiny", task_overrides={{"avmnist": {tiny!r}}})
        spec = compile_pipeline(config, {str(tmp_path / "spec.json")!r})
        sim = VertexSimulator(spec, workdir={str(tmp_path / "work")!r})
        outputs = sim.run(["Pusher.avmnist"])        # the path to the Pusher (the validator runs in the local test)
        print(json.dumps({{"outputs": outputs, "root": sim.root, "timings": sim.timings}}))
    """, timeout=900)
    outputs = out["outputs"]
    assert out["root"] == f"{bucket}/shaspec"
    pushed = _check(outputs, f"{bucket}/shaspec/serving")
    for task in outputs:
        for listed in outputs[task].values():
            assert all(a["uri"].startswith(f"{bucket}/shaspec/123456789/shaspec-") for a in listed)
    model = outputs["Trainer.avmnist"]["model"][0]["uri"][len(bucket) + 1:]
    assert f"{model}/Format-Serving/saved_model.pb" in gcs.list_objects("vertex-entrypoint", model + "/")
    evaluation = _download(gcs, outputs["MissingModalityEvaluator.avmnist"]["evaluation"][0]["uri"], tmp_path / "ev")
    assert json.load(open(evaluation / "verdict.json"))["blessed"] is True
    # the pushed SavedModel, read back from the bucket over the emulator's JSON API, loads and serves
    saved = _download(gcs, pushed["metadata"]["pushed_destination"], tmp_path / "pushed")
    assert (saved / "saved_model.pb").exists() and list((saved / "variables").iterdir())
    import tensorflow as tf

    assert "serving_default" in tf.saved_model.load(str(saved)).signatures


def _download(gcs, uri: str, dest):
    """Every object under ``uri`` (gs://BUCKET/PREFIX) into ``dest``, through the emulator's JSON API."""
    import urllib.parse
    import urllib.request

    bucket, _, prefix = uri[len("gs://"):].partition("/")
    names = gcs.list_objects(bucket, prefix.rstrip("/") + "/")
    assert names, f"nothing under {uri}"
    for name in names:
        if name.endswith("/"):
            continue                                        # a folder placeholder (TensorFlow's makedirs)
        target = dest / name[len(prefix.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{gcs.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        target.write_bytes(urllib.request.urlopen(url, timeout=30).read())
    return dest
