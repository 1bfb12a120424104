"""Normalisation and activation.

``InstanceNormalization`` normalises each sample and channel over the spatial axes. It works at batch 1 and on
1x1x1 tensors (where it returns its offset ``beta``, as PyTorch's ``InstanceNorm3d`` does once its batch-size check
is removed), with nothing patched.
"""
from __future__ import annotations

import keras
from keras import ops

LEAKY_SLOPE = 0.01


@keras.saving.register_keras_serializable(package="shaspec_tf")
class InstanceNormalization(keras.layers.Layer):
    """Per-sample, per-channel normalisation over all spatial axes of a channels-last tensor, with affine
    ``gamma``/``beta`` (PyTorch ``InstanceNorm{2,3}d(affine=True)``: biased variance, eps 1e-5).

    Statistics are computed in float32 (or float64 for float64 inputs) even under a mixed-precision policy.
    """

    def __init__(self, epsilon: float = 1e-5, center: bool = True, scale: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.supports_masking = True

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel axis (last) must be known, got shape {input_shape}")
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones") if self.scale else None
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros") if self.center else None

    def call(self, x):
        dtype = x.dtype
        stats_dtype = "float64" if dtype == "float64" else "float32"
        xs = ops.cast(x, stats_dtype)
        rank = len(x.shape)
        axes = tuple(range(1, rank - 1))
        # Shifted moments: subtract each map's first voxel before reducing. The result is the same, but rounding is
        # relative to the spread of the map instead of its mean, and a spatially constant map (an absent modality's
        # zero input, a 1x1x1 tensor) gives exactly zero variance and output ``beta``, as in exact arithmetic.
        first = ops.stop_gradient(xs[(slice(None),) + (slice(0, 1),) * (rank - 2)])
        centred = xs - first
        mean, var = ops.moments(centred, axes=axes, keepdims=True)
        inv = ops.rsqrt(var + self.epsilon)
        if self.gamma is not None:
            inv = inv * ops.cast(self.gamma, stats_dtype)
        out = (centred - mean) * inv
        if self.beta is not None:
            out = out + ops.cast(self.beta, stats_dtype)
        return ops.cast(out, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "center": self.center, "scale": self.scale}


def make_norm(kind: str, name: str):
    """Norm factory: ``instance`` (default, the official ``IN``), ``group`` (16 groups, the official ``GN``),
    ``batch``, or ``none``."""
    if kind == "instance":
        return InstanceNormalization(name=name)
    if kind == "group":
        return keras.layers.GroupNormalization(groups=16, epsilon=1e-5, name=name)
    if kind == "batch":
        return keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=name)
    if kind == "none":
        return keras.layers.Identity(name=name)
    raise ValueError(f"unknown norm {kind!r}: expected one of instance, group, batch, none")


def make_activation(kind: str, name: str):
    """Activation factory: ``leaky_relu`` (slope 0.01, the official default) or ``relu``."""
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    raise ValueError(f"unknown activation {kind!r}: expected leaky_relu or relu")
