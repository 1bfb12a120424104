"""BraTS: 3D brain-tumour segmentation from FLAIR, T1, T1ce and T2 (any non-empty subset of them).

The BraTS constants live here, once: the modalities, the label values (1 necrotic / non-enhancing core, 2 oedema,
4 enhancing tumour; BraTS 2023 writes 4 as 3) and the regions scored and predicted (ET, WT, TC, the official channel
order). ``shaspec_tf.data.schema`` and ``shaspec_tf.metrics`` import them from here; ``shaspec_tf.models.presets``
keeps its own copy, the model library being Keras-only (``tests/test_tasks.py`` checks that they agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from shaspec_tf.tasks.base import FeatureRule, Task, TrainDefaults
from shaspec_tf.scoring import RegionScoring
from shaspec_tf.taskspec.constants import (BRATS_MODALITIES, BRATS_REGIONS, BRATS_LABEL_VALUES, BRATS_LABEL_REGIONS,
                                        BRATS2023_LABEL_REGIONS, BRATS_LABEL_PRECEDENCE, BRATS_SPLITS,
                                        BRATS_RECORD_FEATURES, BRATS_STATS_FEATURES)  # noqa: F401 (re-exported)
from shaspec_tf.taskspec.constants import BRATS_NAME as NAME

# Inference settings that are not the model's: the window is the model's training crop, and the overlap, blending
# and sigma are shaspec_tf.inference's defaults (read from sliding_window_predict's signature).
INFERENCE_DEFAULTS = ("overlap", "mode", "sigma_scale")


def inference_defaults() -> dict:
    """``{"overlap", "mode", "sigma_scale"}``: the defaults of :func:`shaspec_tf.inference.sliding_window_predict`
    (whichever of them it has)."""
    import inspect

    from shaspec_tf.inference import sliding_window_predict

    parameters = inspect.signature(sliding_window_predict).parameters
    return {k: parameters[k].default for k in INFERENCE_DEFAULTS
            if k in parameters and parameters[k].default is not inspect.Parameter.empty}


@dataclass(frozen=True)
class BratsTask(Task):
    """Segmentation of whole MRI volumes with a sliding window; Dice and HD95 per region."""

    def model_builder(self):
        from shaspec_tf.models import build_segmenter

        return build_segmenter

    def presets(self) -> tuple:
        from shaspec_tf.models.presets import SEGMENTER_PRESETS

        return tuple(SEGMENTER_PRESETS)

    def model_inputs(self, features: dict):
        from shaspec_tf.data.schema import brats_model_inputs

        return brats_model_inputs(features)

    def train_dataset(self, files, config, dropout, start_step: int, model_config: dict):
        from shaspec_tf.data.input import brats_dataset

        crop = tuple(config.crop_size or model_config["crop_size"])
        return brats_dataset(files, batch_size=config.batch_size, crop_size=crop, seed=config.seed, dropout=dropout,
                             start_step=start_step, num_modalities=len(self.modalities))

    def inference_options(self, model_config: dict, roi_size=None, overlap: Optional[float] = None,
                          precision: Optional[str] = None) -> dict:
        """``{"roi_size", "overlap", "mode", "sigma_scale"}`` (and ``"precision"`` when given) for
        :func:`shaspec_tf.inference.sliding_window_predict`: the window defaults to the model's training crop, the
        rest to the inference module's defaults."""
        options = inference_defaults()
        options["roi_size"] = tuple(roi_size or model_config["crop_size"])
        if overlap is not None:
            options["overlap"] = float(overlap)
        if precision is not None:
            options["precision"] = precision
        return options

    def evaluate_model(self, model, files, *, roi_size=None, overlap: Optional[float] = None, tta: bool = False,
                       postprocess: bool = False, subsets=None, batch_size: int = 256,
                       overlay_cases: Optional[int] = None, precision: Optional[str] = None) -> dict:
        """Sliding-window inference over each whole (cropped) case, labels in BraTS values, Dice and HD95 per region
        in mm; only labelled cases with every modality enter the subset matrix (the others are listed under
        ``"skipped"``)."""
        import numpy as np

        from shaspec_tf.evaluation import evaluate_subsets
        from shaspec_tf.inference import postprocess as postprocess_labels
        from shaspec_tf.inference import probabilities_to_labels, sliding_window_predict

        options = self.inference_options(model.shaspec_config, roi_size, overlap, precision)
        skipped = []

        def cases():
            for record in read_records(files):
                if record.label is None or not np.all(record.modality_mask == 1):
                    skipped.append(record.case_id)
                    continue
                yield {"case_id": record.case_id, "image": record.image, "labels": record.label,
                       "spacing": tuple(record.spacing), "affine": record.affine}

        def predict(case, mask):
            prob = sliding_window_predict(model, case["image"], mask, tta_flips=tta, **options)
            labels = probabilities_to_labels(prob)
            return postprocess_labels(labels) if postprocess else labels

        overlays = {} if overlay_cases is None else {"overlay_cases": overlay_cases}
        results = evaluate_subsets(predict, cases(), model.modalities, subsets=subsets, task=self.name, **overlays)
        results["skipped"] = skipped
        return results

    def serving_functions(self, model, overlap: Optional[float] = None, sigma_scale: Optional[float] = None,
                          sw_batch_size: int = 1) -> dict:
        from shaspec_tf.export import segmentation_functions

        options = self.inference_options(model.shaspec_config, overlap=overlap)
        return segmentation_functions(model, overlap=options["overlap"], precedence=BRATS_LABEL_PRECEDENCE,
                                      sigma_scale=options["sigma_scale"] if sigma_scale is None else sigma_scale,
                                      mode=options["mode"], sw_batch_size=sw_batch_size)

    def export_manifest(self, model_config: dict, overlap: Optional[float] = None,
                        sigma_scale: Optional[float] = None) -> dict:
        options = self.inference_options(model_config, overlap=overlap)
        return {"regions": list(self.regions), "labels": list(self.label_values),
                "roi_size": list(options["roi_size"]), "overlap": options["overlap"], "blending": options["mode"],
                "sigma_scale": options["sigma_scale"] if sigma_scale is None else sigma_scale}

    def label_rules(self) -> tuple:
        values = tuple(str(v) for v in self.label_values)
        # an unlabelled case has no label values; a BraTS 2023 label 3 or a stray value is an anomaly
        return (FeatureRule("label_values", strings=values, min_count=0, max_count=len(values), min_fraction=0.0),)


def read_records(files):
    """The :class:`~shaspec_tf.data.schema.BratsRecord` of every record in ``files``, in order."""
    from shaspec_tf.data.files import record_dataset
    from shaspec_tf.data.schema import brats_record_from_example

    for raw in record_dataset(files):
        yield brats_record_from_example(raw.numpy())


BRATS = BratsTask(
    name=NAME, kind="segmentation", title="BraTS", modalities=BRATS_MODALITIES, regions=BRATS_REGIONS,
    modality_titles=("FLAIR", "T1", "T1ce", "T2"),
    # The official random modality dropout; SGD (Nesterov) with lr 1e-2; the CPU-sized "small" preset.
    train_defaults=TrainDefaults(preset="small", batch_size=2, learning_rate=1e-2, optimizer="sgd",
                                 weight_decay=0.0, drop_rate=1.0),
    scoring=RegionScoring(BRATS_LABEL_REGIONS), splits=BRATS_SPLITS, record_layout="{data}/{split}/*.tfrecord",
    record_features=BRATS_RECORD_FEATURES, stats_features=BRATS_STATS_FEATURES, label_values=BRATS_LABEL_VALUES,
    one_pass_epochs=False)
