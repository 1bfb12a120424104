"""Checks of the modality-presence mask and of input shapes that run before the graph (concrete values only)."""
from __future__ import annotations

import keras
import numpy as np


def concrete_value(x):
    """``x`` as a NumPy array when it holds values (eager tensor, NumPy), ``None`` when it is symbolic or traced
    (inside ``tf.function``, ``jax.jit`` or a functional-model build): those cases are checked by the data pipeline
    and the serving graph instead."""
    if isinstance(x, np.ndarray):
        return x
    if keras.utils.is_keras_tensor(x):
        return None
    try:
        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # symbolic tensors refuse conversion; that is the signal, not an error
        return None


def validate_modality_mask(mask, modalities) -> None:
    """Raise ``ValueError`` in one line if the mask has the wrong shape, values other than 0/1, or a sample with no
    modality present."""
    value = concrete_value(mask)
    if value is None:
        return
    names = "+".join(modalities)
    if value.ndim != 2 or value.shape[1] != len(modalities):
        raise ValueError(f"modality_mask must have shape [batch, {len(modalities)}] ({names}), got {value.shape}")
    if not np.all((value == 0) | (value == 1)):
        raise ValueError(f"modality_mask must hold only 0 and 1, got values {np.unique(value)[:8].tolist()}")
    empty = np.flatnonzero(value.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"modality_mask is all zero for sample(s) {empty.tolist()}: at least one of {names} "
                         f"must be present")


def validate_volume_shape(shape, num_modalities: int, divisor=(16, 32, 32)) -> None:
    """Static checks of a ``[B, D, H, W, M]`` image: rank, modality count, and spatial sizes divisible by the
    network's total stride (so that the decoder's skips line up)."""
    if len(shape) != 5:
        raise ValueError(f"image must be [batch, D, H, W, {num_modalities}], got rank {len(shape)} shape {shape}")
    if shape[-1] is not None and shape[-1] != num_modalities:
        raise ValueError(f"image must have {num_modalities} modality channels last, got shape {shape}")
    for axis, (size, div) in enumerate(zip(shape[1:4], divisor)):
        if size is not None and size % div:
            raise ValueError(f"image spatial size {tuple(shape[1:4])} must be divisible by {divisor} "
                             f"(axis {'DHW'[axis]} = {size}); crop or pad the volume, or use sliding-window inference")
    if all(size is not None for size in shape[1:4]):
        bottleneck = [size // div for size, div in zip(shape[1:4], divisor)]
        if bottleneck[0] * bottleneck[1] * bottleneck[2] == 1:
            raise ValueError(f"image spatial size {tuple(shape[1:4])} gives a 1x1x1 bottleneck, where instance "
                             f"normalisation outputs constants and the encoders cannot learn; use at least "
                             f"{(2 * divisor[0], divisor[1], divisor[2])}")
