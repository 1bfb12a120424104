"""AV-MNIST: digit classification from an MNIST image and a spoken digit's MFCCs (either may be missing), by the SMIL
protocol (``shaspec_tf.data.avmnist``); scored by accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from shaspec_tf.tasks.base import FeatureRule, Task, TrainDefaults
from shaspec_tf.scoring import AccuracyScoring
from shaspec_tf.taskspec.constants import (AVMNIST_MODALITIES, AVMNIST_IMAGE_SHAPE, AVMNIST_AUDIO_SHAPE, AVMNIST_CLASSES,
                                        AVMNIST_SPLITS, AVMNIST_RECORD_FEATURES,
                                        AVMNIST_STATS_FEATURES)  # noqa: F401 (re-exported)
from shaspec_tf.taskspec.constants import AVMNIST_NAME as NAME


@dataclass(frozen=True)
class AvMnistTask(Task):
    """Classification of small samples, evaluated in batches: one forward pass per batch and subset."""

    def model_builder(self):
        from shaspec_tf.models import build_classifier

        return build_classifier

    def presets(self) -> tuple:
        from shaspec_tf.models.presets import CLASSIFIER_PRESETS

        return tuple(CLASSIFIER_PRESETS)

    def model_inputs(self, features: dict):
        from shaspec_tf.data.schema import avmnist_model_inputs

        return avmnist_model_inputs(features)

    def train_dataset(self, files, config, dropout, start_step: int, model_config: dict):
        from shaspec_tf.data.input import avmnist_dataset

        # Only the missingness the data carries (the paper's audio-rate protocol) unless dropout is asked for.
        dropping = dropout.subset or dropout.probs is not None or config.drop_rate > 0
        data = avmnist_dataset(files, batch_size=config.batch_size, seed=config.seed, audio_rate=config.audio_rate,
                               dropout=dropout if dropping else None, repeat=True)
        return data.skip(start_step)

    def evaluate_model(self, model, files, *, roi_size=None, overlap=None, tta: bool = False,
                       postprocess: bool = False, subsets=None, batch_size: int = 256,
                       overlay_cases: Optional[int] = None, precision: Optional[str] = None) -> dict:
        """Accuracy per subset over every sample of ``files`` (the inference options and overlays do not apply; a
        ``precision`` other than fp32 is refused)."""
        import numpy as np

        self.inference_options(model.shaspec_config, precision=precision)

        from shaspec_tf.data.input import avmnist_dataset
        from shaspec_tf.evaluation import evaluate_subsets

        names = list(self.modalities)
        batches = []
        for inputs, labels in avmnist_dataset(files, batch_size=batch_size, training=False):
            batches.append({**{m: inputs[m].numpy() for m in names}, "label": labels.numpy()})

        def predict(batch, mask):
            masks = np.tile(mask, (len(batch["label"]), 1))
            logits = model.predict_on_batch({**{m: batch[m] for m in names}, "modality_mask": masks})
            return np.asarray(logits["logits"]).argmax(-1)

        return evaluate_subsets(predict, batches, model.modalities, subsets=subsets, task=self.name, progress=False)

    def serving_functions(self, model, overlap=None, sigma_scale=None, sw_batch_size: int = 1) -> dict:
        from shaspec_tf.export import classification_functions

        return classification_functions(model)

    def label_rules(self) -> tuple:
        return (FeatureRule("label", ints=(min(self.label_values), max(self.label_values)), min_count=1,
                            max_count=1),)


AVMNIST = AvMnistTask(
    name=NAME, kind="classification", title="AV-MNIST", modalities=AVMNIST_MODALITIES,
    modality_titles=("Image", "Audio"),
    # The paper's AV-MNIST schedule: Adam, lr 1e-3, weight decay 1e-2. Modality dropout by the official law at rate
    # 1.0, chosen by evidence (benchmarks/avmnist_learning.py --study defaults, 5 seeds, README "What it learns"):
    # without dropout the single-modality subsets were 4.5 (image) and 35 (audio) points worse; rate 0.5, a 10-epoch
    # warm-up and independent per-modality dropout tied with it (mean over subsets within 0.14 points, p >= 0.32).
    train_defaults=TrainDefaults(preset="avmnist", batch_size=32, learning_rate=1e-3, optimizer="adam",
                                 weight_decay=1e-2, drop_rate=1.0),
    scoring=AccuracyScoring(), splits=AVMNIST_SPLITS, record_layout="{data}/{split}-*.tfrecord",
    record_features=AVMNIST_RECORD_FEATURES, stats_features=AVMNIST_STATS_FEATURES,
    label_values=tuple(range(AVMNIST_CLASSES)), one_pass_epochs=True)
