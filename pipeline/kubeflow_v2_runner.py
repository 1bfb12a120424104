"""Compile the shaspec-tf pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines, as TFX's templates do.

The sizes of the branches are ``pipeline/configs.py``'s (``CLOUD``); where the data is, the image and the hardware
come from the environment (:data:`ENVIRONMENT`), and a flag overrides its variable. So the TFX command line, which
runs this file with no arguments, is driven by the environment alone::

    export SHASPEC_PIPELINE_ROOT=gs://BUCKET/shaspec SHASPEC_IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/shaspec-tf:TAG \\
        SHASPEC_BRATS_INPUT=gs://BUCKET/BraTS2021 SHASPEC_AVMNIST_INPUT=gs://BUCKET/avmnist
    tfx pipeline compile --engine vertex --pipeline_path pipeline/kubeflow_v2_runner.py   # -> shaspec_pipeline.json
    tfx pipeline create --engine vertex --pipeline_path pipeline/kubeflow_v2_runner.py    # -> $VERTEX_HOME/shaspec/
    tfx run create --engine vertex --pipeline_name shaspec --project PROJECT --region us-central1

or directly, with flags::

    python pipeline/kubeflow_v2_runner.py --root gs://BUCKET/shaspec --image IMAGE --brats-input gs://... \\
        --avmnist-input gs://... [--project PROJECT --region us-central1] [--accelerator NVIDIA_TESLA_T4 \\
        --accelerator-count 1 --machine-type n1-standard-8] [--strategy mirrored] [--trainer-backend jax] \\
        [--vertex-training] [--dataflow] [--tasks brats,avmnist] [--out shaspec_pipeline.json]

The spec (JSON) is what ``tfx run create --engine vertex``, the Vertex AI SDK (``aiplatform.PipelineJob(
template_path=...)``) or a Kubeflow Pipelines v2 cluster runs. The image must hold this repository installed with
the ``pipeline`` extra (``Dockerfile``). The Trainer runs on the configured accelerator with the ``tf.distribute``
strategy named; ``--vertex-training`` runs it as a Vertex AI custom job; ``--dataflow`` runs the Beam components
(example gens, statistics) on Dataflow.

``--trainer-backend jax`` trains under Keras' JAX backend (XLA) and still exports the TF Serving SavedModel (from a
TensorFlow child process). Keras fixes its backend when it is first imported, and TFX's container entrypoint imports
it (through TensorFlow) before the Trainer's ``run_fn`` runs, so ``KERAS_BACKEND=jax`` must be in the container's
environment from the start: the compiled spec gives it to the Trainer alone, in its step's ``container.env``
(kfp's ``PipelineContainerSpec.env``, which TFX 1.16 cannot set: it is added to the compiled JSON here) or, with
``--vertex-training``, in the custom job's ``worker_pool_specs[].container_spec.env``. Every other step keeps Keras'
default, TensorFlow. The image must hold jax (``docker build --build-arg VARIANT=jax-gpu``: TensorFlow on the CPU,
jax[cuda12] on the GPU; the two CUDA stacks cannot share one environment). Under jax the strategy defaults to
``default``; a TensorFlow strategy (``mirrored``, ``multi_worker``) or more than one accelerator is refused when
compiling. ``tensorflow`` stays the default: it is what the CPU and GPU images hold, and what the strategies need.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script or by the TFX CLI: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# flag destination -> (environment variable, help). Each task's input is SHASPEC_<TASK>_INPUT / --<task>-input.
ENVIRONMENT = {
    "root": ("SHASPEC_PIPELINE_ROOT", "pipeline root, a URI the containers reach (gs://BUCKET/shaspec); required"),
    "image": ("SHASPEC_IMAGE", "container image with shaspec-tf[pipeline] installed (Dockerfile); required"),
    "tasks": ("SHASPEC_PIPELINE_TASKS", "comma-separated task branches"),
    "name": ("SHASPEC_PIPELINE_NAME", "pipeline name"),
    "project": ("GOOGLE_CLOUD_PROJECT", "Google Cloud project (needed by --dataflow and --vertex-training)"),
    "region": ("GOOGLE_CLOUD_REGION", "Google Cloud region"),
    "machine_type": ("SHASPEC_MACHINE_TYPE", "the Trainer's machine type"),
    "accelerator": ("SHASPEC_ACCELERATOR", "the Trainer's accelerator type"),
    "accelerator_count": ("SHASPEC_ACCELERATOR_COUNT", "the Trainer's accelerator count; 0 for none"),
    "strategy": ("SHASPEC_STRATEGY", "the Trainer's tf.distribute strategy (default: mirrored under tensorflow, "
                 "default under jax, the only one it takes)"),
    "trainer_backend": ("SHASPEC_TRAINER_BACKEND", "the Keras backend the Trainer trains under (jax: the image of "
                        "the Dockerfile's VARIANT=jax-gpu, one accelerator)"),
    "vertex_training": ("SHASPEC_VERTEX_TRAINING", "run the Trainer as a Vertex AI custom job (variable: 1 or 0)"),
    "dataflow": ("SHASPEC_DATAFLOW", "run the Beam components on Dataflow (variable: 1 or 0)"),
    "out": ("SHASPEC_PIPELINE_SPEC", "where to write the spec (`tfx pipeline create` writes its own copy)"),
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def input_variable(task: str) -> str:
    return f"SHASPEC_{task.upper().replace('-', '_')}_INPUT"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, also under the TFX CLI (which re-raises a non-zero SystemExit)
        sys.exit(f"{self.prog}: error: {message}")


def _env_flag(variable: str, environ) -> bool:
    value = environ.get(variable, "").strip().lower()
    if value not in TRUE + FALSE:
        raise ValueError(f"{variable} must be 1 or 0 (true/false), got {environ[variable]!r}")
    return value in TRUE


def _env_int(variable: str, environ, default: int) -> int:
    value = environ.get(variable, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{variable} must be an integer, got {value!r}") from None


def build_parser(environ=None) -> argparse.ArgumentParser:
    """The flags, each defaulting to its environment variable (``environ``: ``os.environ``), else configs.py."""
    from pipeline.configs import CLOUD, CLOUD_DEFAULTS, STRATEGIES, TRAINER_BACKENDS

    env = os.environ if environ is None else environ
    parser = _Parser(prog="kubeflow_v2_runner.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(dest, default=None, **kwargs):
        variable, text = ENVIRONMENT[dest]
        shown = "" if default in (None, "") or "action" in kwargs else " (default: %(default)s)"
        parser.add_argument(f"--{dest.replace('_', '-')}", dest=dest, default=default,
                            help=f"{text} [${variable}]{shown}", **kwargs)

    add("root", env.get("SHASPEC_PIPELINE_ROOT"))
    add("image", env.get("SHASPEC_IMAGE"))
    for task in CLOUD:
        variable = input_variable(task)
        parser.add_argument(f"--{task}-input", dest=f"input_{task}", default=env.get(variable), metavar="URI",
                            help=f"the {task} branch's input folder, a URI (gs://...) [${variable}]")
    add("tasks", env.get("SHASPEC_PIPELINE_TASKS") or ",".join(CLOUD))
    add("name", env.get("SHASPEC_PIPELINE_NAME") or "shaspec")
    add("project", env.get("GOOGLE_CLOUD_PROJECT", ""))
    add("region", env.get("GOOGLE_CLOUD_REGION") or CLOUD_DEFAULTS["region"])
    add("machine_type", env.get("SHASPEC_MACHINE_TYPE") or CLOUD_DEFAULTS["machine_type"])
    add("accelerator", env.get("SHASPEC_ACCELERATOR") or CLOUD_DEFAULTS["accelerator"])
    try:
        count = _env_int("SHASPEC_ACCELERATOR_COUNT", env, CLOUD_DEFAULTS["accelerator_count"])
        vertex_training, dataflow = _env_flag("SHASPEC_VERTEX_TRAINING", env), _env_flag("SHASPEC_DATAFLOW", env)
    except ValueError as err:
        parser.error(str(err))
    add("accelerator_count", count, type=int)
    add("strategy", env.get("SHASPEC_STRATEGY") or None, choices=STRATEGIES)   # None: the backend's (configs.py)
    add("trainer_backend", env.get("SHASPEC_TRAINER_BACKEND") or CLOUD_DEFAULTS["trainer_backend"],
        choices=TRAINER_BACKENDS)
    add("vertex_training", vertex_training, action=argparse.BooleanOptionalAction)
    add("dataflow", dataflow, action=argparse.BooleanOptionalAction)
    add("out", env.get("SHASPEC_PIPELINE_SPEC") or "shaspec_pipeline.json")
    parser.add_argument("--verbose", action="store_true", default=False,
                        help="show TensorFlow's, absl's and Beam's logs [$SHASPEC_VERBOSE]")
    return parser


def config_from_args(args):
    """The ``PipelineConfig`` the parsed flags describe (``pipeline.configs.cloud``)."""
    from pipeline.configs import CLOUD, cloud

    if not args.root:
        raise ValueError("no pipeline root: set SHASPEC_PIPELINE_ROOT or --root (gs://BUCKET/shaspec)")
    if not args.image:
        raise ValueError("no container image: set SHASPEC_IMAGE or --image")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in CLOUD]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {args.tasks!r}: expected some of {', '.join(CLOUD)}")
    inputs = {}
    for task in tasks:
        inputs[task] = getattr(args, f"input_{task}")
        if not inputs[task]:
            raise ValueError(f"no input for the {task} branch: set {input_variable(task)} or --{task}-input "
                             f"(or leave {task} out of SHASPEC_PIPELINE_TASKS / --tasks)")
    return cloud(args.root, args.image, inputs, project=args.project, region=args.region,
                 accelerator=args.accelerator, accelerator_count=args.accelerator_count,
                 machine_type=args.machine_type, strategy=args.strategy, trainer_backend=args.trainer_backend,
                 vertex_training=args.vertex_training, dataflow=args.dataflow, name=args.name)


def set_container_env(job: dict, environments: dict) -> dict:
    """Add ``{task id: {variable: value}}`` to the ``container.env`` of those tasks' executors in the compiled
    ``PipelineJob`` ``job`` (kfp's ``PipelineContainerSpec.env``, what the KFP SDK's ``set_env_variable`` writes and
    Vertex AI Pipelines starts the container with); a variable already there is replaced. Returns ``job``."""
    spec = job["pipelineSpec"]
    for task, variables in environments.items():
        try:
            component = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
            container = spec["deploymentSpec"]["executors"][spec["components"][component]["executorLabel"]][
                "container"]
        except KeyError:
            raise ValueError(f"the compiled spec has no container task {task!r} to set {', '.join(variables)} on"
                             ) from None
        merged = {e["name"]: e["value"] for e in container.get("env", [])}
        merged.update(variables)
        container["env"] = [{"name": k, "value": str(v)} for k, v in merged.items()]
    return job


def compile_pipeline(config, out: str) -> str:
    """Write the Kubeflow V2 / Vertex AI pipeline spec for ``config`` to ``out`` (a local path or a URI) and return
    the path written: under ``tfx pipeline create`` the TFX CLI replaces ``out`` with its own place for the spec.

    TFX compiles the spec; this adds each step's environment (``pipeline.pipeline.step_environments``: the JAX
    Trainer's ``KERAS_BACKEND``) to its container, which TFX 1.16's step builder cannot (its ``platform_config`` is a
    resource spec only), and writes the result whole (written aside, then renamed or uploaded)."""
    # Imported from the module: tfx.v1's re-export needs the whole kfp SDK, the compiler only kfp-pipeline-spec.
    from tfx import version
    from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as v2

    from pipeline.pipeline import create_pipeline, step_environments
    from shaspec_tf import fileio

    out = fileio.absolute(out)
    runner = v2.KubeflowV2DagRunner(config=v2.KubeflowV2DagRunnerConfig(default_image=config.image),
                                    output_dir=fileio.dirname(out), output_filename=fileio.basename(out))
    job = runner.run(create_pipeline(config, cloud=True), write_out=False)
    # Where to write it: ``tfx pipeline create`` moves the output to its own folder before running (TFX's
    # KubeflowV2DagRunnerPatcher sets these two attributes, and reads them, the same way).
    path = fileio.join(runner._output_dir, runner._output_filename)  # pylint: disable=protected-access
    if job is None:  # a TFX CLI command that only registers the pipeline skipped the compilation: nothing to write
        return path
    set_container_env(job, step_environments(config))
    # TFX's own writer (JSON, or YAML for a .yaml / .yml name), into a file beside the target with the same ending
    with fileio.atomic_path(path, suffix=os.path.splitext(path)[1]) as staged:
        v2._write_pipeline_spec_to_file(  # pylint: disable=protected-access
            job, f"This is converted from TFX pipeline from tfx-{version.__version__}.", staged)
    return path


def parse_config(argv, environ=None):
    """``(PipelineConfig, args)`` from the flags ``argv`` over the environment; a bad or missing setting exits with
    one line naming it."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args), args
    except ValueError as err:
        parser.error(str(err))


def main(argv=None, environ=None) -> int:
    from shaspec_tf import logs

    argv = sys.argv[1:] if argv is None else list(argv)
    logs.configure("--verbose" in argv or logs.verbose_default())   # before TensorFlow is imported
    config, args = parse_config(argv, environ)
    print(f"pipeline spec: {compile_pipeline(config, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
