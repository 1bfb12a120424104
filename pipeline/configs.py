"""Every setting of the shaspec-tf pipeline, in one place.

``PipelineConfig`` holds the orchestration (name, root, metadata, Beam, serving folder, the Kubeflow / Vertex AI
image and Trainer resources) and one ``TaskConfig`` per task branch: BraTS segmentation and AV-MNIST classification
run side by side in one pipeline, each with its own example gen, validation, Trainer, evaluator and Pusher.

:func:`embedded_default` is the README's main job on one machine: phantom BraTS at a small shape (generated into
the work folder) and the real AV-MNIST (``$SHASPEC_DATA``, else ``../shared/data``). :func:`tiny` is the same at test
size. Both read ``SHASPEC_PIPELINE_ROOT`` (default ``./shaspec_pipeline``) for where everything goes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

TASKS = ("brats", "avmnist")


@dataclass
class TaskConfig:
    """One branch of the pipeline: data -> validation -> Trainer -> evaluator -> Pusher."""

    task: str                                   # "brats" or "avmnist"
    input_dir: str                              # BraTS case folders; AV-MNIST: mnist8k.npz + fsdd/recordings
    model_name: str = ""                        # TF Serving model name (default: shaspec-<task>)
    example_gen: dict = field(default_factory=dict)   # extra example-gen parameters (eval_fraction, speakers, ...)
    # Training (shaspec_tf.training.TrainConfig fields)
    preset: Optional[str] = None
    variant: str = "shaspec"
    train_steps: Optional[int] = 200
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    crop_size: Optional[Sequence[int]] = None
    warmup_steps: int = 0
    learning_rate: Optional[float] = None
    audio_rate: Optional[float] = None
    checkpoint_every: int = 100
    strategy: str = "default"                   # "default", "mirrored", "multi_worker"
    mixed_precision: str = "off"
    xla: bool = False
    eager: bool = False                         # run the train step eagerly (tiny CPU runs: no graph tracing)
    seed: int = 0
    model_options: dict = field(default_factory=dict)
    # Evaluation and blessing (components.evaluator)
    eval_split: str = ""
    min_mean: float = 0.0
    min_worst: float = 0.0
    max_regression: float = 0.05

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: expected one of {TASKS}")
        if (self.train_steps is None) == (self.epochs is None):
            raise ValueError(f"{self.task}: give exactly one of train_steps and epochs")
        self.model_name = self.model_name or f"shaspec-{self.task}"

    def train_custom_config(self) -> dict:
        """What the Trainer's ``run_fn`` (``components.trainer_module``) receives."""
        config = {"task": self.task, "preset": self.preset, "variant": self.variant, "batch_size": self.batch_size,
                  "crop_size": list(self.crop_size) if self.crop_size else None, "warmup_steps": self.warmup_steps,
                  "learning_rate": self.learning_rate, "audio_rate": self.audio_rate,
                  "checkpoint_every": self.checkpoint_every, "strategy": self.strategy,
                  "mixed_precision": self.mixed_precision, "xla": self.xla, "run_eagerly": self.eager,
                  "seed": self.seed,
                  "model_options": dict(self.model_options), "epochs": self.epochs}
        return {k: v for k, v in config.items() if v is not None}


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

    def __post_init__(self):
        self.metadata_path = self.metadata_path or os.path.join(self.root, "metadata.db")
        self.serving_dir = self.serving_dir or os.path.join(self.root, "serving")
        names = [t.task for t in self.tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {names}")
        if not self.beam_pipeline_args:
            self.beam_pipeline_args = local_beam_args()

    def task(self, name: str) -> TaskConfig:
        return next(t for t in self.tasks if t.task == name)


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
    return os.path.abspath(os.environ.get("SHASPEC_PIPELINE_ROOT", "shaspec_pipeline"))


def avmnist_data_dir() -> str:
    """``$SHASPEC_DATA``, else ``../shared/data`` beside the repository (see ``shaspec_tf.data.avmnist``)."""
    from shaspec_tf.data.avmnist import require_data_dir

    return str(require_data_dir())


def phantom_dir(root: str) -> str:
    return os.path.join(root, "data", "phantom-brats")


def embedded_default(root: Optional[str] = None) -> PipelineConfig:
    """The README's main job: phantom BraTS (``small`` preset) and the real AV-MNIST, about 10 minutes on 2 cores."""
    root = root or default_root()
    return PipelineConfig(name="shaspec", root=root, tasks=[
        TaskConfig(task="brats", input_dir=phantom_dir(root), preset="small", train_steps=300, warmup_steps=100,
                   crop_size=(32, 64, 64), batch_size=2, checkpoint_every=100,
                   example_gen={"eval_fraction": 0.2}, min_mean=0.15, min_worst=0.1),
        TaskConfig(task="avmnist", input_dir=avmnist_data_dir(), preset="avmnist", train_steps=None, epochs=15,
                   checkpoint_every=100, min_mean=0.7, min_worst=0.4),
    ])


def tiny(root: str, tasks: Sequence[str] = TASKS, **task_overrides) -> PipelineConfig:
    """Test size: tiny presets, a few steps, a handful of cases and recordings."""
    made = []
    for name in tasks:
        if name == "brats":
            task = TaskConfig(task="brats", input_dir=phantom_dir(root), preset="tiny", train_steps=4,
                              crop_size=(32, 64, 64), batch_size=1, checkpoint_every=4, eager=True,
                              example_gen={"eval_fraction": 0.34})
        else:
            task = TaskConfig(task="avmnist", input_dir=avmnist_data_dir(), preset="avmnist-tiny", train_steps=6,
                              batch_size=16, checkpoint_every=6, eager=True,
                              example_gen={"speakers": "theo", "train_indices": "15:20", "test_indices": "5:7"})
        made.append(replace(task, **task_overrides.get(name, {})))
    return PipelineConfig(name="shaspec-tiny", root=root, tasks=made, beam_pipeline_args=local_beam_args(1))


PHANTOM_CASES = {"embedded": 20, "tiny": 4}
PHANTOM_SHAPE = {"embedded": None, "tiny": (32, 64, 64)}   # None: the generator's default small shape
