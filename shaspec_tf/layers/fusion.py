"""The ShaSpec-specific layers: residual fusion, missing-feature generation, domain classifier, and the helpers that
move the modality axis in and out of the batch.

Every layer takes the per-sample modality-presence mask ``[B, M]`` as a tensor and never branches Python code on
its values, so one graph serves every subset of modalities (and compiles with XLA).
"""
from __future__ import annotations

import keras
from keras import ops

from shaspec_tf.layers.conv import Conv3DUnit

MISSING_RULES = ("mean", "first")


def _expand_mask(mask, like, dtype):
    """``[B, M]`` -> ``[B, M, 1, ..., 1]`` broadcastable against ``like`` (``[B, M, ...]``)."""
    mask = ops.cast(mask, dtype)
    return ops.reshape(mask, tuple(ops.shape(mask)) + (1,) * (len(like.shape) - 2))


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ResidualFusion(keras.layers.Layer):
    """``f = r + proj(concat[r, s])`` (paper Eq. 2), one projection shared by all modalities.

    ``rank=3`` (default): a bias-free 3D convolution, ``kernel_size=3`` as the official code or ``1`` for the
    paper's "linear" projection. ``rank=0``: a dense projection for feature vectors (classification).

    ``init`` chooses the volume projection:

    * ``"glorot_uniform"`` (default), or any Keras initializer name: a plain convolution initialised so. Glorot
      keeps ``proj(concat[r, s])`` at about the scale of ``r``; ``"zeros"`` starts from ``f = r`` exactly (a
      zero-initialised residual branch), which leaves the specific encoders without a task gradient at the first
      step and slower to start.
    * ``"standardised"`` (the official code, needed to load its weights): a weight-standardised convolution. Its
      output has about ``sqrt(k^3 * 2C)`` times the scale of ``r`` (33x for ``small``, 117x for ``paper``), which
      drowns the shared feature and, in the decoder, the skip connections until training has shrunk it.
    """

    def __init__(self, rank=3, kernel_size=3, init="glorot_uniform", symmetric_padding=False, **kwargs):
        super().__init__(**kwargs)
        if rank not in (0, 3):
            raise ValueError(f"ResidualFusion supports rank 3 (volumes) or 0 (vectors), got {rank}")
        if init != "standardised":
            try:
                keras.initializers.get(init)
            except ValueError:
                raise ValueError(f"unknown fusion init {init!r}: expected 'standardised' or a Keras initializer "
                                 f"name such as 'zeros'") from None
        self.rank, self.kernel_size, self.init = int(rank), int(kernel_size), init
        self.symmetric_padding = bool(symmetric_padding)
        self.proj = None

    def build(self, r_shape, s_shape):
        channels = r_shape[-1]
        if channels is None:
            raise ValueError(f"{self.name}: the channel axis must be known, got {r_shape}")
        if self.rank == 3:
            standardised = self.init == "standardised"
            self.proj = Conv3DUnit(channels, self.kernel_size, weight_std=standardised,
                                   symmetric_padding=self.symmetric_padding,
                                   kernel_initializer="glorot_uniform" if standardised else self.init, name="proj")
        else:
            self.proj = keras.layers.Dense(channels, name="proj")
        self.proj.build(tuple(r_shape[:-1]) + (channels + s_shape[-1],))

    def call(self, r, s):
        return r + self.proj(ops.concatenate([r, s], axis=-1))

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "kernel_size": self.kernel_size, "init": self.init,
                "symmetric_padding": self.symmetric_padding}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class MissingFeatureGenerator(keras.layers.Layer):
    """Features for absent modalities, generated from the shared features of the present ones.

    ``call(shared, mask, fused=None)`` with ``shared`` ``[B, M, ...]`` and ``mask`` ``[B, M]``:

    * ``rule='mean'`` (paper Eq. 4): the mean of the present modalities' shared features;
    * ``rule='first'`` (official code): the shared feature of the first present modality.

    Without ``fused`` it returns the generated feature ``[B, ...]``; with ``fused`` ``[B, M, ...]`` it returns
    ``fused`` with every absent slot replaced by the generated feature. A sample with no modality present gets NaN
    so that it can never pass for a valid prediction; the models validate masks before that.
    """

    def __init__(self, rule="mean", **kwargs):
        super().__init__(**kwargs)
        if rule not in MISSING_RULES:
            raise ValueError(f"unknown missing-feature rule {rule!r}: expected one of {MISSING_RULES}")
        self.rule = rule

    def call(self, shared, mask, fused=None):
        m = _expand_mask(mask, shared, shared.dtype)
        present = m > 0
        if self.rule == "first":
            weights = ops.where(ops.cumsum(m, axis=1) == 1, m, ops.zeros_like(m))
        else:
            weights = m / ops.sum(m, axis=1, keepdims=True)  # 0/0 = NaN for an all-absent sample, by design
        generated = ops.sum(ops.where(present, shared, ops.zeros_like(shared)) * weights, axis=1)
        # A sample with no modality present yields NaN under either rule, never a plausible-looking feature.
        none_present = ops.sum(m, axis=1) <= 0
        generated = ops.where(none_present, ops.full_like(generated, float("nan")), generated)
        if fused is None:
            return generated
        return ops.where(present, fused, ops.expand_dims(generated, 1))

    def get_config(self):
        return {**super().get_config(), "rule": self.rule}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class DomainClassifier(keras.layers.Layer):
    """Predicts which modality a specific feature came from (paper Eq. 5): ``[B, M, C]`` -> logits ``[B, M, M]``."""

    def __init__(self, num_modalities, **kwargs):
        super().__init__(**kwargs)
        self.num_modalities = int(num_modalities)
        self.dense = keras.layers.Dense(self.num_modalities, name="dense")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "num_modalities": self.num_modalities}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class MaskModalities(keras.layers.Layer):
    """Zeros the absent modalities' entries of ``x`` along its modality ``axis``, given ``mask`` ``[B, M]``:
    ``axis=-1`` (default) for channels-last inputs ``[B, ..., M]``, ``axis=1`` for per-modality tensors
    ``[B, M, ...]`` (the segmenter's skip maps). ``absent="detached"`` keeps their values instead and only stops
    their gradient.

    Uses ``where`` rather than a product, so that nothing flows back into what computed an absent entry and, with
    ``absent="zeros"``, NaN or Inf in an absent modality's tensor cannot leak through.
    """

    def __init__(self, axis=-1, absent="zeros", **kwargs):
        super().__init__(**kwargs)
        if axis not in (1, -1):
            raise ValueError(f"MaskModalities masks the modality axis 1 or -1, got axis={axis!r}")
        if absent not in ("zeros", "detached"):
            raise ValueError(f"MaskModalities: absent must be 'zeros' or 'detached', got {absent!r}")
        self.axis, self.absent = int(axis), absent

    def call(self, x, mask):
        if self.axis == 1:
            m = _expand_mask(mask, x, x.dtype)
        else:
            m = ops.reshape(ops.cast(mask, x.dtype), (-1,) + (1,) * (len(x.shape) - 2) + (x.shape[-1],))
        return ops.where(m > 0, x, ops.zeros_like(x) if self.absent == "zeros" else ops.stop_gradient(x))

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "absent": self.absent}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class FoldModalities(keras.layers.Layer):
    """``[B, *spatial, M]`` -> ``[B * M, *spatial, 1]``, row ``b * M + m`` (one batched pass of the shared encoder)."""

    def call(self, x):
        rank = len(x.shape)
        moved = ops.transpose(x, (0, rank - 1) + tuple(range(1, rank - 1)))
        shape = ops.shape(moved)
        return ops.reshape(moved, (-1,) + tuple(shape[2:]) + (1,))

    def compute_output_shape(self, input_shape):
        batch, *spatial, m = input_shape
        return (None if batch is None or m is None else batch * m, *spatial, 1)


@keras.saving.register_keras_serializable(package="shaspec_tf")
class UnfoldModalities(keras.layers.Layer):
    """Inverse of :class:`FoldModalities`: ``[B * M, ...]`` -> ``[B, M, ...]``."""

    def __init__(self, num_modalities, **kwargs):
        super().__init__(**kwargs)
        self.num_modalities = int(num_modalities)

    def call(self, x):
        return ops.reshape(x, (-1, self.num_modalities) + tuple(ops.shape(x))[1:])

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] // self.num_modalities
        return (batch, self.num_modalities, *input_shape[1:])

    def get_config(self):
        return {**super().get_config(), "num_modalities": self.num_modalities}


@keras.saving.register_keras_serializable(package="shaspec_tf")
class MergeModalityBatch(keras.layers.Layer):
    """``[B, M, ...]`` -> ``[B * M, ...]`` (row ``b * M + m``), to run one layer over every modality at once."""

    def call(self, x):
        return ops.reshape(x, (-1,) + tuple(ops.shape(x))[2:])

    def compute_output_shape(self, input_shape):
        batch, m, *rest = input_shape
        return (None if batch is None or m is None else batch * m, *rest)


@keras.saving.register_keras_serializable(package="shaspec_tf")
class StackModalities(keras.layers.Layer):
    """A list of ``M`` tensors ``[B, ...]`` -> ``[B, M, ...]``."""

    def call(self, tensors):
        return ops.stack(list(tensors), axis=1)

    def compute_output_shape(self, input_shape):
        first = tuple(input_shape[0])
        return (first[0], len(input_shape), *first[1:])


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ModalitiesToChannels(keras.layers.Layer):
    """``[B, M, *spatial, C]`` -> ``[B, *spatial, M * C]``, channel ``m * C + c`` (modality-major: the official
    layout of the concatenated fused features and skips)."""

    def call(self, x):
        rank = len(x.shape)
        moved = ops.transpose(x, (0,) + tuple(range(2, rank - 1)) + (1, rank - 1))
        shape = tuple(ops.shape(moved))
        return ops.reshape(moved, shape[:-2] + (x.shape[1] * x.shape[-1],))

    def compute_output_shape(self, input_shape):
        batch, m, *spatial, c = input_shape
        return (batch, *spatial, None if m is None or c is None else m * c)
