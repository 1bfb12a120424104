"""The ShaSpec 3D decoder: per stage a transposed convolution, a projected skip and a residual block."""
from __future__ import annotations

import keras

from shaspec_tf.layers.resample import LinearUpsampling3D
from shaspec_tf.layers.resnet import ConvNormAct, ResidualBlock3D, channels_shape


@keras.saving.register_keras_serializable(package="shaspec_tf")
class Decoder3D(keras.layers.Layer):
    """``call(x, skips)`` with ``skips = [stem, layer1, layer2, layer3]`` (deepest last).

    Stage k (deepest first): ``x = ConvTranspose(k2, s2)(x) + ConvNormAct1x1(skip_k)``, then a basic residual block.
    The head is a plain 1x1x1 convolution to ``num_classes`` logits followed by a linear upsampling by
    ``final_upsample`` (the stem's stride, (1, 2, 2)). Transposed convolutions and the head have no weight
    standardisation and no bias, as in the official decoder.
    """

    def __init__(self, filters=(256, 128, 64, 32), num_classes=3, final_upsample=(1, 2, 2), norm="instance",
                 activation="leaky_relu", weight_std=True, symmetric_padding=False, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(filters=tuple(int(f) for f in filters), num_classes=int(num_classes),
                           final_upsample=tuple(final_upsample), norm=norm, activation=activation,
                           weight_std=weight_std, symmetric_padding=symmetric_padding)
        common = dict(norm=norm, activation=activation, weight_std=weight_std, symmetric_padding=symmetric_padding)
        init = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")
        self.ups, self.skip_projections, self.blocks = [], [], []
        for index, f in enumerate(self.config["filters"]):
            stage = len(self.config["filters"]) - 1 - index
            self.ups.append(keras.layers.Conv3DTranspose(f, 2, strides=2, use_bias=False, kernel_initializer=init,
                                                         name=f"up{stage}"))
            self.skip_projections.append(ConvNormAct(f, 1, name=f"skip{stage}", **common))
            self.blocks.append(ResidualBlock3D(f, "basic", name=f"block{stage}", **common))
        self.head = keras.layers.Conv3D(num_classes, 1, use_bias=False, kernel_initializer=init, name="head")
        self.upsample = LinearUpsampling3D(final_upsample, name="head_upsample")

    def build(self, x_shape, skips_shape):
        if len(skips_shape) != len(self.ups):
            raise ValueError(f"{self.name}: expected {len(self.ups)} skip tensors, got {len(skips_shape)}")
        channels = x_shape[-1]
        for up, proj, block, skip_shape, f in zip(self.ups, self.skip_projections, self.blocks,
                                                   reversed(skips_shape), self.config["filters"]):
            up.build(channels_shape(channels))
            proj.build(skip_shape)
            block.build(channels_shape(f))
            channels = f
        self.head.build(channels_shape(channels))

    def call(self, x, skips, training=None):
        for up, proj, block, skip in zip(self.ups, self.skip_projections, self.blocks, reversed(skips)):
            x = up(x) + proj(skip, training=training)
            x = block(x, training=training)
        return self.upsample(self.head(x))

    def compute_output_spec(self, x, skips):
        # Explicit spec: the output has the stem skip's spatial size times ``final_upsample`` (see Encoder3D).
        batch, *spatial, _ = skips[0].shape
        spatial = [None if n is None else n * f for n, f in zip(spatial, self.config["final_upsample"])]
        return keras.KerasTensor((batch, *spatial, self.config["num_classes"]), dtype=self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), **self.config}
