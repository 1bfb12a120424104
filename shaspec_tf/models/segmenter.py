"""The ShaSpec 3D segmenter (BraTS: FLAIR, T1, T1ce, T2 -> ET, WT, TC) and its baseline."""
from __future__ import annotations

import keras

from shaspec_tf import losses
from shaspec_tf.layers import (Decoder3D, DomainClassifier, Encoder3D, FoldModalities, MaskModalities,
                               MergeModalityBatch, MissingFeatureGenerator, ModalitiesToChannels, ResidualFusion,
                               StackModalities, UnfoldModalities)
from shaspec_tf.models.base import ShaSpecModel, output_dtype
from shaspec_tf.models.masks import validate_volume_shape


class RecomputedEncoder3D(Encoder3D):
    """An :class:`Encoder3D` whose training calls keep only their inputs and outputs for the backward pass, which
    recomputes the rest (``keras.remat``: ``jax.checkpoint`` under JAX, ``tf.recompute_grad`` under TensorFlow).
    Same weights, values and gradients as the plain encoder; inference calls are the plain ones.

    Not ``keras.RematScope``: it hands ``training`` to the checkpointed call as a keyword, which
    ``tf.recompute_grad`` refuses inside a ``tf.function`` (Keras' TensorFlow train step) and ``jax.checkpoint``
    turns into a traced value; here ``training`` stays a Python value outside the checkpoint."""

    def call(self, x, training=None):
        if not training:
            return Encoder3D.call(self, x, training=training)
        return keras.remat(lambda inputs: Encoder3D.call(self, inputs, training=True))(x)


class RecomputedDecoder3D(Decoder3D):
    """:class:`Decoder3D` with the recomputation of :class:`RecomputedEncoder3D` (``remat="all"``)."""

    def call(self, x, skips, training=None):
        if not training:
            return Decoder3D.call(self, x, skips, training=training)
        return keras.remat(lambda inputs, *skip: Decoder3D.call(self, inputs, list(skip), training=True))(x, *skips)


def _encoder(c: dict, name: str) -> Encoder3D:
    encoder_class = Encoder3D if c["remat"] == "none" else RecomputedEncoder3D
    return encoder_class(**_encoder_kwargs(c), name=name)


def _encoder_kwargs(c: dict) -> dict:
    return dict(depth=c["depth"], stem_filters=c["stem_filters"], planes=c["planes"], blocks=c["blocks"],
                feature_channels=c["feature_channels"], aspp_rates=c["aspp_rates"], norm=c["norm"],
                activation=c["activation"], weight_std=c["weight_std"], symmetric_padding=c["symmetric_padding"],
                aspp_image_pool_norm=c["aspp_image_pool_norm"])


def _segmenter_graph(c: dict):
    modalities = tuple(c["modalities"])
    m = len(modalities)
    inputs = {"image": keras.Input((None, None, None, m), name="image"),
              "modality_mask": keras.Input((m,), name="modality_mask")}
    image = MaskModalities(name="mask_inputs")(inputs["image"], inputs["modality_mask"])

    # Shared encoder: one pass over every modality, folded into the batch (row b * M + m).
    shared_out = _encoder(c, "shared_encoder")(FoldModalities(name="fold")(image))
    shared = UnfoldModalities(m, name="unfold_shared")(shared_out["features"])           # [B, M, d, h, w, C]
    def absent_handled(x, name):  # [B, M, ...], its absent modalities' entries as ABSENT_FEATURES says
        if c["absent_features"] == "encoded":
            return x
        return MaskModalities(axis=1, absent=c["absent_features"], name=name)(x, inputs["modality_mask"])

    skips = [ModalitiesToChannels(name=f"skip{i}_channels")(
        absent_handled(UnfoldModalities(m, name=f"unfold_skip{i}")(s), f"mask_skip{i}"))
        for i, s in enumerate(shared_out["skips"])]                                        # [B, ..., M * C_i]
    outputs = {"shared_features": shared}

    if c["variant"] == "shaspec":
        specific, pooled = [], []
        for i, name in enumerate(modalities):
            out = _encoder(c, f"{name}_encoder")(image[..., i:i + 1])
            specific.append(out["features"])
            pooled.append(out["pooled"])
        specific = StackModalities(name="stack_specific")(specific)                        # [B, M, d, h, w, C]
        fused = ResidualFusion(rank=3, kernel_size=c["fusion_kernel"], init=c["fusion_init"],
                               symmetric_padding=c["symmetric_padding"], name="fusion")(
            shared_out["features"], MergeModalityBatch(name="merge_specific")(specific))
        fused = UnfoldModalities(m, name="unfold_fused")(fused)
        fused = MissingFeatureGenerator(c["missing_rule"], name="missing_features")(
            shared, inputs["modality_mask"], fused)
        outputs["specific_features"] = specific
        outputs["domain_logits"] = DomainClassifier(m, name="domain_classifier")(
            StackModalities(name="stack_pooled")(pooled))                                   # [B, M, M]
    else:
        fused = absent_handled(shared, "mask_shared")  # baseline: the modalities' own features, plainly concatenated

    decoder_class = RecomputedDecoder3D if c["remat"] == "all" else Decoder3D
    decoder = decoder_class(c["decoder_filters"], num_classes=len(c["regions"]), norm=c["norm"],
                            activation=c["activation"], weight_std=c["weight_std"],
                            symmetric_padding=c["symmetric_padding"], name="decoder")
    logits = decoder(ModalitiesToChannels(name="fused_channels")(fused), skips)
    outputs["logits"] = keras.layers.Activation("linear", dtype=output_dtype(), name="logits")(logits)
    return inputs, outputs


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ShaSpecSegmenter(ShaSpecModel):
    """ShaSpec for 3D segmentation.

    Inputs: ``{"image": float32 [B, D, H, W, M], "modality_mask": [B, M]}`` (BraTS order FLAIR, T1, T1ce, T2; D, H,
    W divisible by 16, 32, 32). Outputs: ``logits`` ``[B, D, H, W, 3]`` (independent sigmoids, channels ET, WT, TC),
    ``shared_features`` ``[B, M, d, h, w, C]``, and for the ShaSpec variant ``specific_features`` and
    ``domain_logits`` ``[B, M, M]``.
    """

    def __init__(self, config: dict, **kwargs):
        inputs, outputs = _segmenter_graph(config)
        kwargs.setdefault("name", f"shaspec_segmenter_{config['preset']}" if config["variant"] == "shaspec"
                          else f"baseline_segmenter_{config['preset']}")
        super().__init__(inputs, outputs, config, **kwargs)

    def validate_inputs(self, inputs) -> None:
        # the base class by name, not super(): AutoGraph cannot convert a method whose closure holds __class__ (the
        # TFX Trainer's export printed that warning twice in `make demo`)
        ShaSpecModel.validate_inputs(self, inputs)
        validate_volume_shape(tuple(inputs["image"].shape), len(self.modalities))

    def task_loss(self, y, y_pred):
        return losses.segmentation_loss(y, y_pred["logits"])
