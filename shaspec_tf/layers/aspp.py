"""Atrous spatial pyramid pooling (3D), as in the official ShaSpec encoder."""
from __future__ import annotations

import keras
from keras import ops

from shaspec_tf.layers.resnet import ConvNormAct, channels_shape


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ASPP3D(keras.layers.Layer):
    """Five parallel branches (1x1; 3x3x3 at dilation rates 2, 4, 8; image pooling), concatenated, then 1x1.

    Returns ``(features, pooled)`` where ``pooled`` is the spatial mean of the *input* ``[B, C]`` (the official
    ``global_f``, which feeds the domain classifier).

    ``image_pool_norm``: the official model normalises the image-pooling branch, a 1x1x1 tensor. Instance norm then
    returns its offset whatever the input, so the branch is a learned constant and its convolution gets no
    gradient. ``False`` (default) drops that norm so the branch carries global context; ``True`` reproduces the
    official model (``official_parity``).
    """

    def __init__(self, filters=256, rates=(2, 4, 8), norm="instance", activation="leaky_relu", weight_std=True,
                 symmetric_padding=False, image_pool_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(filters=int(filters), rates=tuple(int(r) for r in rates), norm=norm, activation=activation,
                           weight_std=weight_std, symmetric_padding=symmetric_padding,
                           image_pool_norm=bool(image_pool_norm))
        common = dict(norm=norm, activation=activation, weight_std=weight_std, symmetric_padding=symmetric_padding)
        self.branches = [ConvNormAct(filters, 1, name="branch1", **common)]
        self.branches += [ConvNormAct(filters, 3, dilation_rate=r, name=f"branch{i + 2}", **common)
                          for i, r in enumerate(self.config["rates"])]
        self.image_pool = ConvNormAct(filters, 1, name="image_pool",
                                      **dict(common, norm=norm if image_pool_norm else "none"))
        self.project = ConvNormAct(filters, 1, name="project", **common)

    def build(self, input_shape):
        for branch in self.branches:
            branch.build(input_shape)
        self.image_pool.build(input_shape)
        self.project.build(channels_shape(self.config["filters"] * (len(self.branches) + 1)))

    def call(self, x, training=None):
        outputs = [branch(x, training=training) for branch in self.branches]
        pooled = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        image = self.image_pool(pooled, training=training)
        outputs.append(image + ops.zeros_like(outputs[0]))  # broadcast the 1x1x1 branch over the volume
        features = self.project(ops.concatenate(outputs, axis=-1), training=training)
        return features, ops.reshape(pooled, (-1, x.shape[-1]))

    def get_config(self):
        return {**super().get_config(), **self.config}
