"""The sliding window, once: the official window-start rule, the Gaussian blending weights, and the blend itself in
``keras.ops`` so that it compiles together with the model (:mod:`shaspec_tf.inference.compiled` wraps it in
``jax.jit`` or ``tf.function``; :func:`shaspec_tf.export.make_serving_functions` puts it in the ``segment_volume``
signature).

The rule and the weights are written once for both sides of the host/device line: called with Python ints (or
NumPy) they give the host values of :func:`window_starts` and :func:`gaussian_importance_map`; called with
``keras.ops`` on (possibly symbolic) tensors they are the graph's. ``import shaspec_tf.inference`` does not import
Keras: the keras-side functions import it when called.

The blend is backend-free ``keras.ops`` except for two choices: how a window is added into the accumulator
(:func:`_add_window`: an in-place ``slice_update`` under JAX, a padded add of core ops under TensorFlow, so that the
exported ``segment_volume`` graph holds no XLA op), and how the loop over batches of windows runs
(:func:`_sequential`: a plain XLA loop under JAX, a ``while_loop`` whose iterations wait for each other under
TensorFlow). The volume may arrive zero-padded beyond its true ``size`` (a runtime input): the windows are still
those of ``size``, so one compiled shape serves many volume sizes (see
:func:`shaspec_tf.inference.compiled.compile_extent`).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

__all__ = ["ROI_DIVISOR", "FLIPS", "window_grid", "window_starts", "gaussian_weights", "gaussian_importance_map",
           "sigma_scales", "window_probabilities"]

# The segmenter's total stride along D, H, W: window sizes must be multiples of it (see models/masks.py).
ROI_DIVISOR = (16, 32, 32)
_IMPORTANCE_FLOOR = 1e-3  # MONAI's lower clamp of the Gaussian importance map
# The 8 test-time flips (axes of D, H, W flipped), no flip first; as 0/1 rows for window_probabilities' ``flips``.
FLIPS = tuple(axes for n in range(4) for axes in itertools.combinations(range(3), n))


def flip_rows(axes_list) -> np.ndarray:
    return np.array([[int(a in axes) for a in range(3)] for axes in axes_list], dtype=np.int32)


# ----------------------------------------------------------------------------------------------------------------
# The window-start rule
# ----------------------------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer))


def _minimum(a, b):
    if _is_int(a) and _is_int(b):
        return min(int(a), int(b))
    import keras

    return keras.ops.minimum(a, b)


def _maximum(a, b):
    if _is_int(a) and _is_int(b):
        return max(int(a), int(b))
    import keras

    return keras.ops.maximum(a, b)


def window_grid(size, roi: int, overlap: float):
    """The official ``predict_sliding`` rule along one axis: ``(padded, count, start)``.

    ``size`` is a Python int or an integer scalar tensor (the dynamic size of a ``tf.function`` input; the
    arithmetic then runs in ``keras.ops``). ``roi`` and ``overlap`` are static. An axis shorter than the window is
    padded (after its end) to ``padded = max(size, roi)``. The stride is ``ceil(roi * (1 - overlap))`` (rounded
    to 9 decimals first, so that e.g. 48 * (1 - 1/3) = 32.000000000000004 gives 32, not 33), there are
    ``count = ceil((padded - roi) / stride) + 1`` windows, and window ``i`` starts at
    ``start(i) = min(i * stride, padded - roi)``: the last one is moved back to end flush with the axis, so no
    window leaves the (padded) volume and every index is covered. The starts are distinct and increasing.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(1, math.ceil(round(roi * (1.0 - overlap), 9)))
    padded = _maximum(size, roi)
    last = padded - roi
    count = (last + stride - 1) // stride + 1
    return padded, count, lambda i: _minimum(i * stride, last)


def window_starts(size: int, roi: int, overlap: float = 1 / 3) -> tuple:
    """Start indices of the windows of length ``roi`` that cover an axis of length ``size`` (:func:`window_grid`).

    An axis shorter than (or equal to) the window gives the single start 0: the sliding window pads such an axis
    with zeros up to ``roi``.

    >>> window_starts(155, 80), window_starts(240, 160)
    ((0, 54, 75), (0, 80))
    """
    size, roi = int(size), int(roi)
    if size < 1 or roi < 1:
        raise ValueError(f"window_starts needs size >= 1 and roi >= 1, got size={size} roi={roi}")
    _, count, start = window_grid(size, roi, overlap)
    return tuple(start(i) for i in range(count))


# ----------------------------------------------------------------------------------------------------------------
# Blending weights
# ----------------------------------------------------------------------------------------------------------------
def sigma_scales(sigma_scale, ndim: int = 3) -> tuple:
    """``sigma_scale`` (one number, or one per axis) as a tuple of ``ndim`` positive floats."""
    scales = np.broadcast_to(np.asarray(sigma_scale, dtype=np.float64), (ndim,))
    if np.any(scales <= 0) or not np.all(np.isfinite(scales)):
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return tuple(float(s) for s in scales)


def gaussian_weights(roi_size: Sequence[int], sigma_scale, xp=np, dtype="float64"):
    """The blending weights of one window, in the array namespace ``xp`` (``numpy`` or ``keras.ops``).

    A separable Gaussian centred on the window's centre ``(roi - 1) / 2`` (so it is symmetric under flips), with
    ``sigma = sigma_scale * roi`` per axis, scaled to a maximum of 1 and clipped from below at 1e-3 so that every
    voxel keeps a positive weight (as MONAI's ``compute_importance_map``).
    """
    roi_size = tuple(int(r) for r in roi_size)
    if len(roi_size) != 3:
        raise ValueError(f"roi_size must be three integers (D, H, W), got {roi_size}")
    profiles = []
    for roi, scale in zip(roi_size, sigma_scales(sigma_scale, 3)):
        x = xp.arange(roi, dtype=dtype) - (roi - 1) / 2.0
        profiles.append(xp.exp(-0.5 * (x / (scale * roi)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights = weights / xp.max(weights)
    return xp.maximum(weights, _IMPORTANCE_FLOOR)


def gaussian_importance_map(roi_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """:func:`gaussian_weights` on the host: float32 NumPy of shape ``roi_size`` (computed in float64)."""
    return gaussian_weights(roi_size, sigma_scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The blend, in keras.ops
# ----------------------------------------------------------------------------------------------------------------
_TINY = 1e-20  # the weight total's floor: voxels no window covers (padding of a larger extent) come out as 0


def _flip(x, flags, size=None):
    """``x`` flipped along each of its first three axes whose entry of ``flags`` (int [3], runtime) is 1.

    With ``size`` (the extent [3] of the data inside ``x``, zero-padded after its end), the flip is within
    ``[0, size)``: a flip of the whole axis, then a roll by ``size - extent``, so that the data are reversed in
    place and the padding stays after them. Flipping twice is the identity on ``[0, size)``.
    """
    import keras

    ops = keras.ops
    for axis in range(3):
        def flipped(x=x, axis=axis):
            y = ops.flip(x, axis=axis)
            return y if size is None else ops.roll(y, size[axis] - ops.shape(x)[axis], axis=axis)

        x = ops.cond(flags[axis] > 0, flipped, lambda x=x: x)
    return x


def _add_window(accum, corner, update, padded):
    """``accum[d:d+rd, h:h+rh, w:w+rw] += update`` at a runtime ``corner`` (d, h, w).

    Under JAX a read-add-write with ``keras.ops.slice`` / ``slice_update`` (``dynamic_update_slice``, in place in
    the compiled loop). Under TensorFlow ``slice_update`` is the XLA op ``XlaDynamicUpdateSlice``, which TensorFlow
    runs only by compiling it with XLA on demand and which a stock TF Serving binary cannot run (no XLA GPU
    compiler; XLA CPU only behind a flag), so the ``segment_volume`` signature must not hold it: there the window
    is padded to the accumulator's size and added (core ``Pad`` and ``AddV2``; one pass over the accumulator per
    window). JAX cannot do that one: its padding widths must be static.
    """
    import keras

    ops = keras.ops
    shape = ops.shape(update)
    if keras.backend.backend() == "jax":
        start = list(corner) + [0]
        return ops.slice_update(accum, start, ops.slice(accum, start, shape) + update)
    pads = [[c, p - c - r] for c, p, r in zip(corner, padded, shape[:3])] + [[0, 0]]
    return accum + ops.pad(update, pads)


def _sequential(count, body, state):
    """``state`` after ``state = body(i, state)`` for ``i`` in ``range(count)``, one iteration after the other.

    JAX: ``fori_loop`` when ``count`` is a Python int (a static trip count: XLA needs no host round trip per
    iteration to test the condition), else ``while_loop``. TensorFlow: ``while_loop`` whose condition reads the
    state, so that each iteration waits for the previous one (``tf.while_loop`` otherwise runs up to 10 at once,
    each holding a batch of tile activations); the state's first value is never -1 (weights and probabilities are
    not negative).
    """
    import keras

    ops = keras.ops
    if keras.backend.backend() == "jax":
        if _is_int(count):
            return ops.fori_loop(0, int(count), body, state)
        return ops.while_loop(lambda i, s: i < count, lambda i, s: (i + 1, body(i, s)), (0, state))[1]

    def more(i, s):
        probe = ops.reshape(ops.slice(s, [0] * len(s.shape), [1] * len(s.shape)), ())
        return ops.logical_and(i < count, ops.not_equal(probe, -1.0))

    return ops.while_loop(more, lambda i, s: (i + 1, body(i, s)), (0, state))[1]


def _blend(logits_fn, volume, mask, weights, roi, overlap, sw_batch_size: int, num_classes: int, size=None):
    """Probabilities ``[*extent, C]`` of one volume ``[*extent, M]``: every window through ``logits_fn``,
    ``sw_batch_size`` windows per call, a sigmoid per window, weighted average of the overlaps. The windows are
    those of ``size`` (the data's extent inside a zero-padded ``volume``; default: the volume's own shape)."""
    import keras

    ops = keras.ops
    shape = ops.shape(volume)
    extent, m = list(shape[:3]), shape[3]
    data = extent if size is None else [size[i] for i in range(3)]
    grids = [window_grid(s, r, overlap) for s, r in zip(data, roi)]
    counts = [g[1] for g in grids]
    # The accumulator covers the volume and at least one window along each axis (zeros after a short axis' end).
    padded = [_maximum(e, r) for e, r in zip(extent, roi)]
    if not all(_is_int(p) and _is_int(e) and p == e for p, e in zip(padded, extent)):
        volume = ops.pad(volume, [[0, p - e] for p, e in zip(padded, extent)] + [[0, 0]])
    tiles = counts[0] * counts[1] * counts[2]
    batch = min(sw_batch_size, tiles) if _is_int(tiles) else sw_batch_size
    batches = (tiles + batch - 1) // batch
    masks = ops.broadcast_to(mask[None], (batch, m))
    weights = ops.expand_dims(weights, -1)

    def corner(k):
        """The window start [d, h, w] of tile k (itertools.product order: W fastest)."""
        index = (k // (counts[1] * counts[2]), (k // counts[2]) % counts[1], k % counts[2])
        return [grid[2](i) for grid, i in zip(grids, index)]

    def body(b, accum):
        # The last batch may run past the last tile: those slots repeat the last tile with weight 0.
        ks = [b * batch + j for j in range(batch)]
        corners = [corner(ops.minimum(k, tiles - 1)) for k in ks]
        x = ops.stack([ops.slice(volume, c + [0], list(roi) + [m]) for c in corners])
        prob = ops.sigmoid(ops.cast(logits_fn(x, masks), "float32"))
        for j, (k, c) in enumerate(zip(ks, corners)):
            w = weights * ops.cast(k < tiles, "float32")
            accum = _add_window(accum, c, ops.concatenate([prob[j] * w, w], axis=-1), padded)
        return accum

    accum = ops.zeros(list(padded) + [num_classes + 1], "float32")  # weighted probabilities + total weight
    accum = _sequential(batches, body, accum)
    prob = accum[..., :num_classes] / ops.maximum(accum[..., num_classes:], _TINY)
    return ops.slice(prob, [0, 0, 0, 0], extent + [num_classes])


def window_probabilities(logits_fn, image, mask, flips=None, *, roi_size, num_classes: int, overlap: float = 1 / 3,
                         mode: str = "gaussian", sigma_scale=0.125, sw_batch_size: int = 4, size=None):
    """Sliding-window region probabilities ``float32 [D, H, W, C]`` of one volume, in ``keras.ops``: zero padding
    of short axes, the tiles gathered ``sw_batch_size`` at a time, the model's logits, a sigmoid per tile, the
    weighted blend and the crop all run in the caller's compiled function; nothing leaves it but the result.

    Meant to run inside a compiled function (:func:`shaspec_tf.inference.compiled.volume_function`, the
    ``segment_volume`` signature); D, H, W may be dynamic (a ``tf.function`` input of shape ``[None, None, None,
    M]``). Arguments are not validated here (see :func:`shaspec_tf.inference.sliding_window_predict`).

    Args:
        logits_fn: ``(tiles [B, *roi_size, M], masks [B, M]) -> logits [B, *roi_size, C]``; the model's
            ``"logits"`` output only, so nothing else leaves it.
        image: ``[D, H, W, M]``; mask: ``[M]`` of 0/1 (a runtime input: any mask, one compiled function).
        flips: ``None`` (no test-time augmentation: no flip in the graph) or int ``[F, 3]`` of 0/1, one row per
            flip; the result is then the mean over the rows of the probabilities of the image flipped along the
            axes marked 1, flipped back.
        roi_size, num_classes, overlap, mode, sigma_scale, sw_batch_size: static; ``mode`` is ``"gaussian"``
            (:func:`gaussian_weights`) or ``"constant"`` (equal weights, the official ``predict_sliding``).
        size: ``None``, or the extent (int ``[3]``, may be a runtime tensor) of the data inside ``image`` when
            ``image`` is zero-padded after it (one compiled shape for many volume sizes): the windows, flips and
            blend are then those of a ``size`` volume, and the result keeps ``image``'s extent (crop it to
            ``size``; voxels no window covers are 0).
    """
    import keras

    ops = keras.ops
    roi = tuple(int(r) for r in roi_size)
    image = ops.cast(image, "float32")
    mask = ops.cast(mask, "float32")
    if size is not None:
        size = ops.cast(size, "int32")
    if mode == "gaussian":
        weights = gaussian_weights(roi, sigma_scale, xp=ops, dtype="float32")
    elif mode == "constant":
        weights = ops.ones(roi, "float32")
    else:
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    settings = (weights, roi, overlap, sw_batch_size, num_classes)
    if flips is None:
        return _blend(logits_fn, image, mask, *settings, size=size)
    flips = ops.cast(flips, "int32")

    def body(f, total):
        flags = ops.take(flips, f, axis=0)
        prob = _blend(logits_fn, _flip(image, flags, size), mask, *settings, size=size)
        return total + _flip(prob, flags, size)

    count = ops.shape(flips)[0]
    total = _sequential(count, body, ops.zeros(list(ops.shape(image)[:3]) + [num_classes], "float32"))
    return total / ops.cast(count, "float32")
