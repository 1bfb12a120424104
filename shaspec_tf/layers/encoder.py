"""The ShaSpec 3D encoder: ResNet trunk -> 1x1 reduction -> ASPP.

Used once as the shared encoder (all modalities, one set of weights) and once per modality as a specific encoder.
"""
from __future__ import annotations

import keras

from shaspec_tf.layers.aspp import ASPP3D
from shaspec_tf.layers.resnet import ConvNormAct, ResNet3D, channels_shape


@keras.saving.register_keras_serializable(package="shaspec_tf")
class Encoder3D(keras.layers.Layer):
    """Returns a dict:

    * ``features``: the bottleneck features ``[B, d, h, w, feature_channels]`` (ASPP output; ``r`` or ``s``),
    * ``pooled``: the spatial mean of the ASPP input ``[B, feature_channels]`` (domain-classifier input),
    * ``skips``: the trunk's stage outputs ``[stem, layer1, layer2, layer3]`` for the decoder.
    """

    def __init__(self, depth=50, stem_filters=64, planes=(64, 128, 256, 320), blocks=None, feature_channels=256,
                 aspp_rates=(2, 4, 8), norm="instance", activation="leaky_relu", weight_std=True,
                 symmetric_padding=False, aspp_image_pool_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(depth=depth, stem_filters=stem_filters, planes=tuple(planes),
                           blocks=None if blocks is None else tuple(blocks), feature_channels=int(feature_channels),
                           aspp_rates=tuple(aspp_rates), norm=norm, activation=activation, weight_std=weight_std,
                           symmetric_padding=symmetric_padding, aspp_image_pool_norm=aspp_image_pool_norm)
        common = dict(norm=norm, activation=activation, weight_std=weight_std, symmetric_padding=symmetric_padding)
        self.trunk = ResNet3D(depth, stem_filters, planes, blocks, name="trunk", **common)
        self.reduce = ConvNormAct(feature_channels, 1, name="reduce", **common)
        self.aspp = ASPP3D(feature_channels, aspp_rates, image_pool_norm=aspp_image_pool_norm, name="aspp", **common)
        self.skip_channels = self.trunk.stage_channels[:4]

    def build(self, input_shape):
        self.trunk.build(input_shape)
        self.reduce.build(channels_shape(self.trunk.stage_channels[-1]))
        self.aspp.build(channels_shape(self.config["feature_channels"]))

    def call(self, x, training=None):
        stages = self.trunk(x, training=training)
        reduced = self.reduce(stages[-1], training=training)
        features, pooled = self.aspp(reduced, training=training)
        return {"features": features, "pooled": pooled, "skips": stages[:4]}

    def compute_output_spec(self, x):
        # Explicit spec (rather than tracing ``call``): symbolic-shape backends such as JAX cannot prove that the
        # strided main path and the strided shortcut of a block have equal sizes when spatial dims are unknown.
        batch, *spatial, _ = x.shape
        halve = lambda n: None if n is None else -(-n // 2)  # every strided op gives ceil(n / 2)
        size = [spatial[0], halve(spatial[1]), halve(spatial[2])]  # stem stride (1, 2, 2)
        skips = [keras.KerasTensor((batch, *size, self.skip_channels[0]), dtype=self.compute_dtype)]
        for stage, channels in enumerate(self.trunk.stage_channels[1:]):
            size = [halve(n) for n in size]  # max-pool before layer1, stride 2 in layers 2-4
            if stage < 3:
                skips.append(keras.KerasTensor((batch, *size, channels), dtype=self.compute_dtype))
        c = self.config["feature_channels"]
        return {"features": keras.KerasTensor((batch, *size, c), dtype=self.compute_dtype),
                "pooled": keras.KerasTensor((batch, c), dtype=self.compute_dtype),
                "skips": skips}

    def get_config(self):
        return {**super().get_config(), **self.config}
