"""What a task is: everything the generic code (trainer, evaluation, trained models, data files, the TFX pipeline) asks a
task instead of branching on its name.

A task module (``brats.py``, ``avmnist.py``) defines one :class:`Task` (usually a subclass overriding the hooks that
touch its data and model) and :func:`shaspec_tf.tasks.register` makes it known under its ``name``. Importing a task
module is cheap: TensorFlow, Keras and the data readers are imported inside the hooks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import numpy as np

from shaspec_tf.scoring import Scoring


@dataclass(frozen=True)
class TrainDefaults:
    """The training options a task fills in when a :class:`~shaspec_tf.training.trainer.TrainConfig` leaves them
    ``None`` (``shaspec train`` and the pipeline's Trainer alike)."""

    preset: str
    batch_size: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    drop_rate: float            # probability that a training sample's modalities are dropped

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FeatureRule:
    """One rule of the curated TFDV schema (``components.schema_curation``): a bytes feature whose values come from
    ``strings``, or an int feature in ``ints = (low, high)``; ``min_count`` / ``max_count`` values per record
    (``None``: as inferred); present in at least ``min_fraction`` of the records."""

    name: str
    strings: Tuple[str, ...] = ()
    ints: Optional[Tuple[int, int]] = None
    min_count: Optional[int] = None
    max_count: Optional[int] = None
    min_fraction: float = 1.0


@dataclass(frozen=True)
class Task:
    """One task: its data contract, training defaults, model, scoring and pipeline settings.

    Attributes:
        name: the task's name (``shaspec train --task``, the pipeline's branch, the records' ``task`` feature).
        kind: what its models' configuration calls the task (``model.shaspec_config["task"]``), e.g.
            ``"segmentation"``; results of :func:`shaspec_tf.evaluation.evaluate_subsets` carry it.
        title: for people (``"BraTS"``).
        modalities: modality names in mask order.
        modality_titles: the modalities' names in report headers, in mask order (empty: the names themselves).
        regions: the names of the model's output regions (segmentation; empty otherwise).
        train_defaults: see :class:`TrainDefaults`.
        scoring: how its predictions are scored and reported (:mod:`shaspec_tf.scoring`).
        splits: ``(train split, evaluation split)``.
        record_layout: glob of a split's files in ``shaspec prepare``'s own layout (``{data}``, ``{split}``); the TFX
            ``Examples`` layout (``{data}/Split-{split}/*``) is tried after it.
        record_features: the features of one of its TFRecords (``shaspec_tf.data.schema``).
        stats_features: the features TFX StatisticsGen summarises (small ones: never the volumes).
        label_values: the values a label may take.
        one_pass_epochs: ``True``: a training epoch is one pass over the records; ``False``: the training stream is
            endless (random crops), and an epoch is ``checkpoint_every`` steps of it.
    """

    name: str
    kind: str
    title: str
    modalities: Tuple[str, ...]
    train_defaults: TrainDefaults
    scoring: Scoring
    modality_titles: Tuple[str, ...] = ()
    regions: Tuple[str, ...] = ()
    splits: Tuple[str, str] = ("train", "eval")
    record_layout: str = "{data}/{split}/*.tfrecord"
    record_features: Tuple[str, ...] = ()
    stats_features: Tuple[str, ...] = ()
    label_values: Tuple[int, ...] = ()
    one_pass_epochs: bool = True

    # -- splits and files -------------------------------------------------------------------------------------------
    @property
    def train_split(self) -> str:
        return self.splits[0]

    @property
    def eval_split(self) -> str:
        return self.splits[1]

    def split(self, split: Optional[str] = None) -> str:
        """``split``, or the task's evaluation split when it is empty."""
        return split or self.eval_split

    def record_patterns(self, data: str, split: str) -> list:
        """The glob patterns tried, in order, for ``split`` of a prepared data set in ``data``."""
        data = str(data).rstrip("/")
        return [self.record_layout.format(data=data, split=split), f"{data}/Split-{split}/*"]

    # -- masks ------------------------------------------------------------------------------------------------------
    def check_mask(self, mask, where: str = "") -> np.ndarray:
        """The mask rule for this task's modalities (:func:`shaspec_tf.data.masks.check_modality_mask`)."""
        from shaspec_tf.data.masks import check_modality_mask

        return check_modality_mask(mask, self.modalities, where)

    def subset_mask(self, subset: str) -> list:
        """``"flair+t1ce"`` -> ``[1, 0, 1, 0]``; a one-line ``ValueError`` for unknown or no names."""
        names = [name for name in str(subset).split("+") if name]
        unknown = sorted(set(names) - set(self.modalities))
        if unknown or not names:
            raise ValueError(f"subset {subset!r}: unknown modalities {unknown}; choose from "
                             f"{'+'.join(self.modalities)}")
        mask = [1 if m in names else 0 for m in self.modalities]
        self.check_mask(mask, f"subset {subset!r}")
        return mask

    # -- training ---------------------------------------------------------------------------------------------------
    def fill_defaults(self, values: dict) -> dict:
        """``values`` with every ``None`` training option this task has a default for filled in."""
        values = dict(values)
        for key, value in self.train_defaults.as_dict().items():
            if values.get(key) is None:
                values[key] = value
        return values

    def model_builder(self) -> Callable:
        """``builder(preset, **overrides) -> model`` (e.g. :func:`shaspec_tf.build_segmenter`)."""
        raise NotImplementedError(f"task {self.name!r} builds no model")

    def presets(self) -> tuple:
        """The model presets of this task's builder."""
        return ()

    def build_model(self, preset: Optional[str] = None, **overrides):
        """The task's model for ``preset`` (default: its training default)."""
        return self.model_builder()(preset or self.train_defaults.preset, **overrides)

    def matches_model(self, config: dict) -> bool:
        """Whether a saved model configuration is one of this task's models (same kind and modalities)."""
        return config.get("task") == self.kind and tuple(config.get("modalities") or self.modalities) == \
            tuple(self.modalities)

    def model_inputs(self, features: dict):
        """Parsed record features -> ``(inputs, target)`` for ``model.fit``."""
        raise NotImplementedError(f"task {self.name!r} has no record parser")

    def train_dataset(self, files, config, dropout, start_step: int, model_config: dict):
        """The endless training ``tf.data`` stream of ``files`` for a resolved ``TrainConfig``, starting after
        ``start_step`` batches (a resumed run sees the batches an uninterrupted one would have)."""
        raise NotImplementedError(f"task {self.name!r} has no training input")

    # -- evaluation and inference -----------------------------------------------------------------------------------
    def inference_options(self, model_config: dict, roi_size=None, overlap: Optional[float] = None,
                          precision: Optional[str] = None) -> dict:
        """Keyword options of the task's whole-input inference (nothing when a model sees whole inputs at once)."""
        if precision not in (None, "fp32"):
            raise ValueError(f"precision {precision!r} applies to sliding-window inference, which task {self.name!r} "
                             "does not use (its models see whole inputs at once)")
        return {}

    def evaluate_model(self, model, files, *, roi_size=None, overlap: Optional[float] = None, tta: bool = False,
                       postprocess: bool = False, subsets=None, batch_size: int = 256,
                       overlay_cases: Optional[int] = None, precision: Optional[str] = None) -> dict:
        """:func:`shaspec_tf.evaluation.evaluate_subsets` results of ``model`` on the records of ``files``
        (``overlay_cases``: how many cases' segmentations to keep for the overlay pictures; ``None``: the default)."""
        raise NotImplementedError(f"task {self.name!r} cannot evaluate a model on records")

    # -- export (TF Serving) ----------------------------------------------------------------------------------------
    def serving_functions(self, model, overlap: Optional[float] = None, sigma_scale: Optional[float] = None,
                          sw_batch_size: int = 1) -> dict:
        """``{signature name: tf.function}`` of the task's TF Serving export of ``model``."""
        raise ValueError(f"task {self.name!r} has no TF Serving export")

    def export_manifest(self, model_config: dict, overlap: Optional[float] = None,
                        sigma_scale: Optional[float] = None) -> dict:
        """What the export manifest says beyond the model (labels, regions, inference settings)."""
        return {}

    # -- data validation (TFX) --------------------------------------------------------------------------------------
    def label_rules(self) -> tuple:
        """The :class:`FeatureRule`\\ s of the task's label features."""
        return ()

    def schema_rules(self) -> tuple:
        """Every rule the curated schema adds for this task: the contract's common features, then the labels."""
        from shaspec_tf.data.schema import SCHEMA_VERSION

        m = len(self.modalities)
        return (FeatureRule("present_modalities", strings=tuple(self.modalities), min_count=1, max_count=m),
                FeatureRule("task", strings=(self.name,), min_count=1, max_count=1),
                FeatureRule("modality_mask", ints=(0, 1), min_count=m, max_count=m),
                FeatureRule("schema_version", ints=(SCHEMA_VERSION, SCHEMA_VERSION), min_count=1, max_count=1),
                *self.label_rules())
