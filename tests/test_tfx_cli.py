"""TFX's own command line on pipeline/kubeflow_v2_runner.py, as on TFX's templates: ``tfx pipeline compile`` and
``tfx pipeline create`` with ``--engine vertex``, the runner's settings given by environment variables alone (the
CLI runs the file with no arguments). The inputs sit on the Cloud Storage emulator, because building the pipeline
reads them (the example gens' input fingerprint). Also the runner's flags over its variables, and its one-line
errors. ``--build_image`` (Docker) is not exercised here."""
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("tfx")

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "pipeline", "kubeflow_v2_runner.py")
BIN = os.path.dirname(sys.executable)
IMAGE = "europe-west4-docker.pkg.dev/proj/repo/shaspec-tf:test"
COMPONENTS = ("ExampleGen", "StatisticsGen", "SchemaGen", "CurateSchema", "ExampleValidator", "Trainer",
              "MissingModalityEvaluator", "Pusher")


def _upload(gcs, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{gcs.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="module")
def cloud_env(gcs):
    """Only environment variables: the runner's settings, the emulator's, and PATH holding this venv's ``pip``
    (TFX's ``--engine vertex`` looks for the ``kfp`` distribution in ``pip freeze``)."""
    bucket = gcs.create_bucket("tfx-cli")
    _upload(gcs, "tfx-cli", "brats/BraTS2021_00000/BraTS2021_00000_t1.nii.gz", b"not read at compile time")
    _upload(gcs, "tfx-cli", "avmnist/mnist8k.npz", b"neither")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SHASPEC_")}
    env.update(gcs.env(), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONWARNINGS="ignore",
               SHASPEC_PIPELINE_ROOT=f"{bucket}/root", SHASPEC_IMAGE=IMAGE,
               SHASPEC_BRATS_INPUT=f"{bucket}/brats", SHASPEC_AVMNIST_INPUT=f"{bucket}/avmnist",
               SHASPEC_ACCELERATOR="NVIDIA_L4", SHASPEC_ACCELERATOR_COUNT="2")
    return env


def _tfx(env, cwd, *args):
    done = subprocess.run([os.path.join(BIN, "tfx"), "pipeline", *args, "--engine", "vertex", "--pipeline_path",
                           RUNNER], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return done


def _check_spec(path, env):
    document = json.load(open(path))
    spec = document["pipelineSpec"]
    assert document["runtimeConfig"]["gcsOutputDirectory"] == env["SHASPEC_PIPELINE_ROOT"]
    assert spec["pipelineInfo"]["name"] == "shaspec"
    tasks = spec["root"]["dag"]["tasks"]
    for task in ("brats", "avmnist"):
        for component in COMPONENTS:
            assert f"{component}.{task}" in tasks, (component, task, sorted(tasks))
        given = tasks[f"ExampleGen.{task}"]["inputs"]["parameters"]["input_dir"]["runtimeValue"]["constantValue"]
        assert given == {"stringValue": env[f"SHASPEC_{task.upper()}_INPUT"]}
    containers = [e["container"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e]
    assert len(containers) == 2 * len(COMPONENTS) and {c["image"] for c in containers} == {IMAGE}
    assert {tuple(c["command"]) for c in containers} == {
        ("python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor")}
    trainer = spec["deploymentSpec"]["executors"]["Trainer.brats_executor"]["container"]
    assert trainer["resources"]["accelerator"] == {"count": "2", "type": "NVIDIA_L4"}
    # Trainer run_fn and executors are named by module path: what the image must make importable
    assert "components.trainer_module.run_fn" in json.dumps(tasks["Trainer.brats"])


def test_tfx_pipeline_compile_vertex_from_the_environment_alone(cloud_env, tmp_path):
    done = _tfx(cloud_env, tmp_path, "compile")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Pipeline shaspec compiled successfully." in done.stdout
    written = tmp_path / "shaspec_pipeline.json"
    assert f"pipeline spec: {written}" in done.stdout
    _check_spec(written, cloud_env)


def test_tfx_pipeline_create_vertex_registers_the_spec(cloud_env, tmp_path):
    env = dict(cloud_env, VERTEX_HOME=str(tmp_path / "home"))
    done = _tfx(env, tmp_path, "create")
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Pipeline "shaspec" created successfully.' in done.stdout
    registered = tmp_path / "home" / "shaspec" / "pipeline.json"
    assert f"pipeline spec: {registered}" in done.stdout
    assert not (tmp_path / "shaspec_pipeline.json").exists()    # create writes only its own copy
    _check_spec(registered, env)


def test_flags_override_the_environment_and_bad_settings_fail_in_one_line(tmp_path):
    from pipeline.kubeflow_v2_runner import parse_config

    environ = {"SHASPEC_PIPELINE_ROOT": "gs://b/root", "SHASPEC_IMAGE": "img:env", "SHASPEC_BRATS_INPUT": "gs://b/x",
               "SHASPEC_PIPELINE_TASKS": "brats", "SHASPEC_STRATEGY": "default", "SHASPEC_ACCELERATOR_COUNT": "0",
               "GOOGLE_CLOUD_PROJECT": "p", "SHASPEC_DATAFLOW": "1"}
    config, args = parse_config([], environ)
    assert (config.image, config.root, [t.task for t in config.tasks]) == ("img:env", "gs://b/root", ["brats"])
    assert config.trainer_accelerator_count == 0 and config.tasks[0].strategy == "default"
    assert "--runner=DataflowRunner" in config.beam_pipeline_args and "--project=p" in config.beam_pipeline_args
    assert config.tasks[0].preset == "paper" and args.out == "shaspec_pipeline.json"   # configs.CLOUD's size
    config, args = parse_config(["--image", "img:flag", "--no-dataflow", "--accelerator-count", "1", "--tasks",
                                 "brats,avmnist", "--avmnist-input", "gs://b/av"], environ)
    assert config.image == "img:flag" and config.trainer_accelerator_count == 1
    assert "--runner=DirectRunner" in config.beam_pipeline_args
    assert [(t.task, t.input_dir) for t in config.tasks] == [("brats", "gs://b/x"), ("avmnist", "gs://b/av")]

    for bad, message in [
        ({"SHASPEC_PIPELINE_ROOT": ""}, "no pipeline root: set SHASPEC_PIPELINE_ROOT or --root"),
        ({"SHASPEC_PIPELINE_ROOT": str(tmp_path)}, "the pipeline root must be a URI"),
        ({"SHASPEC_BRATS_INPUT": ""}, "no input for the brats branch: set SHASPEC_BRATS_INPUT or --brats-input"),
        ({"SHASPEC_ACCELERATOR_COUNT": "two"}, "SHASPEC_ACCELERATOR_COUNT must be an integer, got 'two'"),
        ({"SHASPEC_DATAFLOW": "maybe"}, "SHASPEC_DATAFLOW must be 1 or 0"),
        ({"GOOGLE_CLOUD_PROJECT": ""}, "Dataflow and Vertex AI training need the Google Cloud project"),
        ({"SHASPEC_PIPELINE_TASKS": "brats,mnist"}, "unknown or no tasks 'brats,mnist'"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_config([], {**environ, **bad})
        text = str(exit_info.value.code)
        assert text.startswith("kubeflow_v2_runner.py: error: ") and message in text and "\n" not in text, text
