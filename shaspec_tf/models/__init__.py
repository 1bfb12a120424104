"""ShaSpec models (backend-agnostic Keras 3) and their builders."""
from __future__ import annotations

from shaspec_tf.models.base import ShaSpecModel, output_dtype
from shaspec_tf.models.classifier import ShaSpecClassifier
from shaspec_tf.models.masks import validate_modality_mask, validate_volume_shape
from shaspec_tf.models.presets import (AVMNIST_MODALITIES, BRATS_MODALITIES, BRATS_REGIONS, CLASSIFIER_PRESETS,
                                       SEGMENTER_PRESETS, resolve_config)
from shaspec_tf.models.saving import KERAS_FILE, load_model, save_model
from shaspec_tf.models.segmenter import ShaSpecSegmenter


def build_segmenter(preset: str = "paper", **overrides) -> ShaSpecSegmenter:
    """The ShaSpec 3D segmenter for a preset (``paper``, ``small``, ``tiny``) with options overridden by keyword.

    ``official_parity=True`` selects the official code's behaviour (first-available missing feature, unmasked
    auxiliary losses, PyTorch padding) so that :func:`shaspec_tf.convert.load_official_state_dict` reproduces it.
    """
    return ShaSpecSegmenter(resolve_config(SEGMENTER_PRESETS, preset, dict(overrides)))


def build_classifier(preset: str = "avmnist", **overrides) -> ShaSpecClassifier:
    """The ShaSpec classifier for a preset (``avmnist``, ``avmnist-tiny``)."""
    return ShaSpecClassifier(resolve_config(CLASSIFIER_PRESETS, preset, dict(overrides)))


def build_baseline_segmenter(preset: str = "paper", **overrides) -> ShaSpecSegmenter:
    """Same backbone, zero-filled missing inputs, plain concatenation, no specific encoders or auxiliary losses."""
    return build_segmenter(preset, variant="baseline", **overrides)


def build_baseline_classifier(preset: str = "avmnist", **overrides) -> ShaSpecClassifier:
    """Classifier twin of :func:`build_baseline_segmenter`."""
    return build_classifier(preset, variant="baseline", **overrides)


# The model classes by the kind their presets name (``config["task"]``), with the defaults of options that configs
# saved before those options existed were trained with (a segmenter's ``fusion_init``: the official standardised
# projection; its ``absent_features``: the encoded zeros).
_KINDS = {presets[next(iter(presets))]["task"]: (model_class, presets, legacy) for model_class, presets, legacy in (
    (ShaSpecSegmenter, SEGMENTER_PRESETS, {"fusion_init": "standardised", "absent_features": "encoded"}),
    (ShaSpecClassifier, CLASSIFIER_PRESETS, {}))}


def build_model(config: dict) -> ShaSpecModel:
    """Rebuild a model from its saved ``shaspec_config`` (``model.shaspec_config``)."""
    config = dict(config)
    preset = config.pop("preset")
    task = config.get("task")
    if task not in _KINDS:
        raise ValueError(f"unknown task {task!r} in model config")
    model_class, presets, legacy = _KINDS[task]
    for key, value in legacy.items():
        config.setdefault(key, value)
    return model_class(resolve_config(presets, preset, config))


__all__ = ["AVMNIST_MODALITIES", "BRATS_MODALITIES", "BRATS_REGIONS", "CLASSIFIER_PRESETS", "KERAS_FILE",
           "SEGMENTER_PRESETS", "ShaSpecClassifier", "ShaSpecModel", "ShaSpecSegmenter", "build_baseline_classifier",
           "build_baseline_segmenter", "build_classifier", "build_model", "build_segmenter", "load_model",
           "output_dtype", "resolve_config", "save_model", "validate_modality_mask", "validate_volume_shape"]
