"""The ShaSpec 3D segmenter (BraTS: FLAIR, T1, T1ce, T2 -> ET, WT, TC) and its baseline."""
from __future__ import annotations

import keras

from shaspec_tf import losses
from shaspec_tf.layers import (Decoder3D, DomainClassifier, Encoder3D, FoldModalities, MaskModalities,
                               MergeModalityBatch, MissingFeatureGenerator, ModalitiesToChannels, ResidualFusion,
                               StackModalities, UnfoldModalities)
from shaspec_tf.models.base import ShaSpecModel, output_dtype
from shaspec_tf.models.masks import validate_volume_shape


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
    shared_out = Encoder3D(**_encoder_kwargs(c), name="shared_encoder")(FoldModalities(name="fold")(image))
    shared = UnfoldModalities(m, name="unfold_shared")(shared_out["features"])           # [B, M, d, h, w, C]
    skips = [ModalitiesToChannels(name=f"skip{i}_channels")(UnfoldModalities(m, name=f"unfold_skip{i}")(s))
             for i, s in enumerate(shared_out["skips"])]                                   # [B, ..., M * C_i]
    outputs = {"shared_features": shared}

    if c["variant"] == "shaspec":
        specific, pooled = [], []
        for i, name in enumerate(modalities):
            out = Encoder3D(**_encoder_kwargs(c), name=f"{name}_encoder")(image[..., i:i + 1])
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
        fused = shared  # baseline: the zero-filled modalities' own features, plainly concatenated

    decoder = Decoder3D(c["decoder_filters"], num_classes=len(c["regions"]), norm=c["norm"],
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
        super().validate_inputs(inputs)
        validate_volume_shape(tuple(inputs["image"].shape), len(self.modalities))

    def task_loss(self, y, y_pred):
        return losses.segmentation_loss(y, y_pred["logits"])
