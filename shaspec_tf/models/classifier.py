"""The ShaSpec classifier (AV-MNIST: image + audio -> 10 digits) and its two comparison models.

Paper section 4.2: SMIL-like encoders, shared/specific fusion "at the layer before the FC layers", then an
FC-dropout-FC head; about 0.22 M parameters. Variants: ``"shaspec"``; ``"baseline"``, the shared encoder alone on
zero-filled inputs (ShaSpec without its specific encoders, fusion and auxiliary losses); ``"concat"``, one encoder
per modality (the specific encoders alone), their features concatenated into the same head: the plain late-fusion
model (an absent modality's encoder sees zeros).
"""
from __future__ import annotations

import keras

from shaspec_tf import losses
from shaspec_tf.layers import (ConvTrunk2D, DomainClassifier, MaskModalities, MergeModalityBatch,
                               MissingFeatureGenerator, ModalityStem2D, ResidualFusion, StackModalities,
                               UnfoldModalities)
from shaspec_tf.models.base import ShaSpecModel, output_dtype


def _classifier_graph(c: dict):
    modalities = tuple(c["modalities"])
    m = len(modalities)
    shapes = c["input_shapes"]
    inputs = {name: keras.Input(tuple(shapes[name]), name=name) for name in modalities}
    inputs["modality_mask"] = keras.Input((m,), name="modality_mask")
    mask = inputs["modality_mask"]
    # Zero absent modalities (where, so NaN in an absent tensor cannot leak), one mask column per modality.
    x = {name: MaskModalities(name=f"mask_{name}")(inputs[name], mask[:, i:i + 1])
         for i, name in enumerate(modalities)}

    def stem(name, prefix):
        return ModalityStem2D(shapes[name][0], c["stem_size"], c["stem_filters"], c["norm_groups"],
                              name=f"{prefix}_{name}_stem")

    def trunk(name):
        return ConvTrunk2D(c["trunk_filters"], c["feature_dim"], c["norm_groups"], name=name)

    if c["variant"] == "concat":
        features = StackModalities(name="stack_specific")(
            [trunk(f"{name}_trunk")(stem(name, "specific")(x[name])) for name in modalities])  # [B, M, F]
        return inputs, _head(c, features, {"specific_features": features})

    # Shared encoder: modality stems onto a common grid, then one trunk over all modalities in one batch.
    grid = StackModalities(name="stack_grid")([stem(name, "shared")(x[name]) for name in modalities])
    shared_vec = trunk("shared_trunk")(MergeModalityBatch(name="merge_grid")(grid))        # [B * M, F]
    shared = UnfoldModalities(m, name="unfold_shared")(shared_vec)                         # [B, M, F]
    outputs = {"shared_features": shared}

    if c["variant"] == "shaspec":
        specific = StackModalities(name="stack_specific")(
            [trunk(f"{name}_trunk")(stem(name, "specific")(x[name])) for name in modalities])  # [B, M, F]
        fused = ResidualFusion(rank=0, name="fusion")(shared_vec, MergeModalityBatch(name="merge_specific")(specific))
        fused = MissingFeatureGenerator(c["missing_rule"], name="missing_features")(
            shared, mask, UnfoldModalities(m, name="unfold_fused")(fused))
        outputs["specific_features"] = specific
        outputs["domain_logits"] = DomainClassifier(m, name="domain_classifier")(specific)
    else:
        fused = shared
    return inputs, _head(c, fused, outputs)


def _head(c: dict, fused, outputs: dict) -> dict:
    """FC-dropout-FC over the modalities' features ``[B, M, F]`` concatenated; adds ``logits`` to ``outputs``."""
    h = keras.layers.Flatten(name="fused_concat")(fused)                                   # [B, M * F]
    h = keras.layers.Dense(c["head_units"], activation="relu", name="head_fc1")(h)
    h = keras.layers.Dropout(c["dropout"], name="head_dropout")(h)
    logits = keras.layers.Dense(c["num_classes"], name="head_fc2")(h)
    outputs["logits"] = keras.layers.Activation("linear", dtype=output_dtype(), name="logits")(logits)
    return outputs


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ShaSpecClassifier(ShaSpecModel):
    """ShaSpec for classification. Inputs: one tensor per modality (AV-MNIST: ``image`` ``[B, 28, 28, 1]``, ``audio``
    ``[B, 20, 20, 1]``) and ``modality_mask`` ``[B, M]``. Outputs: ``logits`` ``[B, num_classes]``,
    ``shared_features`` ``[B, M, F]``, and for the ShaSpec variant ``specific_features`` and ``domain_logits``."""

    def __init__(self, config: dict, **kwargs):
        inputs, outputs = _classifier_graph(config)
        kwargs.setdefault("name", f"{config['variant']}_classifier_{config['preset']}")
        super().__init__(inputs, outputs, config, **kwargs)

    def task_loss(self, y, y_pred):
        return losses.classification_loss(y, y_pred["logits"])
