"""Convolutions: weight standardisation and PyTorch-style symmetric padding.

Backend-agnostic (``keras`` + ``keras.ops`` only).
"""
from __future__ import annotations

import keras
from keras import ops

WS_EPSILON = 1e-12


def standardize_kernel(kernel, epsilon: float = WS_EPSILON):
    """Standardise a convolution kernel per output filter.

    The kernel layout is Keras' ``(*spatial, in, out)``. Mean and *unbiased* variance are taken over every axis but
    the last, as the official ShaSpec ``Conv3d_wd`` does over ``(in, kd, kh, kw)``:
    ``w <- (w - mean) / sqrt(var_unbiased + epsilon)``.
    """
    axes = tuple(range(len(kernel.shape) - 1))
    fan = 1
    for size in kernel.shape[:-1]:
        fan *= int(size)
    centred = kernel - ops.mean(kernel, axis=axes, keepdims=True)
    var = ops.sum(ops.square(centred), axis=axes, keepdims=True) / max(fan - 1, 1)
    return centred / ops.sqrt(var + epsilon)


class _WeightStandardised:
    """Mixin for a Keras convolution: standardise the kernel at every call (Qiao et al. 2019; the official
    ``Conv3d_wd``). Bias-free by default, as the official convolutions."""

    def __init__(self, *args, ws_epsilon: float = WS_EPSILON, **kwargs):
        kwargs.setdefault("use_bias", False)
        super().__init__(*args, **kwargs)
        self.ws_epsilon = ws_epsilon

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, standardize_kernel(kernel, self.ws_epsilon))

    def get_config(self):
        return {**super().get_config(), "ws_epsilon": self.ws_epsilon}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class WSConv3D(_WeightStandardised, keras.layers.Conv3D):
    """Weight-standardised ``Conv3D``."""


@keras.saving.register_keras_serializable(package="shaspec_tf")
class WSConv2D(_WeightStandardised, keras.layers.Conv2D):
    """Weight-standardised ``Conv2D`` (the 2D twin of :class:`WSConv3D`)."""


def _triple(value):
    if isinstance(value, int):
        return (value, value, value)
    return tuple(int(v) for v in value)


@keras.saving.register_keras_serializable(package="shaspec_tf")
class SymmetricPadding3D(keras.layers.Layer):
    """Pads ``(D, H, W)`` of a channels-last tensor by the same amount on both sides, as PyTorch's ``padding=p``.

    ``constant`` is the fill value (``-inf`` reproduces PyTorch's max-pool padding).
    """

    def __init__(self, padding, constant: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.padding = _triple(padding)
        self.constant = float(constant)

    def call(self, x):
        pad = [(0, 0)] + [(p, p) for p in self.padding] + [(0, 0)]
        return ops.pad(x, pad, constant_values=self.constant)

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis, p in zip((1, 2, 3), self.padding):
            if shape[axis] is not None:
                shape[axis] += 2 * p
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "constant": self.constant}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class Conv3DUnit(keras.layers.Layer):
    """One 3D convolution with the project's conventions.

    * ``weight_std``: standardise the kernel (official ``Conv3d_wd``) or use a plain ``Conv3D``.
    * ``symmetric_padding``: pad ``dilation * (k - 1) // 2`` on each side and convolve ``valid`` (PyTorch
      semantics, needed to load official weights exactly); otherwise Keras ``same`` padding, which pads one voxel
      more at the end than at the start for even inputs with stride 2.
    """

    def __init__(self, filters: int, kernel_size=3, strides=1, dilation_rate=1, weight_std: bool = True,
                 symmetric_padding: bool = False, use_bias: bool = False, kernel_initializer="he_normal_fan_out",
                 **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = _triple(kernel_size)
        self.strides = _triple(strides)
        self.dilation_rate = _triple(dilation_rate)
        self.weight_std = bool(weight_std)
        self.symmetric_padding = bool(symmetric_padding)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = kernel_initializer
        init = (keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")
                if kernel_initializer == "he_normal_fan_out" else kernel_initializer)
        pads = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation_rate))
        self.pad = SymmetricPadding3D(pads, name="pad") if symmetric_padding and any(pads) else None
        conv_cls = WSConv3D if weight_std else keras.layers.Conv3D
        self.conv = conv_cls(self.filters, self.kernel_size, strides=self.strides, dilation_rate=self.dilation_rate,
                             padding="valid" if symmetric_padding else "same", use_bias=self.use_bias,
                             kernel_initializer=init, name="conv")

    def build(self, input_shape):
        shape = self.pad.compute_output_shape(input_shape) if self.pad is not None else input_shape
        self.conv.build(shape)

    def call(self, x):
        if self.pad is not None:
            x = self.pad(x)
        return self.conv(x)

    def compute_output_shape(self, input_shape):
        shape = self.pad.compute_output_shape(input_shape) if self.pad is not None else input_shape
        return self.conv.compute_output_shape(shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "dilation_rate": self.dilation_rate, "weight_std": self.weight_std,
                "symmetric_padding": self.symmetric_padding, "use_bias": self.use_bias,
                "kernel_initializer": self.kernel_initializer}
