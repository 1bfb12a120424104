"""3D ResNet trunk (official ``Res50.py`` channel plan: layer4 has 320 planes; type-B shortcuts).

Blocks are built from channel counts alone, so every spatial size works (sliding-window tiles, whole volumes).
"""
from __future__ import annotations

import keras

from shaspec_tf.layers.conv import Conv3DUnit, SymmetricPadding3D
from shaspec_tf.layers.norm import make_activation, make_norm

# depth -> (block kind, blocks per stage)
RESNET_SETTINGS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def channels_shape(channels):
    """The build shape ``(None, None, None, None, channels)`` of a 3D layer that only needs its channel count
    (every batch and spatial size works)."""
    return (None, None, None, None, int(channels))


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ConvNormAct(keras.layers.Layer):
    """Convolution -> normalisation -> activation (``activation=None`` skips the activation)."""

    def __init__(self, filters, kernel_size=3, strides=1, dilation_rate=1, norm="instance",
                 activation="leaky_relu", weight_std=True, symmetric_padding=False, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(filters=int(filters), kernel_size=kernel_size, strides=strides, dilation_rate=dilation_rate,
                           norm=norm, activation=activation, weight_std=weight_std,
                           symmetric_padding=symmetric_padding)
        self.conv = Conv3DUnit(filters, kernel_size, strides=strides, dilation_rate=dilation_rate,
                               weight_std=weight_std, symmetric_padding=symmetric_padding, name="conv")
        self.norm = make_norm(norm, "norm")
        self.act = make_activation(activation, "act") if activation else None

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.norm.build(channels_shape(self.config["filters"]))

    def call(self, x, training=None):
        x = self.norm(self.conv(x), training=training)
        return self.act(x) if self.act is not None else x

    def get_config(self):
        return {**super().get_config(), **self.config}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ResidualBlock3D(keras.layers.Layer):
    """A ResNet block, ``kind='basic'`` (two 3x3x3 convs) or ``'bottleneck'`` (1x1, 3x3x3 with the stride, 1x1 x4).

    ``projection_shortcut`` adds the type-B shortcut (1x1 conv with the stride, then norm); the official trunk puts
    one in the first block of every stage.
    """

    def __init__(self, planes, kind="bottleneck", strides=1, projection_shortcut=False, norm="instance",
                 activation="leaky_relu", weight_std=True, symmetric_padding=False, **kwargs):
        super().__init__(**kwargs)
        if kind not in EXPANSION:
            raise ValueError(f"unknown block kind {kind!r}: expected basic or bottleneck")
        self.config = dict(planes=int(planes), kind=kind, strides=strides, projection_shortcut=projection_shortcut,
                           norm=norm, activation=activation, weight_std=weight_std,
                           symmetric_padding=symmetric_padding)
        common = dict(norm=norm, weight_std=weight_std, symmetric_padding=symmetric_padding)
        self.out_channels = int(planes) * EXPANSION[kind]
        if kind == "basic":
            self.units = [ConvNormAct(planes, 3, strides=strides, activation=activation, name="unit1", **common),
                          ConvNormAct(planes, 3, activation=None, name="unit2", **common)]
        else:
            self.units = [ConvNormAct(planes, 1, activation=activation, name="unit1", **common),
                          ConvNormAct(planes, 3, strides=strides, activation=activation, name="unit2", **common),
                          ConvNormAct(self.out_channels, 1, activation=None, name="unit3", **common)]
        self.shortcut = (ConvNormAct(self.out_channels, 1, strides=strides, activation=None, name="shortcut", **common)
                         if projection_shortcut else None)
        self.act = make_activation(activation, "act")

    def build(self, input_shape):
        shape = input_shape
        for unit in self.units:
            unit.build(shape)
            shape = channels_shape(unit.config["filters"])
        if self.shortcut is not None:
            self.shortcut.build(input_shape)
        elif input_shape[-1] != self.out_channels:
            raise ValueError(f"{self.name}: identity shortcut needs {self.out_channels} input channels, "
                             f"got {input_shape[-1]}; use projection_shortcut=True")

    def call(self, x, training=None):
        out = x
        for unit in self.units:
            out = unit(out, training=training)
        residual = self.shortcut(x, training=training) if self.shortcut is not None else x
        return self.act(out + residual)

    def get_config(self):
        return {**super().get_config(), **self.config}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ResNet3D(keras.layers.Layer):
    """3D ResNet trunk returning the five stage outputs ``[stem, layer1, layer2, layer3, layer4]``.

    Stem: 7x7x7 conv, stride (1, 2, 2) -> norm -> act; then a 3x3x3 max-pool with stride 2 before layer1.
    Depth 10/18/34 use basic blocks, 50 bottlenecks. ``planes`` defaults to the official plan (64, 128, 256, 320);
    ``blocks`` overrides the blocks per stage (small presets).
    """

    def __init__(self, depth=50, stem_filters=64, planes=(64, 128, 256, 320), blocks=None, norm="instance",
                 activation="leaky_relu", weight_std=True, symmetric_padding=False, **kwargs):
        super().__init__(**kwargs)
        if depth not in RESNET_SETTINGS:
            raise ValueError(f"unsupported ResNet depth {depth}: expected one of {sorted(RESNET_SETTINGS)}")
        kind, default_blocks = RESNET_SETTINGS[depth]
        blocks = tuple(blocks) if blocks is not None else default_blocks
        if len(planes) != 4 or len(blocks) != 4:
            raise ValueError(f"planes and blocks need 4 stages each, got planes={planes}, blocks={blocks}")
        self.config = dict(depth=depth, stem_filters=int(stem_filters), planes=tuple(int(p) for p in planes),
                           blocks=blocks, norm=norm, activation=activation, weight_std=weight_std,
                           symmetric_padding=symmetric_padding)
        common = dict(norm=norm, activation=activation, weight_std=weight_std, symmetric_padding=symmetric_padding)
        self.stem = ConvNormAct(stem_filters, 7, strides=(1, 2, 2), name="stem", **common)
        if symmetric_padding:
            self.pool_pad = SymmetricPadding3D(1, constant=float("-inf"), name="pool_pad")
            self.pool = keras.layers.MaxPooling3D(3, strides=2, padding="valid", name="pool")
        else:
            self.pool_pad = None
            self.pool = keras.layers.MaxPooling3D(3, strides=2, padding="same", name="pool")
        # One flat list (Keras' weight files track lists of layers, not lists of lists); ``stage_of`` maps blocks
        # to stages.
        self.blocks, self.stage_of = [], []
        for index, (p, n) in enumerate(zip(self.config["planes"], blocks)):
            stride = 1 if index == 0 else 2
            for b in range(n):
                self.blocks.append(ResidualBlock3D(p, kind, strides=stride if b == 0 else 1,
                                                   projection_shortcut=(b == 0), name=f"layer{index + 1}_block{b}",
                                                   **common))
                self.stage_of.append(index)
        self.stage_channels = (int(stem_filters),) + tuple(p * EXPANSION[kind] for p in self.config["planes"])

    def build(self, input_shape):
        self.stem.build(input_shape)
        channels = self.stage_channels[0]
        for block in self.blocks:
            block.build(channels_shape(channels))
            channels = block.out_channels

    def call(self, x, training=None):
        x = self.stem(x, training=training)
        outputs = [x]
        if self.pool_pad is not None:
            x = self.pool_pad(x)
        x = self.pool(x)
        for index, block in enumerate(self.blocks):
            x = block(x, training=training)
            if index + 1 == len(self.blocks) or self.stage_of[index + 1] != self.stage_of[index]:
                outputs.append(x)
        return outputs

    def get_config(self):
        return {**super().get_config(), **self.config}
