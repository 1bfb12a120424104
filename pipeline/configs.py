"""Every setting of the shaspec-tf pipeline, in one place.

``PipelineConfig`` holds the orchestration (name, root, metadata, Beam, serving folder, the Kubeflow / Vertex AI
image and Trainer resources) and one ``TaskConfig`` per task branch: BraTS segmentation and AV-MNIST classification
run side by side in one pipeline, each with its own example gen, validation, Trainer, evaluator and Pusher.

:func:`embedded_default` is the README's main job on one machine: phantom BraTS at a small shape (generated into
the work folder) and the real AV-MNIST (``$SHASPEC_DATA``, else ``../shared/data``). :func:`tiny` is the same at test
size. Both read ``SHASPEC_PIPELINE_ROOT`` (default ``./shaspec_pipeline``) for where everything goes. :func:`cloud` is
the Kubeflow Pipelines v2 / Vertex AI pipeline (:data:`CLOUD` sizes); ``pipeline/kubeflow_v2_runner.py`` fills in
where the data is, the image and the hardware from the environment or its flags.

Every default is written once. The training fields of :class:`TaskConfig` are ``TrainConfig``'s, under its names
(``steps``, ``jit_compile``, ``run_eagerly``, ...); ``None`` leaves an option to ``TrainConfig`` or the task
(``shaspec_tf.tasks``), and the Trainer's ``run_fn`` builds its ``TrainConfig`` from exactly the fields given. The
evaluation fields reach the evaluator under the same names (``overlap`` the exporter too); the components define
no defaults of their own for them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence

from shaspec_tf import fileio
from shaspec_tf.tasks import get_task, task_names

TASKS = task_names()
# TaskConfig fields that are not shaspec_tf.training.trainer.TrainConfig's
PIPELINE_FIELDS = ("task", "input_dir", "model_name", "example_gen", "eval_split", "min_mean", "min_worst",
                   "max_regression", "overlap")


@dataclass
class TaskConfig:
    """One branch of the pipeline: data -> validation -> Trainer -> evaluator -> Pusher."""

    task: str                                   # a task name (shaspec_tf.tasks), e.g. "brats" or "avmnist"
    input_dir: str                              # BraTS case folders; AV-MNIST: mnist8k.npz + fsdd/recordings
    model_name: str = ""                        # TF Serving model name (default: shaspec-<task>)
    example_gen: dict = field(default_factory=dict)   # extra example-gen parameters (eval_fraction, audio_rate, ...)
    # Training: shaspec_tf.training.trainer.TrainConfig's fields and names; None = TrainConfig's or the task's default
    preset: Optional[str] = None
    variant: Optional[str] = None
    steps: Optional[int] = 200                  # exactly one of steps and epochs
    epochs: Optional[int] = None
    checkpoint_every: Optional[int] = None
    batch_size: Optional[int] = None
    crop_size: Optional[Sequence[int]] = None
    regime: Optional[str] = None
    subset: Optional[str] = None
    warmup_steps: Optional[int] = None
    ramp_steps: Optional[int] = None
    drop_rate: Optional[float] = None
    drop_probs: Optional[dict] = None           # modality -> probability of leaving it out (instead of drop_rate)
    learning_rate: Optional[float] = None
    schedule: Optional[str] = None
    optimizer: Optional[str] = None
    weight_decay: Optional[float] = None
    mixed_precision: Optional[str] = None
    jit_compile: Optional[bool] = None
    run_eagerly: Optional[bool] = None          # True: eager train steps (tiny CPU runs: no graph tracing)
    strategy: Optional[str] = None              # "default", "mirrored", "multi_worker"
    audio_rate: Optional[float] = None          # training-time audio limit (the example gen's is example_gen's)
    seed: Optional[int] = None
    model_options: dict = field(default_factory=dict)
    deterministic: Optional[bool] = None
    # Evaluation and blessing (components.evaluator); the exporter gets overlap too
    eval_split: str = ""                        # empty: the task's evaluation split
    min_mean: float = 0.0
    min_worst: float = 0.0
    # 0.05: a retrained model may score up to 5 points (mean or worst subset) below the blessed one and still be
    # pushed. The evaluation sets are small (300 AV-MNIST test samples, a handful of phantom cases), so two equally
    # good trainings differ by a few points by chance; with 0.0 the push would hinge on that noise.
    max_regression: float = 0.05
    overlap: Optional[float] = None             # sliding-window overlap; None: shaspec_tf.inference's default

    def __post_init__(self):
        if self.task not in task_names():
            raise ValueError(f"unknown task {self.task!r}: expected one of {', '.join(task_names())}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"{self.task}: give exactly one of steps and epochs")
        self.model_name = self.model_name or f"shaspec-{self.task}"

    def train_options(self) -> dict:
        """The ``TrainConfig`` options this branch sets (every training field that is not ``None``)."""
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PIPELINE_FIELDS}
        options["crop_size"] = list(self.crop_size) if self.crop_size else None
        options["model_options"] = dict(self.model_options) or None
        return {k: v for k, v in options.items() if v is not None}

    def train_custom_config(self) -> dict:
        """What the Trainer's ``run_fn`` (``components.trainer_module``) receives: the task, the training options
        under ``TrainConfig``'s names, and the exporter's ``overlap`` when set."""
        config = {"task": self.task, **self.train_options()}
        if self.overlap is not None:
            config["overlap"] = float(self.overlap)
        return config

    def evaluator_options(self) -> dict:
        """The evaluator's parameters (``components.evaluator.MissingModalityEvaluator``)."""
        options = {"task": self.task, "split": get_task(self.task).split(self.eval_split),
                   "min_mean": float(self.min_mean), "min_worst": float(self.min_worst),
                   "max_regression": float(self.max_regression)}
        if self.overlap is not None:
            options["overlap"] = float(self.overlap)
        return options


@dataclass
class PipelineConfig:
    name: str
    root: str                                   # pipeline root: artifacts, metadata, serving
    tasks: List[TaskConfig]
    metadata_path: str = ""                     # SQLite file (local runs); default ROOT/metadata.db
    serving_dir: str = ""                       # Pusher's base: SERVING/<model_name>/<version>; default ROOT/serving
    enable_cache: bool = True
    beam_pipeline_args: List[str] = field(default_factory=list)   # default: DirectRunner, multi-processing
    # Kubeflow Pipelines v2 / Vertex AI
    image: str = "gcr.io/my-project/shaspec-tf:latest"
    trainer_machine_type: str = "n1-standard-8"
    trainer_accelerator_type: str = "NVIDIA_TESLA_T4"
    trainer_accelerator_count: int = 1
    trainer_cpu: float = 8.0
    trainer_memory_gb: float = 30.0
    vertex_training: bool = False               # run the Trainer as a Vertex AI custom job (worker pool spec)
    gcp_project: str = ""
    gcp_region: str = "us-central1"
    # The Keras backend the Trainer trains under in the cloud (TRAINER_BACKENDS); None: whatever the Trainer's
    # process has (local runs: this process). Set, it reaches run_fn, which refuses to train under another one.
    trainer_backend: Optional[str] = None

    def __post_init__(self):
        self.metadata_path = self.metadata_path or fileio.join(self.root, "metadata.db")
        self.serving_dir = self.serving_dir or fileio.join(self.root, "serving")
        names = [t.task for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {names}")
        if not self.beam_pipeline_args:
            self.beam_pipeline_args = local_beam_args()
        if self.trainer_backend is not None and self.trainer_backend not in TRAINER_BACKENDS:
            raise ValueError(f"unknown Trainer backend {self.trainer_backend!r}: expected one of "
                             f"{', '.join(TRAINER_BACKENDS)}")

    def task(self, name: str) -> TaskConfig:
        return next(t for t in self.tasks if t.task == name)

    def trainer_environment(self) -> dict:
        """The variables the Trainer's container must start with: ``KERAS_BACKEND`` when it trains under JAX (Keras
        fixes its backend at its first import, which TFX's container entrypoint does before ``run_fn``). Empty for
        TensorFlow, Keras' default, so that spec is as before."""
        return {"KERAS_BACKEND": "jax"} if self.trainer_backend == "jax" else {}


def local_beam_args(workers: Optional[int] = None) -> List[str]:
    """Beam's DirectRunner with one process per core (the local default)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def dataflow_beam_args(project: str, region: str, temp_location: str, machine_type: str = "n1-standard-4",
                       max_workers: int = 8) -> List[str]:
    """Beam options for running the example gens and statistics on Google Cloud Dataflow."""
    return ["--runner=DataflowRunner", f"--project={project}", f"--region={region}",
            f"--temp_location={temp_location}", f"--machine_type={machine_type}",
            f"--max_num_workers={max_workers}", "--experiments=use_runner_v2"]


def default_root() -> str:
    """``$SHASPEC_PIPELINE_ROOT`` (a local folder, made absolute, or a URI such as ``gs://BUCKET/shaspec``), else
    ``./shaspec_pipeline``."""
    return fileio.absolute(os.environ.get("SHASPEC_PIPELINE_ROOT") or "shaspec_pipeline")


def avmnist_data_dir() -> str:
    """``$SHASPEC_DATA``, else ``../shared/data`` beside the repository (see ``shaspec_tf.data.avmnist``)."""
    from shaspec_tf.data.avmnist import require_data_dir

    return str(require_data_dir())


def phantom_dir(root: str) -> str:
    return fileio.join(root, "data", "phantom-brats")


def embedded_default(root: Optional[str] = None) -> PipelineConfig:
    """The README's main job: phantom BraTS (``small`` preset) and the real AV-MNIST, about 10 minutes on 2 cores."""
    root = root or default_root()
    return PipelineConfig(name="shaspec", root=root, tasks=[_branch(name, root, EMBEDDED) for name in EMBEDDED])


# The branches of each size, by task: their inputs (a function of the pipeline root) and settings. A task missing
# here is a TaskConfig the caller writes itself.
INPUTS = {"brats": phantom_dir, "avmnist": lambda root: avmnist_data_dir()}
EMBEDDED = {
    "brats": dict(preset="small", steps=300, warmup_steps=100, crop_size=(32, 64, 64), batch_size=2,
                  example_gen={"eval_fraction": 0.2}, min_mean=0.15, min_worst=0.1),
    "avmnist": dict(preset="avmnist", steps=None, epochs=15, min_mean=0.7, min_worst=0.4),
}
TINY = {
    "brats": dict(preset="tiny", steps=4, crop_size=(32, 64, 64), batch_size=1, checkpoint_every=4,
                  run_eagerly=True, example_gen={"eval_fraction": 0.34}),
    "avmnist": dict(preset="avmnist-tiny", steps=6, batch_size=16, checkpoint_every=6, run_eagerly=True,
                    example_gen={"speakers": "theo", "train_indices": "15:20", "test_indices": "5:7"}),
}


def _branch(name: str, root: str, sizes: dict, **overrides) -> TaskConfig:
    task = get_task(name).name
    if task not in sizes:
        raise ValueError(f"no {task} branch of this size is defined: expected one of {', '.join(sizes)}")
    return TaskConfig(task=task, input_dir=INPUTS[task](root), **{**sizes[task], **overrides})


def tiny(root: str, tasks: Sequence[str] = tuple(TINY), **task_overrides) -> PipelineConfig:
    """Test size: tiny presets, a few steps, a handful of cases and recordings."""
    made = [_branch(name, root, TINY, **task_overrides.get(name, {})) for name in tasks]
    return PipelineConfig(name="shaspec-tiny", root=root, tasks=made, beam_pipeline_args=local_beam_args(1))


PHANTOM_CASES = {"embedded": 20, "tiny": 4}
PHANTOM_SHAPE = {"embedded": None, "tiny": (32, 64, 64)}   # None: the generator's default small shape


# -- Kubeflow Pipelines v2 / Vertex AI --------------------------------------------------------------------------------
# The cloud size of each branch: paper-size BraTS training, the paper's AV-MNIST schedule. Where the data is, which
# image runs it and on what hardware are the deployment's (pipeline/kubeflow_v2_runner.py: environment or flags).
CLOUD = {
    "brats": dict(preset="paper", steps=50000, batch_size=1, checkpoint_every=1000, min_mean=0.5, min_worst=0.2),
    "avmnist": dict(preset="avmnist", steps=None, epochs=60, min_mean=0.9, min_worst=0.5),
}
# The hardware: PipelineConfig's defaults (written there once), every branch's tf.distribute strategy and the
# Trainer's Keras backend. TensorFlow by default: it is what the CPU and GPU images hold, and the strategies
# (mirrored over the machine's GPUs, multi-worker) are TensorFlow's. "jax" needs the image of the Dockerfile's
# VARIANT=jax-gpu, trains on one accelerator, and its strategy defaults to "default" (BACKEND_STRATEGY).
_PIPELINE_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}
TRAINER_BACKENDS = ("tensorflow", "jax")
STRATEGIES = ("default", "mirrored", "multi_worker")
BACKEND_STRATEGY = {"tensorflow": "mirrored", "jax": "default"}
CLOUD_DEFAULTS = dict(region=_PIPELINE_DEFAULTS["gcp_region"], machine_type=_PIPELINE_DEFAULTS["trainer_machine_type"],
                      accelerator=_PIPELINE_DEFAULTS["trainer_accelerator_type"],
                      accelerator_count=_PIPELINE_DEFAULTS["trainer_accelerator_count"],
                      strategy=BACKEND_STRATEGY["tensorflow"], trainer_backend="tensorflow")


def cloud(root: str, image: str, inputs: dict, project: str = "", vertex_training: bool = False,
          dataflow: bool = False, name: str = "shaspec", task_overrides: Optional[dict] = None,
          **resources) -> PipelineConfig:
    """The pipeline for Kubeflow Pipelines v2 / Vertex AI: one :data:`CLOUD` branch per task in ``inputs``
    (``{task: input folder}``); ``task_overrides`` (``{task: {field: value}}``) change a branch's settings and
    ``resources`` (``region``, ``machine_type``, ``accelerator``, ``accelerator_count``, ``strategy``,
    ``trainer_backend``) the :data:`CLOUD_DEFAULTS`; a strategy left out (or ``None``) is the backend's
    (:data:`BACKEND_STRATEGY`). The JAX Trainer runs on one machine with one accelerator: a TensorFlow strategy or
    more than one accelerator is refused here, before anything reaches the cloud.

    Every path must be a URI the pipeline's containers can reach (``gs://...``): a local path names the disk of the
    machine that compiles, not theirs. Dataflow and Vertex AI training need the Google Cloud ``project``."""
    unknown = sorted(set(resources) - set(CLOUD_DEFAULTS))
    if unknown:
        raise TypeError(f"cloud() got unknown settings {unknown}: expected some of {', '.join(CLOUD_DEFAULTS)}")
    settings = {**CLOUD_DEFAULTS, **{k: v for k, v in resources.items() if v is not None}}
    backend = settings["trainer_backend"]
    if backend not in TRAINER_BACKENDS:
        raise ValueError(f"unknown Trainer backend {backend!r}: expected one of {', '.join(TRAINER_BACKENDS)}")
    if resources.get("strategy") is None:
        settings["strategy"] = BACKEND_STRATEGY[backend]
    region, strategy, accelerator_count = settings["region"], settings["strategy"], settings["accelerator_count"]
    if not inputs:
        raise ValueError(f"no task to run: give the input of at least one of {', '.join(CLOUD)}")
    paths = {"pipeline root": root, **{f"{task} input": path for task, path in inputs.items()}}
    for what, path in paths.items():
        if not path or not fileio.is_uri(path):
            raise ValueError(f"the {what} must be a URI the pipeline's containers can read (gs://BUCKET/...), "
                             f"got {path!r}")
    if not image:
        raise ValueError("no container image: give the image that holds shaspec-tf[pipeline] (see the Dockerfile)")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if int(accelerator_count) < 0:
        raise ValueError(f"the accelerator count must be 0 or more, got {accelerator_count}")
    if (dataflow or vertex_training) and not project:
        raise ValueError("Dataflow and Vertex AI training need the Google Cloud project (GOOGLE_CLOUD_PROJECT)")
    beam = (dataflow_beam_args(project, region, fileio.join(root, "tmp")) if dataflow
            else ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=0"])
    tasks = []
    for task, path in inputs.items():
        task = get_task(task).name
        if task not in CLOUD:
            raise ValueError(f"no cloud branch for task {task!r}: expected one of {', '.join(CLOUD)}")
        tasks.append(TaskConfig(task=task, input_dir=path, **{**CLOUD[task], "strategy": strategy,
                                                              **(task_overrides or {}).get(task, {})}))
    if backend == "jax":
        _check_jax_trainer(tasks, int(accelerator_count))
    return PipelineConfig(name=name, root=root, tasks=tasks, beam_pipeline_args=beam, image=image,
                          trainer_machine_type=settings["machine_type"],
                          trainer_accelerator_type=settings["accelerator"],
                          trainer_accelerator_count=int(accelerator_count), vertex_training=bool(vertex_training),
                          gcp_project=project, gcp_region=region, trainer_backend=backend)


def _check_jax_trainer(tasks: Sequence[TaskConfig], accelerator_count: int) -> None:
    """What ``components.trainer_module.training_options`` would refuse on the cloud machine, refused at compile
    time: a ``tf.distribute`` strategy, and accelerators the one-device JAX Trainer would leave idle."""
    for t in tasks:
        if (t.strategy or "default") != "default":
            raise ValueError(f"the {t.task} Trainer's strategy {t.strategy!r} is TensorFlow's (tf.distribute); the "
                             f"JAX Trainer runs on one machine: use strategy 'default' or trainer backend tensorflow")
    if accelerator_count > 1:
        raise ValueError(f"the JAX Trainer trains on one accelerator and would leave {accelerator_count - 1} of "
                         f"{accelerator_count} idle: give an accelerator count of 1 (or 0), or trainer backend "
                         f"tensorflow (mirrored strategy)")
