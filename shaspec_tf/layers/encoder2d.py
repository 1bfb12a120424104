"""2D encoders for classification (AV-MNIST): per-modality stems and a convolutional trunk.

The paper's AV-MNIST model uses SMIL's small encoders and gives no way for one *shared* encoder to read both a
28x28 image and a 20x20 MFCC. Here each modality has a stem that maps it onto a common ``stem_size x stem_size x
filters`` grid; the shared trunk then serves every modality, and each specific encoder is its own stem + trunk.
"""
from __future__ import annotations

import keras

from shaspec_tf.layers.conv import WSConv2D


def _norm(groups, name):
    return keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, name=name)


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ModalityStem2D(keras.layers.Layer):
    """One valid convolution whose kernel maps ``input_size`` onto ``output_size`` (then a 2x max-pool when the
    input is large enough), normalisation and ReLU: ``[B, H, W, 1]`` -> ``[B, output_size, output_size, filters]``."""

    def __init__(self, input_size, output_size=12, filters=16, norm_groups=8, **kwargs):
        super().__init__(**kwargs)
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.filters, self.norm_groups = int(filters), int(norm_groups)
        self.pool = self.input_size >= 2 * self.output_size + 2
        conv_out = 2 * self.output_size if self.pool else self.output_size
        kernel = self.input_size - conv_out + 1
        if kernel < 1:
            raise ValueError(f"{self.name}: cannot map {input_size} onto {output_size}")
        self.conv = WSConv2D(self.filters, kernel, padding="valid", name="conv")
        self.norm = _norm(min(norm_groups, filters), "norm")
        self.act = keras.layers.ReLU(name="act")
        self.pooling = keras.layers.MaxPooling2D(2, name="pool") if self.pool else None

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.norm.build((None, None, None, self.filters))

    def call(self, x, training=None):
        x = self.conv(x)
        if self.pooling is not None:
            x = self.pooling(x)
        return self.act(self.norm(x, training=training))

    def get_config(self):
        return {**super().get_config(), "input_size": self.input_size, "output_size": self.output_size,
                "filters": self.filters, "norm_groups": self.norm_groups}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ConvTrunk2D(keras.layers.Layer):
    """``[B, S, S, C]`` -> feature vector ``[B, feature_dim]``: per stage 3x3 conv -> norm -> ReLU -> 2x max-pool,
    then flatten -> dense -> ReLU."""

    def __init__(self, filters=(32, 64), feature_dim=64, norm_groups=8, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.feature_dim, self.norm_groups = tuple(int(f) for f in filters), int(feature_dim), norm_groups
        self.convs = [WSConv2D(f, 3, padding="same", name=f"conv{i}") for i, f in enumerate(self.filters)]
        self.norms = [_norm(min(norm_groups, f), f"norm{i}") for i, f in enumerate(self.filters)]
        self.pools = [keras.layers.MaxPooling2D(2, name=f"pool{i}") for i in range(len(self.filters))]
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = keras.layers.Dense(self.feature_dim, activation="relu", name="dense")

    def build(self, input_shape):
        size = input_shape[1]
        channels = input_shape[-1]
        for conv, norm, f in zip(self.convs, self.norms, self.filters):
            conv.build((None, None, None, channels))
            norm.build((None, None, None, f))
            channels = f
            size = size // 2
        self.dense.build((None, size * size * channels))

    def call(self, x, training=None):
        for conv, norm, pool in zip(self.convs, self.norms, self.pools):
            x = pool(keras.activations.relu(norm(conv(x), training=training)))
        return self.dense(self.flatten(x))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "feature_dim": self.feature_dim,
                "norm_groups": self.norm_groups}
