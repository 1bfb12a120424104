"""Resampling helpers that are exact, backend-agnostic and XLA friendly."""
from __future__ import annotations

import keras
from keras import ops


def _take(x, axis, start, stop):
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def upsample_linear_x2(x, axis: int):
    """Doubles ``axis`` by linear interpolation with half-pixel centres and edge clamping.

    Equal to PyTorch ``interpolate(scale_factor=2, mode='(tri)linear', align_corners=False)`` and TF's
    half-pixel bilinear resize: ``out[2i] = .75 x[i] + .25 x[i-1]``, ``out[2i+1] = .75 x[i] + .25 x[i+1]``.
    """
    prev = ops.concatenate([_take(x, axis, 0, 1), _take(x, axis, 0, -1)], axis=axis)
    nxt = ops.concatenate([_take(x, axis, 1, None), _take(x, axis, -1, None)], axis=axis)
    even = 0.75 * x + 0.25 * prev
    odd = 0.75 * x + 0.25 * nxt
    out = ops.stack([even, odd], axis=axis + 1)
    shape = list(ops.shape(x))
    shape[axis] = shape[axis] * 2
    return ops.reshape(out, shape)


@keras.saving.register_keras_serializable(package="shaspec_tf")
class LinearUpsampling3D(keras.layers.Layer):
    """Linear upsampling of a ``[B, D, H, W, C]`` tensor by factors of 1 or 2 per spatial axis (the official head
    uses ``(1, 2, 2)``)."""

    def __init__(self, factors=(1, 2, 2), **kwargs):
        super().__init__(**kwargs)
        self.factors = tuple(int(f) for f in factors)
        if any(f not in (1, 2) for f in self.factors) or len(self.factors) != 3:
            raise ValueError(f"factors must be three values of 1 or 2, got {factors}")

    def call(self, x):
        for axis, factor in zip((1, 2, 3), self.factors):
            if factor == 2:
                x = upsample_linear_x2(x, axis)
        return x

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis, factor in zip((1, 2, 3), self.factors):
            if shape[axis] is not None:
                shape[axis] *= factor
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "factors": self.factors}
