"""The cloud Trainer's Keras backend (``--trainer-backend`` / ``SHASPEC_TRAINER_BACKEND``, ``configs.cloud``'s
``trainer_backend``). Keras fixes its backend at its first import, which TFX's container entrypoint does before
``run_fn``, so under ``jax`` the compiled spec must start the Trainer's container with ``KERAS_BACKEND=jax``: in the
step's ``container.env``, or, with ``--vertex-training``, in the custom job's ``container_spec.env``. The TensorFlow
default leaves the spec without any ``env``; a TensorFlow strategy under jax is refused when compiling; ``run_fn``
refuses to train under a backend the pipeline did not ask for. ``tests/test_vertex_entrypoint.py`` runs the compiled
JAX Trainer step through TFX's container entrypoint, with and without the environment the spec gives it."""
import json

import pytest

pytest.importorskip("tfx")

from pipeline import configs  # noqa: E402
from pipeline.kubeflow_v2_runner import compile_pipeline, parse_config, set_container_env  # noqa: E402

pytestmark = pytest.mark.tensorflow

IMAGE = "us-central1-docker.pkg.dev/proj/repo/shaspec-tf:jax"
ENVIRON = {"SHASPEC_PIPELINE_ROOT": "gs://b/root", "SHASPEC_IMAGE": IMAGE, "SHASPEC_BRATS_INPUT": "gs://b/brats",
           "SHASPEC_AVMNIST_INPUT": "gs://b/avmnist", "GOOGLE_CLOUD_PROJECT": "proj"}
JAX_ENV = [{"name": "KERAS_BACKEND", "value": "jax"}]


def _compile(tmp_path, argv, **environ):
    """The spec ``kubeflow_v2_runner.py argv`` writes with ``environ`` over :data:`ENVIRON`. The example gens'
    inputs are set to folders on this disk after the config is made (their fingerprint is read while compiling;
    the cloud config takes only URIs): what is checked is the Trainer's part of the spec."""
    config, _ = parse_config(argv, {**ENVIRON, **environ})
    for t in config.tasks:
        t.input_dir = str(tmp_path / t.task)
    written = compile_pipeline(config, str(tmp_path / "spec.json"))
    return config, json.load(open(written))["pipelineSpec"]


def _custom_config(spec, task):
    parameter = spec["root"]["dag"]["tasks"][f"Trainer.{task}"]["inputs"]["parameters"]["custom_config"]
    return json.loads(parameter["runtimeValue"]["constantValue"]["stringValue"])


def _env_by_executor(spec):
    return {label: e["container"]["env"] for label, e in spec["deploymentSpec"]["executors"].items()
            if "env" in e.get("container", {})}


def _one_line_exit(argv, **environ):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, {**ENVIRON, **environ})
    text = str(exit_info.value.code)
    assert text.startswith("kubeflow_v2_runner.py: error: ") and "\n" not in text, text
    return text


def test_the_default_tensorflow_trainer_leaves_the_spec_without_env(tmp_path):
    config, spec = _compile(tmp_path, [])
    assert config.trainer_backend == "tensorflow" and [t.strategy for t in config.tasks] == ["mirrored"] * 2
    assert _env_by_executor(spec) == {}
    assert spec["deploymentSpec"]["executors"]["Trainer.brats_executor"]["container"]["resources"]["accelerator"] == {
        "count": "1", "type": "NVIDIA_TESLA_T4"}
    for task in ("brats", "avmnist"):
        custom = _custom_config(spec, task)
        assert custom["keras_backend"] == "tensorflow" and custom["strategy"] == "mirrored"


def test_jax_starts_the_trainer_step_and_only_it_with_keras_backend_jax(tmp_path):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    config, spec = _compile(tmp_path, [], SHASPEC_TRAINER_BACKEND="jax")
    assert config.trainer_backend == "jax" and [t.strategy for t in config.tasks] == ["default"] * 2
    assert _env_by_executor(spec) == {"Trainer.brats_executor": JAX_ENV, "Trainer.avmnist_executor": JAX_ENV}
    # a valid PipelineContainerSpec (kfp's schema, what Vertex AI reads), beside the GPU the step asks for
    deployment = json_format.ParseDict(spec["deploymentSpec"], pipeline_spec_pb2.PipelineDeploymentConfig())
    container = deployment.executors["Trainer.brats_executor"].container
    assert [(e.name, e.value) for e in container.env] == [("KERAS_BACKEND", "jax")]
    assert (container.resources.accelerator.type, container.resources.accelerator.count) == ("NVIDIA_TESLA_T4", 1)
    assert container.image == IMAGE and "components.trainer_module.run_fn" in json.dumps(
        spec["root"]["dag"]["tasks"]["Trainer.brats"])
    for task in ("brats", "avmnist"):
        custom = _custom_config(spec, task)
        assert custom["keras_backend"] == "jax" and custom["strategy"] == "default"
    # the flag overrides the variable; an explicit default strategy and a CPU-only Trainer are fine under jax
    config, _ = parse_config(["--trainer-backend", "tensorflow"], {**ENVIRON, "SHASPEC_TRAINER_BACKEND": "jax"})
    assert config.trainer_backend == "tensorflow" and config.trainer_environment() == {}
    config, _ = parse_config(["--trainer-backend", "jax", "--strategy", "default", "--accelerator-count", "0"],
                             ENVIRON)
    assert config.trainer_environment() == {"KERAS_BACKEND": "jax"} and config.trainer_accelerator_count == 0


def test_jax_with_vertex_training_gives_the_custom_job_keras_backend_jax(tmp_path, monkeypatch):
    """The env rides in the custom job's worker pool spec, and TFX's own Vertex AI client (which replaces the
    container's command with its run_executor) hands it on to a valid ``CustomJob``."""
    from google.cloud import aiplatform_v1
    from tfx import v1 as tfx
    from tfx.extensions.google_cloud_ai_platform import runner, training_clients

    constants = tfx.extensions.google_cloud_ai_platform

    config, spec = _compile(tmp_path, ["--vertex-training", "--machine-type", "a2-highgpu-1g", "--accelerator",
                                       "NVIDIA_TESLA_A100"], SHASPEC_TRAINER_BACKEND="jax")
    assert config.vertex_training and _env_by_executor(spec) == {}   # the pipeline step only submits the job
    custom = _custom_config(spec, "brats")
    assert custom["keras_backend"] == "jax" and custom[constants.ENABLE_VERTEX_KEY] is True
    job_args = custom[constants.TRAINING_ARGS_KEY]
    (pool,) = job_args["worker_pool_specs"]
    assert pool["container_spec"] == {"image_uri": IMAGE, "env": JAX_ENV}
    assert pool["machine_spec"] == {"machine_type": "a2-highgpu-1g", "accelerator_type": "NVIDIA_TESLA_A100",
                                    "accelerator_count": 1} and pool["replica_count"] == 1

    class Offline(training_clients.VertexJobClient):
        def create_client(self):  # no credentials, no endpoint: nothing is sent
            self._client = None

    submitted = {}
    monkeypatch.setattr(training_clients, "get_job_client", lambda enable_vertex, region: Offline(region))
    monkeypatch.setattr(runner, "_launch_cloud_training", lambda **kwargs: submitted.update(kwargs))
    runner.start_cloud_training({}, {}, {"custom_config": json.dumps({"task": "brats"})},
                                "tfx.components.trainer.executor.GenericExecutor", job_args, None,
                                enable_vertex=True, vertex_region=custom[constants.VERTEX_REGION_KEY])
    assert submitted["project"] == "proj"
    job = aiplatform_v1.CustomJob(submitted["training_job"])      # the API's type: an unknown field would raise
    (container,) = [p.container_spec for p in job.job_spec.worker_pool_specs]
    assert [(e.name, e.value) for e in container.env] == [("KERAS_BACKEND", "jax")]
    assert container.image_uri == IMAGE and list(container.command[:3]) == ["python", "-m", "tfx.scripts.run_executor"]


def test_jax_refuses_tensorflow_strategies_and_idle_accelerators_when_compiling():
    for argv, environ, message in [
        ([], {"SHASPEC_STRATEGY": "mirrored"}, "the brats Trainer's strategy 'mirrored' is TensorFlow's"),
        (["--strategy", "multi_worker"], {}, "the brats Trainer's strategy 'multi_worker' is TensorFlow's"),
        (["--accelerator-count", "2"], {}, "the JAX Trainer trains on one accelerator and would leave 1 of 2 idle"),
    ]:
        assert message in _one_line_exit(argv, SHASPEC_TRAINER_BACKEND="jax", **environ)
    assert "unknown Trainer backend 'torch'" in _one_line_exit([], SHASPEC_TRAINER_BACKEND="torch")
    assert "invalid choice: 'torch'" in _one_line_exit(["--trainer-backend", "torch"])
    # the same rules in configs.cloud, for a branch's own strategy too
    with pytest.raises(ValueError, match="the avmnist Trainer's strategy 'mirrored' is TensorFlow's"):
        configs.cloud("gs://b/r", IMAGE, {"avmnist": "gs://b/a"}, trainer_backend="jax",
                      task_overrides={"avmnist": {"strategy": "mirrored"}})
    with pytest.raises(ValueError, match="unknown Trainer backend 'torch'"):
        configs.PipelineConfig(name="p", root="gs://b/r", tasks=[configs.TaskConfig("avmnist", "gs://b/a")],
                               trainer_backend="torch")
    # TensorFlow keeps its strategies, and its default
    config = configs.cloud("gs://b/r", IMAGE, {"avmnist": "gs://b/a"}, strategy="multi_worker", accelerator_count=4)
    assert config.trainer_backend == "tensorflow" and config.tasks[0].strategy == "multi_worker"
    assert configs.cloud("gs://b/r", IMAGE, {"avmnist": "gs://b/a"}, strategy=None).tasks[0].strategy == "mirrored"


def test_run_fn_refuses_to_train_under_a_backend_the_pipeline_did_not_ask_for():
    from components.trainer_module import training_options

    with pytest.raises(ValueError) as error:
        training_options({"task": "avmnist", "keras_backend": "jax"}, "tensorflow")
    text = str(error.value)
    assert "\n" not in text and text.startswith("the pipeline trains under Keras backend 'jax' but this Trainer "
                                                "runs 'tensorflow': KERAS_BACKEND=jax must be in the Trainer")
    assert "Dockerfile VARIANT=jax-gpu" in text
    with pytest.raises(ValueError, match="KERAS_BACKEND=tensorflow must be in the Trainer container's environment"):
        training_options({"keras_backend": "tensorflow"}, "jax")
    # the key is the pipeline's, not TrainConfig's: it is checked and dropped
    assert training_options({"task": "avmnist", "keras_backend": "jax"}, "jax") == {"task": "avmnist",
                                                                                    "jit_compile": True}
    assert training_options({"keras_backend": "tensorflow", "strategy": "mirrored"}, "tensorflow") == {
        "strategy": "mirrored"}
    assert training_options({"strategy": "mirrored"}, "tensorflow") == {"strategy": "mirrored"}   # local runs


def test_set_container_env_adds_to_a_task_and_names_a_missing_one():
    job = {"pipelineSpec": {"root": {"dag": {"tasks": {"T": {"componentRef": {"name": "c"}}}}},
                            "components": {"c": {"executorLabel": "c_executor"}},
                            "deploymentSpec": {"executors": {"c_executor": {"container": {
                                "image": "i", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}}}}}}
    set_container_env(job, {"T": {"B": "3", "KERAS_BACKEND": "jax"}})
    assert job["pipelineSpec"]["deploymentSpec"]["executors"]["c_executor"]["container"]["env"] == [
        {"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "KERAS_BACKEND", "value": "jax"}]
    with pytest.raises(ValueError, match="the compiled spec has no container task 'Trainer.x' to set KERAS_BACKEND"):
        set_container_env(job, {"Trainer.x": {"KERAS_BACKEND": "jax"}})
