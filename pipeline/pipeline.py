"""``create_pipeline(config)``: the shaspec-tf TFX pipeline, one branch per task.

Per task (ids end in ``.brats`` / ``.avmnist``)::

    ExampleGen -> StatisticsGen -> SchemaGen -> CurateSchema -> ExampleValidator
        |                                             |
        +----------------> Trainer <------------------+        LatestBlessedModelResolver
                              |                                        |
                              +------> MissingModalityEvaluator <-----+
                                              |
                                            Pusher  (only a blessed model is pushed: SERVING/<model_name>/<version>)

The runners (``local_runner.py``, ``kubeflow_v2_runner.py``) only choose the orchestrator.
"""
from __future__ import annotations

from typing import Dict, List

from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components.evaluator import MissingModalityEvaluator, VertexEvaluatorExecutor
from components.example_gens import AvMnistExampleGen, BratsExampleGen, fingerprint
from components.pusher import Pusher
from components.schema_curation import CurateSchema
from pipeline.configs import PipelineConfig, TaskConfig
from shaspec_tf.tasks import get_task

RUN_FN = "components.trainer_module.run_fn"


def _stats_options(task: str):
    import tensorflow_data_validation as tfdv

    return tfdv.StatsOptions(feature_allowlist=list(get_task(task).stats_features))


# The TFX example gen of each task: the pipeline (the app) knows its components; the library's tasks do not.
EXAMPLE_GENS = {"brats": BratsExampleGen, "avmnist": AvMnistExampleGen}


def _example_gen(t: TaskConfig):
    """The task's example gen on ``t.input_dir``, with the branch's ``example_gen`` parameters."""
    name = get_task(t.task).name
    if name not in EXAMPLE_GENS:
        raise ValueError(f"task {name!r} has no example gen in pipeline.pipeline.EXAMPLE_GENS")
    return EXAMPLE_GENS[name](input_dir=t.input_dir, input_fingerprint=fingerprint([t.input_dir]), **dict(t.example_gen))


def trainer_id(task: str) -> str:
    return f"Trainer.{task}"


def step_environments(config: PipelineConfig) -> Dict[str, dict]:
    """``{task id: {variable: value}}``: what the pipeline steps' containers must start with in the cloud
    (``pipeline/kubeflow_v2_runner.py`` writes it into each step's ``container.env`` of the compiled spec; TFX 1.16's
    step builder has no setting for it). The Trainer's ``KERAS_BACKEND`` when it trains under JAX as a pipeline step;
    as a Vertex AI custom job it goes to the job's ``container_spec.env`` instead (:func:`_trainer`), the step only
    submitting that job."""
    env = config.trainer_environment()
    if not env or config.vertex_training:
        return {}
    return {trainer_id(t.task): dict(env) for t in config.tasks}


def _trainer(t: TaskConfig, config: PipelineConfig, cloud: bool, **inputs):
    """The Trainer: in-process locally; in the cloud on the configured GPU, either as a pipeline step with a resource
    spec (Kubeflow / Vertex AI Pipelines) or as a Vertex AI custom training job (``config.vertex_training``). A
    configured ``trainer_backend`` reaches ``run_fn`` (``keras_backend``), which refuses to train under another."""
    custom_config = t.train_custom_config()
    if config.trainer_backend:
        custom_config["keras_backend"] = config.trainer_backend
    if cloud and config.vertex_training:
        vertex = tfx.extensions.google_cloud_ai_platform
        container = {"image_uri": config.image}
        if config.trainer_environment():   # Vertex AI's CustomJob ContainerSpec.env; TFX keeps it (sets command)
            container["env"] = [{"name": k, "value": v} for k, v in config.trainer_environment().items()]
        custom_config.update({
            vertex.ENABLE_VERTEX_KEY: True,
            vertex.VERTEX_REGION_KEY: config.gcp_region,
            vertex.TRAINING_ARGS_KEY: {
                "project": config.gcp_project,
                "worker_pool_specs": [{
                    "machine_spec": {"machine_type": config.trainer_machine_type,
                                     "accelerator_type": config.trainer_accelerator_type,
                                     "accelerator_count": config.trainer_accelerator_count},
                    "replica_count": 1,
                    "container_spec": container,
                }],
            },
        })
        return vertex.Trainer(run_fn=RUN_FN, custom_config=custom_config, **inputs)
    trainer = tfx.components.Trainer(run_fn=RUN_FN, custom_config=custom_config, **inputs)
    if cloud:
        from kfp.pipeline_spec import pipeline_spec_pb2 as pipeline_pb2

        spec = pipeline_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec(
            cpu_limit=config.trainer_cpu, memory_limit=config.trainer_memory_gb)
        if config.trainer_accelerator_count:
            spec.accelerator.type = config.trainer_accelerator_type
            spec.accelerator.count = config.trainer_accelerator_count
        trainer = trainer.with_platform_config(spec)
    return trainer


def task_components(t: TaskConfig, config: PipelineConfig, cloud: bool = False) -> List:
    """The components of one task's branch, in order (``cloud``: the Trainer gets the configured GPU)."""
    suffix = t.task
    evaluation = t.evaluator_options()
    example_gen = _example_gen(t).with_id(f"ExampleGen.{suffix}")
    statistics = tfx.components.StatisticsGen(
        examples=example_gen.outputs["examples"], stats_options=_stats_options(t.task)).with_id(
        f"StatisticsGen.{suffix}")
    inferred = tfx.components.SchemaGen(statistics=statistics.outputs["statistics"]).with_id(f"SchemaGen.{suffix}")
    schema = CurateSchema(schema=inferred.outputs["schema"], task=t.task).with_id(f"CurateSchema.{suffix}")
    validator = tfx.components.ExampleValidator(
        statistics=statistics.outputs["statistics"], schema=schema.outputs["curated"]).with_id(
        f"ExampleValidator.{suffix}")
    trainer = _trainer(t, config, cloud, examples=example_gen.outputs["examples"], schema=schema.outputs["curated"],
                       train_args=tfx.proto.TrainArgs(splits=[get_task(t.task).train_split], num_steps=t.steps or 0),
                       eval_args=tfx.proto.EvalArgs(splits=[evaluation["split"]], num_steps=0)
                       ).with_id(trainer_id(suffix))
    resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model, producer_component_id=trainer.id,
                              output_key="model"),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing,
                                       producer_component_id=f"MissingModalityEvaluator.{suffix}",
                                       output_key="blessing")).with_id(f"LatestBlessedModelResolver.{suffix}")
    evaluator = MissingModalityEvaluator(
        examples=example_gen.outputs["examples"], model=trainer.outputs["model"],
        baseline_model=resolver.outputs["model"], **evaluation).with_id(f"MissingModalityEvaluator.{suffix}")
    if cloud:  # Vertex names models by resource: see VertexEvaluatorExecutor (a Beam executor, as TFX's Evaluator)
        evaluator.executor_spec = executor_spec.BeamExecutorSpec(VertexEvaluatorExecutor)
    pusher = Pusher(
        model=trainer.outputs["model"], model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(filesystem=tfx.proto.PushDestination.Filesystem(
            base_directory=f"{config.serving_dir}/{t.model_name}"))).with_id(f"Pusher.{suffix}")
    return [example_gen, statistics, inferred, schema, validator, trainer, resolver, evaluator, pusher]


def create_pipeline(config: PipelineConfig, metadata_connection_config=None, cloud: bool = False
                    ) -> tfx.dsl.Pipeline:
    """The pipeline for ``config``: one branch per task. Locally: SQLite metadata at ``config.metadata_path`` unless
    a ``metadata_connection_config`` is given. ``cloud=True`` (Kubeflow / Vertex AI): the orchestrator's metadata,
    and the Trainer on the configured accelerator."""
    components = []
    for t in config.tasks:
        components += task_components(t, config, cloud)
    if metadata_connection_config is None and not cloud:
        metadata_connection_config = tfx.orchestration.metadata.sqlite_metadata_connection_config(
            config.metadata_path)
    return tfx.dsl.Pipeline(
        pipeline_name=config.name, pipeline_root=config.root, components=components,
        enable_cache=config.enable_cache, metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=list(config.beam_pipeline_args))
