"""Whole-volume inference: window placement, blending, TTA, label maps and the "ShaSpec*" post-processing.

The sliding window runs compiled with the model (keras.ops in jax.jit / tf.function); ``_reference_predict`` below is
the NumPy implementation it replaced (host padding, a model call per batch of tiles, NumPy blending), kept here only
to check the compiled one against it. Every test here runs under TensorFlow and under JAX.
"""
import itertools
import math
import os

import keras
import numpy as np
import pytest

from shaspec_tf.inference import (gaussian_importance_map, postprocess, predict_case, probabilities_to_labels,
                                  sliding_window_predict, window_starts)
from shaspec_tf.inference import compiled as compiled_module
from shaspec_tf.inference.window import FLIPS, window_grid

MASK = np.array([1, 1, 1, 1], dtype=np.float32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- fake models (keras.ops, so that they trace with the window) --------------------------------------------------
class VoxelModel:
    """Logits are a per-voxel function of the (masked) image: position independent and flip equivariant, so a
    sliding window must reproduce the whole-volume output exactly. Records the input shape of every call (which,
    inside a compiled function, happens once per trace)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.kernel = rng.normal(size=(4, 3)).astype(np.float32)
        self.bias = rng.normal(size=3).astype(np.float32)
        self.calls = []

    def __call__(self, inputs):
        self.calls.append(tuple(inputs["image"].shape))
        ops = keras.ops
        x = inputs["image"] * ops.reshape(inputs["modality_mask"], (-1, 1, 1, 1, 4))
        return {"logits": ops.tanh(ops.matmul(x, self.kernel)) * 3.0 + self.bias,
                "features": ops.zeros_like(inputs["image"])}  # not the logits: never comes back

    def direct(self, image, mask=MASK):
        x = image.astype(np.float64) * mask
        return 1.0 / (1.0 + np.exp(-(np.tanh(x @ self.kernel) * 3.0 + self.bias)))


class RampModel:
    """Logits depend only on the position inside the tile (a ramp along D from -2 to 2): not position
    independent."""

    def __call__(self, inputs):
        ops = keras.ops
        b, d, h, w, _ = inputs["image"].shape
        ramp = ops.reshape(ops.linspace(-2.0, 2.0, d), (1, d, 1, 1, 1))
        return {"logits": ops.zeros((b, d, h, w, 3)) + ramp + 0.0 * inputs["image"][..., :1]}


class MixModel:
    """Position dependent and data dependent (a ramp along H plus a per-voxel function, and a 3x3x3 box filter
    along D), so that tile placement, padding, weights and flips all show in the result."""

    def __init__(self, seed=5):
        self.kernel = np.random.default_rng(seed).normal(size=(4, 3)).astype(np.float32)

    def __call__(self, inputs):
        ops = keras.ops
        x = inputs["image"] * ops.reshape(inputs["modality_mask"], (-1, 1, 1, 1, 4))
        b, d, h, w, _ = x.shape
        smooth = (x + ops.pad(x[:, 1:], [[0, 0], [0, 1], [0, 0], [0, 0], [0, 0]])
                  + ops.pad(x[:, :-1], [[0, 0], [1, 0], [0, 0], [0, 0], [0, 0]])) / 3.0
        ramp = ops.reshape(ops.linspace(-1.5, 1.0, h), (1, 1, h, 1, 1))
        return {"logits": ops.matmul(smooth, self.kernel) + ramp}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _volume(shape, seed=1):
    return np.random.default_rng(seed).normal(size=tuple(shape) + (4,)).astype(np.float32)


# -- the NumPy implementation that the compiled window replaced (reference only) ----------------------------------
def _reference_starts(size, roi, overlap):
    if size <= roi:
        return (0,)
    stride = max(1, math.ceil(round(roi * (1.0 - overlap), 9)))
    count = math.ceil((size - roi) / stride) + 1
    return tuple(sorted({min(i * stride, size - roi) for i in range(count)}))


def _reference_gaussian(roi_size, sigma_scale=0.125):
    weights = np.ones((), dtype=np.float64)
    for axis, roi in enumerate(roi_size):
        x = np.arange(roi, dtype=np.float64) - (roi - 1) / 2.0
        profile = np.exp(-0.5 * (x / (sigma_scale * roi)) ** 2)
        weights = weights[..., None] * profile if axis else profile
    weights = weights / weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def _reference_blend(model, image, mask, roi, overlap, weights, sw_batch_size):
    shape = image.shape[:3]
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    if padded != shape:
        image = np.pad(image, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    starts = list(itertools.product(*(_reference_starts(p, r, overlap) for p, r in zip(padded, roi))))
    accum, total = None, np.zeros(padded, dtype=np.float32)
    for first in range(0, len(starts), sw_batch_size):
        batch = starts[first:first + sw_batch_size]
        slices = [tuple(slice(s, s + r) for s, r in zip(start, roi)) for start in batch]
        tiles = np.stack([image[sl] for sl in slices])
        inputs = {"image": tiles, "modality_mask": np.repeat(mask[None], len(batch), axis=0)}
        outputs = model.predict_on_batch(inputs) if hasattr(model, "predict_on_batch") else model(inputs)
        logits = np.asarray(keras.ops.convert_to_numpy(outputs["logits"]), dtype=np.float32)
        prob = 1.0 / (1.0 + np.exp(-logits))
        if accum is None:
            accum = np.zeros(padded + (prob.shape[-1],), dtype=np.float32)
        for sl, p in zip(slices, prob):
            accum[sl] += p * weights[..., None]
            total[sl] += weights
    accum /= total[..., None]
    return accum[:shape[0], :shape[1], :shape[2]]


def _reference_predict(model, image, mask, roi_size, overlap=1 / 3, mode="gaussian", sigma_scale=0.125,
                       sw_batch_size=4, tta_flips=False):
    image, mask = np.asarray(image, np.float32), np.asarray(mask, np.float32)
    weights = _reference_gaussian(roi_size, sigma_scale) if mode == "gaussian" else np.ones(roi_size, np.float32)
    flips = [axes for n in range(4) for axes in itertools.combinations(range(3), n)] if tta_flips else [()]
    result = None
    for axes in flips:
        flipped = np.ascontiguousarray(np.flip(image, axes)) if axes else image
        prob = _reference_blend(model, flipped, mask, tuple(roi_size), overlap, weights, sw_batch_size)
        prob = np.flip(prob, axes) if axes else prob
        result = prob.copy() if result is None else result + prob
    return result / np.float32(len(flips)) if len(flips) > 1 else result


# -- windows ------------------------------------------------------------------------------------------------------
def test_window_starts_reproduce_the_official_tiles():
    assert window_starts(155, 80, 1 / 3) == (0, 54, 75)
    assert window_starts(240, 160, 1 / 3) == (0, 80)
    tiles = list(itertools.product(window_starts(155, 80), window_starts(240, 160), window_starts(240, 160)))
    assert len(tiles) == 12


@pytest.mark.parametrize("size,roi,overlap", [(155, 80, 1 / 3), (240, 160, 1 / 3), (70, 32, 1 / 3), (40, 32, 0.5),
                                              (33, 32, 0.0), (100, 16, 0.75), (32, 32, 1 / 3), (20, 32, 1 / 3)])
def test_window_starts_cover_every_voxel_and_stay_inside(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    assert starts[0] == 0 and list(starts) == sorted(set(starts))
    covered = np.zeros(max(size, roi), dtype=int)
    for s in starts:
        assert s + roi <= max(size, roi)
        covered[s:s + roi] += 1
    assert covered[:size].min() >= 1
    if size > roi:
        assert starts[-1] + roi == size
        assert max(np.diff(starts)) <= int(np.ceil(roi * (1 - overlap) - 1e-9))


def test_gaussian_map_peaks_at_centre_and_is_positive_at_corners():
    g = gaussian_importance_map((32, 64, 64), 0.125)
    assert g.shape == (32, 64, 64) and g.dtype == np.float32
    peak = np.unravel_index(np.argmax(g), g.shape)
    assert peak in {(a, b, c) for a in (15, 16) for b in (31, 32) for c in (31, 32)}
    assert np.isclose(g.max(), 1.0)
    assert g[0, 0, 0] > 0 and g[-1, -1, -1] > 0 and g[0, 0, 0] < 0.01
    np.testing.assert_array_equal(g, g[::-1, ::-1, ::-1])  # symmetric: same weights for flipped windows
    assert g[16, 32, 32] > g[8, 32, 32] > g[0, 32, 32]
    # sigma = sigma_scale * roi along each axis: one sigma off centre (4 voxels along D) is exp(-1/2) of the peak
    odd = gaussian_importance_map((33, 33, 33), 0.125)
    assert np.isclose(odd[20, 16, 16],
                      np.exp(-0.5 * (4 / (0.125 * 33)) ** 2), rtol=1e-5)


# -- sliding window -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("shape", [(40, 70, 70), (20, 70, 45)])
def test_sliding_window_equals_whole_volume_output(mode, shape):
    model = VoxelModel()
    image = _volume(shape)
    prob = sliding_window_predict(model, image, MASK, roi_size=(32, 32, 32), mode=mode)
    assert prob.shape == shape + (3,) and prob.dtype == np.float32
    np.testing.assert_allclose(prob, model.direct(image), rtol=1e-5, atol=1e-6)
    assert all(call[1:4] == (32, 32, 32) for call in model.calls)  # padded tiles, never beyond the ROI


def test_sw_batch_size_batches_windows_without_changing_results():
    image = _volume((40, 70, 70))  # 2 * 3 * 3 = 18 windows of 32^3
    one, four = VoxelModel(), VoxelModel()
    a = sliding_window_predict(one, image, MASK, roi_size=(32, 32, 32), sw_batch_size=1)
    b = sliding_window_predict(four, image, MASK, roi_size=(32, 32, 32), sw_batch_size=4)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The model is traced with batches of sw_batch_size windows (the last, partial batch is filled up inside).
    assert set(one.calls) == {(1, 32, 32, 32, 4)} and set(four.calls) == {(4, 32, 32, 32, 4)}
    # Never more windows per call than the volume has.
    few = VoxelModel()
    sliding_window_predict(few, _volume((32, 40, 32)), MASK, roi_size=(32, 32, 32), sw_batch_size=4)
    assert set(few.calls) == {(2, 32, 32, 32, 4)}


def test_constant_mode_averages_overlapping_tiles():
    # Two windows along D (starts 0 and 16); each voxel gets the mean of the ramp values of the tiles covering it.
    prob = sliding_window_predict(RampModel(), _volume((48, 32, 32)), MASK, roi_size=(32, 32, 32), overlap=0.5,
                                  mode="constant")
    ramp = _sigmoid(np.linspace(-2.0, 2.0, 32))
    expected = np.zeros(48)
    count = np.zeros(48)
    for s in (0, 16):
        expected[s:s + 32] += ramp
        count[s:s + 32] += 1
    np.testing.assert_allclose(prob[:, 5, 7, 1], expected / count, rtol=1e-6)
    # Gaussian blending weighs each tile by the importance map at the voxel's place in the tile.
    gauss = sliding_window_predict(RampModel(), _volume((48, 32, 32)), MASK, roi_size=(32, 32, 32), overlap=0.5)
    g = gaussian_importance_map((32, 32, 32))[:, 16, 9]
    num, den = np.zeros(48), np.zeros(48)
    for s in (0, 16):
        num[s:s + 32] += g * ramp
        den[s:s + 32] += g
    np.testing.assert_allclose(gauss[:, 16, 9, 0], num / den, rtol=1e-5)
    # so the tile whose centre is nearer dominates: D = 28 sits near the second tile's centre (16 + 15.5)
    assert abs(gauss[28, 16, 16, 0] - ramp[12]) < 0.1 * abs(gauss[28, 16, 16, 0] - ramp[28])
    assert abs(prob[28, 16, 16, 0] - ramp[12]) > 0.1


def test_smaller_axis_is_padded_after_the_end_and_cropped():
    prob = sliding_window_predict(RampModel(), _volume((20, 40, 40)), MASK, roi_size=(32, 32, 32), mode="constant")
    assert prob.shape == (20, 40, 40, 3)
    np.testing.assert_allclose(prob[:, 0, 0, 2], _sigmoid(np.linspace(-2.0, 2.0, 32))[:20], rtol=1e-6)


def test_tta_flips_are_flipped_back():
    model = VoxelModel()
    image = _volume((40, 70, 45))
    plain = sliding_window_predict(model, image, MASK, roi_size=(32, 32, 32))
    tta = sliding_window_predict(model, image, MASK, roi_size=(32, 32, 32), tta_flips=True)
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-6)
    assert len(FLIPS) == 8 and FLIPS[0] == () and len(set(FLIPS)) == 8
    # A position-dependent model: the D ramp and its flip average to exactly 0.5; without TTA it does not.
    ramp_plain = sliding_window_predict(RampModel(), image[:32, :32, :32], MASK, roi_size=(32, 32, 32))
    ramp_tta = sliding_window_predict(RampModel(), image[:32, :32, :32], MASK, roi_size=(32, 32, 32),
                                      tta_flips=True)
    np.testing.assert_allclose(ramp_tta, 0.5, atol=1e-6)
    assert np.abs(ramp_plain - 0.5).max() > 0.3
    # With a progress bar, each flip is one call of the same compiled function, summed on the host.
    with_bar = sliding_window_predict(RampModel(), image, MASK, roi_size=(32, 32, 32), tta_flips=True, progress=True)
    np.testing.assert_allclose(with_bar, sliding_window_predict(RampModel(), image, MASK, roi_size=(32, 32, 32),
                                                                tta_flips=True), rtol=1e-6, atol=1e-7)


def test_absent_modality_is_masked_and_progress_runs():
    model = VoxelModel()
    image = _volume((32, 40, 40))
    mask = np.array([1, 0, 1, 1], dtype=np.float32)
    prob = sliding_window_predict(model, image, mask, roi_size=(32, 32, 32), progress=True)
    np.testing.assert_allclose(prob, model.direct(image, mask), rtol=1e-5, atol=1e-6)
    assert not np.allclose(prob, model.direct(image))


@pytest.mark.parametrize("kwargs,image_shape,mask,message", [
    ({}, (32, 32, 32), MASK, r"image must be one volume \[D, H, W, 4\]"),
    ({}, (32, 32, 32, 3), MASK, r"image must be one volume"),
    ({}, (1, 32, 32, 32, 4), MASK, r"image must be one volume"),
    ({}, (32, 32, 32, 4), np.ones(3), r"modality_mask must have shape \[4\]"),
    ({}, (32, 32, 32, 4), np.ones((1, 4)), r"modality_mask must have shape \[4\]"),
    ({}, (32, 32, 32, 4), np.zeros(4), r"modality_mask is all zero"),
    ({}, (32, 32, 32, 4), np.array([1, 0.5, 0, 0]), r"only 0 and 1"),
    ({"roi_size": (30, 32, 32)}, (32, 32, 32, 4), MASK, r"must be divisible by \(16, 32, 32\)"),
    ({"roi_size": (32, 48, 32)}, (32, 32, 32, 4), MASK, r"must be divisible by"),
    ({"roi_size": (16, 32, 32)}, (32, 32, 32, 4), MASK, r"1x1x1 bottleneck"),
    ({"roi_size": (32, 32)}, (32, 32, 32, 4), MASK, r"three positive integers"),
    ({"overlap": 1.0}, (32, 32, 32, 4), MASK, r"overlap must be in \[0, 1\)"),
    ({"overlap": -0.1}, (32, 32, 32, 4), MASK, r"overlap must be in \[0, 1\)"),
    ({"mode": "linear"}, (32, 32, 32, 4), MASK, r"mode must be 'gaussian' or 'constant'"),
    ({"sw_batch_size": 0}, (32, 32, 32, 4), MASK, r"sw_batch_size must be a positive integer"),
    ({"sigma_scale": 0.0}, (32, 32, 32, 4), MASK, r"sigma_scale must be > 0"),
])
def test_bad_inputs_raise_one_line_value_errors(kwargs, image_shape, mask, message):
    model = VoxelModel()
    with pytest.raises(ValueError, match=message) as err:
        sliding_window_predict(model, np.zeros(image_shape, np.float32), mask, **{"roi_size": (32, 32, 32), **kwargs})
    assert "\n" not in str(err.value)
    assert model.calls == []  # rejected before any model call


def test_bad_model_output_and_helper_arguments_raise():
    class Wrong:
        def __call__(self, inputs):
            return {"logits": keras.ops.zeros(tuple(inputs["image"].shape[:4]) + (3,))[:, :16]}

    class NoLogits:
        def __call__(self, inputs):
            return {"scores": inputs["image"]}

    with pytest.raises(ValueError, match=r"model logits must have shape \[batch, 32, 32, 32, classes\]") as err:
        sliding_window_predict(Wrong(), _volume((32, 32, 32)), MASK, roi_size=(32, 32, 32))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model outputs must hold 'logits'"):
        sliding_window_predict(NoLogits(), _volume((32, 32, 32)), MASK, roi_size=(32, 32, 32))
    with pytest.raises(ValueError, match="overlap must be in"):
        window_starts(100, 32, 1.5)
    with pytest.raises(ValueError, match="size >= 1 and roi >= 1"):
        window_starts(0, 32)
    with pytest.raises(ValueError, match=r"prob must be \[D, H, W, 3\]"):
        probabilities_to_labels(np.zeros((4, 4, 4, 2)))
    with pytest.raises(ValueError, match="BraTS values"):
        postprocess(np.full((4, 4, 4), 3))
    with pytest.raises(ValueError, match=r"\[D, H, W\] label map"):
        postprocess(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="t1ce must have the label map's shape"):
        postprocess(np.zeros((4, 4, 4)), t1ce=np.zeros((4, 4, 5)))


# -- the compiled window against the NumPy reference ---------------------------------------------------------------
@pytest.mark.parametrize("model_cls", [VoxelModel, RampModel, MixModel])
@pytest.mark.parametrize("shape,kwargs", [
    ((40, 70, 70), {"mode": "constant"}),
    ((40, 70, 70), {"mode": "gaussian", "sw_batch_size": 4}),                 # 18 windows: 4 does not divide
    ((33, 31, 97), {"mode": "gaussian", "sw_batch_size": 5}),                 # odd sizes, H shorter than the roi
    ((20, 27, 29), {"mode": "constant", "sw_batch_size": 3}),                 # every axis shorter: 1 padded window
    ((47, 70, 45), {"mode": "gaussian", "overlap": 0.5, "sigma_scale": 0.25, "sw_batch_size": 7}),
    ((35, 45, 33), {"tta_flips": True, "sw_batch_size": 3}),                   # 8 flips of an odd volume
    ((21, 40, 70), {"tta_flips": True, "mode": "constant", "sw_batch_size": 2}),
])
def test_compiled_window_matches_the_numpy_reference(model_cls, shape, kwargs):
    model = model_cls()
    image = _volume(shape, seed=sum(shape))
    mask = np.array([1, 0, 1, 1], np.float32)
    expected = _reference_predict(model, image, mask, (32, 32, 32), **kwargs)
    prob = sliding_window_predict(model, image, mask, roi_size=(32, 32, 32), **kwargs)
    assert prob.shape == shape + (3,) and prob.dtype == np.float32 and isinstance(prob, np.ndarray)
    np.testing.assert_allclose(prob, expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # about 55 s under JAX on a 2-core CPU (XLA CPU convolutions); a few seconds under TensorFlow
def test_tiny_shaspec_model_matches_the_numpy_reference():
    import shaspec_tf

    keras.utils.set_random_seed(11)
    model = shaspec_tf.build_segmenter("tiny")
    image = _volume((36, 50, 70), seed=4)  # 2 x 1 x 2 windows of 32 x 64 x 64; H shorter than the window
    mask = np.array([0, 1, 1, 0], np.float32)
    expected = _reference_predict(model, image, mask, (32, 64, 64), sw_batch_size=2)
    prob = sliding_window_predict(model, image, mask, roi_size=(32, 64, 64), sw_batch_size=2)
    np.testing.assert_allclose(prob, expected, rtol=0, atol=1e-5)


def test_compiled_function_is_reused_across_masks_and_calls():
    """The model is traced once per compiled function: a new mask never retraces (it is a runtime input), nor does
    a second volume of the same size; TensorFlow's graph takes any size, JAX compiles once per new extent (sizes
    rounded up to half a window: 40x50x45 and 45x50x40 share 48x64x48, 70x50x45 does not)."""
    model = VoxelModel()
    image = _volume((40, 50, 45))
    masks = [np.array(m, np.float32) for m in ([1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1])]
    first = sliding_window_predict(model, image, masks[0], roi_size=(32, 32, 32))
    traced = len(model.calls)
    assert traced == 2  # once symbolically for the output shape, once inside the compiled function
    results = [sliding_window_predict(model, image, m, roi_size=(32, 32, 32)) for m in masks[1:]]
    assert len(model.calls) == traced
    for m, prob in zip(masks, [first] + results):
        np.testing.assert_allclose(prob, model.direct(image, m), rtol=1e-5, atol=1e-6)
    run = compiled_module.volume_function(model, roi_size=(32, 32, 32), num_modalities=4, overlap=1 / 3,
                                          mode="gaussian", sigma_scale=(0.125,) * 3, sw_batch_size=4)
    assert run is compiled_module.volume_function(model, roi_size=(32, 32, 32), num_modalities=4, overlap=1 / 3,
                                                  mode="gaussian", sigma_scale=(0.125,) * 3, sw_batch_size=4)
    sliding_window_predict(model, _volume((40, 50, 45), seed=9), masks[2], roi_size=(32, 32, 32))
    assert len(model.calls) == traced
    other = _volume((45, 50, 40))
    np.testing.assert_allclose(sliding_window_predict(model, other, masks[1], roi_size=(32, 32, 32)),
                               model.direct(other, masks[1]), rtol=1e-5, atol=1e-6)
    assert len(model.calls) == traced  # the same extent under JAX
    sliding_window_predict(model, _volume((70, 50, 45)), masks[1], roi_size=(32, 32, 32))
    assert len(model.calls) == traced + (1 if keras.backend.backend() == "jax" else 0)
    # Other settings are another compiled function.
    sliding_window_predict(model, image, masks[1], roi_size=(32, 32, 32), mode="constant")
    assert len(model.calls) > traced + 1


def test_compile_extent_rounds_up_to_half_a_window_and_keeps_the_windows():
    extent = compiled_module.compile_extent
    assert extent((155, 240, 240), (80, 160, 160)) == (160, 240, 240)
    assert extent((20, 27, 100), (32, 32, 32)) == (32, 32, 112)
    for shape in [(1, 1, 1), (31, 32, 33), (47, 48, 49), (100, 129, 64)]:
        for roi in [(32, 32, 32), (16, 64, 96), (80, 160, 160)]:
            got = extent(shape, roi)
            for s, r, e in zip(shape, roi, got):
                assert e >= max(s, r) and e % (r // 2) == 0 and e - max(s, r) < r // 2
                # never fewer windows in the extent than in the volume (the batch size is bounded by the extent's)
                assert len(window_starts(e, r)) >= len(window_starts(s, r))


def test_whole_volume_function_is_traced_once_for_repeated_calls():
    """Several calls with one volume shape (and any mask, image or sw_batch_size-bounded batch) trace the model
    once in the compiled function, with and without test-time flips (each its own function: 2 traces)."""
    model = VoxelModel()
    shape = (40, 33, 70)
    for seed in range(3):
        for mask in ([1, 1, 1, 1], [0, 1, 0, 0]):
            sliding_window_predict(model, _volume(shape, seed), np.array(mask, np.float32), roi_size=(32, 32, 32),
                                   sw_batch_size=3)
    assert len(model.calls) == 2 and set(model.calls) == {(3, 32, 32, 32, 4)}
    for seed in range(2):
        sliding_window_predict(model, _volume(shape, seed), MASK, roi_size=(32, 32, 32), sw_batch_size=3,
                               tta_flips=True)
    assert len(model.calls) == 3


def test_evaluation_compiles_once_for_all_fifteen_subsets(tmp_path):
    """The evaluator (every BraTS modality subset of every case) calls the one compiled window with the mask as a
    runtime input: the model is traced once for 15 subsets x 2 cases (plus once symbolically), and cases of
    different sizes in one extent share it under JAX."""
    import tensorflow as tf

    from shaspec_tf.data.schema import BratsRecord, brats_example
    from shaspec_tf.data.toy import toy_case
    from shaspec_tf.tasks import get_task

    rng = np.random.default_rng(0)
    path = str(tmp_path / "eval.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i, shape in enumerate([(36, 40, 40), (40, 44, 38)]):
            image, labels = toy_case(rng, shape)
            writer.write(brats_example(BratsRecord(f"c{i}", image, np.ones(4, np.int64), labels)).SerializeToString())

    class Segmenter(VoxelModel):
        modalities = ("flair", "t1", "t1ce", "t2")
        shaspec_config = {"crop_size": (32, 32, 32), "task": "brats"}

    model = Segmenter()
    results = get_task("brats").evaluate_model(model, [path])
    assert len(model.calls) == 2, model.calls
    assert len(results["subsets"]) == 15 and results["skipped"] == []


def test_only_the_probabilities_come_back():
    model = VoxelModel()  # its outputs also hold "features", as large as the tiles
    run = compiled_module.volume_function(model, roi_size=(32, 32, 32), num_modalities=4, overlap=1 / 3,
                                          mode="gaussian", sigma_scale=(0.125,) * 3, sw_batch_size=2)
    for flips in (None, np.zeros((1, 3), np.int32)):
        out = run(_volume((40, 33, 35)), MASK, flips)
        assert not isinstance(out, (dict, list, tuple)) and tuple(out.shape) == (40, 33, 35, 3)


@pytest.mark.parametrize("overlap", [1 / 3, 0.5, 0.0, 0.75])
def test_window_rule_on_tensors_equals_the_rule_on_integers(overlap):
    """The rule that the compiled window runs on (possibly symbolic) sizes is the one of window_starts."""
    for roi in (16, 32, 80, 160):
        for size in (1, 15, roi - 1, roi, roi + 1, 2 * roi + 3, 155, 240):
            padded, count, start = window_grid(keras.ops.convert_to_tensor(size, "int32"), roi, overlap)
            count = int(keras.ops.convert_to_numpy(count))
            assert int(keras.ops.convert_to_numpy(padded)) == max(size, roi)
            got = tuple(int(keras.ops.convert_to_numpy(start(keras.ops.convert_to_tensor(i, "int32"))))
                        for i in range(count))
            assert got == window_starts(size, roi, overlap) == _reference_starts(size, roi, overlap), (size, roi)


def test_gaussian_map_matches_the_reference_and_the_graph_weights():
    from shaspec_tf.inference.window import gaussian_weights

    for roi, scale in (((32, 64, 64), 0.125), ((80, 160, 160), 0.125), ((33, 17, 48), 0.3)):
        np.testing.assert_array_equal(gaussian_importance_map(roi, scale), _reference_gaussian(roi, scale))
        graph = keras.ops.convert_to_numpy(gaussian_weights(roi, scale, xp=keras.ops, dtype="float32"))
        np.testing.assert_allclose(graph, _reference_gaussian(roi, scale), rtol=1e-5, atol=1e-7)


def test_one_window_rule_and_one_gaussian_in_the_tree():
    """The window-start rule and the Gaussian weights are defined once (shaspec_tf/inference/window.py); the
    sliding window code itself is backend-free (keras.ops only)."""
    rule, gaussian = [], []
    for folder in ("shaspec_tf", "benchmarks", "shaspec_serving", "components", "pipeline", "scripts"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                    if "(1.0 - overlap)" in text or "(1 - overlap)" in text:
                        rule.append(os.path.relpath(path, REPO))
                    if "sigma_scale" in text and "exp(-0.5" in text:  # the window's Gaussian, not others
                        gaussian.append(os.path.relpath(path, REPO))
    assert rule == [os.path.join("shaspec_tf", "inference", "window.py")]
    assert gaussian == [os.path.join("shaspec_tf", "inference", "window.py")]
    import ast

    with open(os.path.join(REPO, "shaspec_tf", "inference", "window.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "itertools", "math", "typing", "numpy", "keras"}, imported
    data_path = {"_flip", "_blend", "window_probabilities"}
    names = {node.id for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name in data_path
             for node in ast.walk(fn) if isinstance(node, ast.Name)}
    assert not names & {"np", "numpy", "tf", "jax"}, names & {"np", "numpy", "tf", "jax"}


# -- labels -------------------------------------------------------------------------------------------------------
def test_label_map_precedence():
    # channels ET, WT, TC
    cases = {(1, 1, 1): 4, (0, 1, 0): 2, (0, 1, 1): 1, (0, 0, 0): 0, (1, 0, 0): 4, (0, 0, 1): 1, (1, 1, 0): 4}
    prob = np.array([[[[0.9 if on else 0.1 for on in key] for key in cases]]], dtype=np.float32)
    labels = probabilities_to_labels(prob)
    assert labels.dtype == np.uint8 and labels.shape == (1, 1, len(cases))
    assert labels[0, 0].tolist() == list(cases.values())
    # 0.5 itself is off (the official np.around rounds 0.5 to 0); the threshold is adjustable
    assert probabilities_to_labels(np.full((1, 1, 1, 3), 0.5, np.float32)).item() == 0
    assert probabilities_to_labels(np.full((1, 1, 1, 3), 0.3, np.float32), threshold=0.25).item() == 4


def test_predict_case_returns_labels_and_probabilities():
    model = VoxelModel()
    image = _volume((32, 40, 40))
    labels, prob = predict_case(model, image, MASK, roi_size=(32, 32, 32), mode="constant")
    np.testing.assert_array_equal(labels, probabilities_to_labels(prob))
    np.testing.assert_allclose(prob, model.direct(image), rtol=1e-5, atol=1e-6)
    post, _ = predict_case(model, image, MASK, roi_size=(32, 32, 32), postprocess_options={})
    np.testing.assert_array_equal(post, postprocess(labels))


# -- post-processing ----------------------------------------------------------------------------------------------
def _blobs():
    labels = np.zeros((48, 48, 48), dtype=np.uint8)
    labels[10:30, 10:30, 10:30] = 2   # large (8000 voxels, up to D = 29): kept
    labels[15:25, 15:25, 15:25] = 4   # 1000 ET voxels inside it
    labels[40:45, 40:45, 40:45] = 1   # small (125 < min(2000, 800)): removed
    labels[0:15, 35:48, 0:15] = 2     # 2925 voxels but entirely at D <= 25: removed
    labels[30:34, 30:34, 30:34] = 2   # 64 voxels touching the large cube at a corner only: separate, removed
    labels[10:14, 30:34, 30:34] = 2   # 64 voxels sharing an edge (H/W diagonal) with the large cube: joined, kept
    return labels


def test_postprocess_removes_small_and_low_components():
    labels = _blobs()
    before = labels.copy()
    out = postprocess(labels)
    np.testing.assert_array_equal(labels, before)  # pure
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[10:30, 10:30, 10:30], before[10:30, 10:30, 10:30])
    assert not out[40:45, 40:45, 40:45].any()
    assert not out[0:15, 35:48, 0:15].any()
    assert not out[30:34, 30:34, 30:34].any()
    assert (out[10:14, 30:34, 30:34] == 2).all()
    assert np.count_nonzero(out) == 8000 + 64
    # the rules are parameters: 26-connectivity joins the corner cube, the low-slice rule can be switched off
    joined = postprocess(labels, connectivity=3)
    assert (joined[30:34, 30:34, 30:34] == 2).all()
    no_low = postprocess(labels, low_slice_max=None)
    assert (no_low[0:15, 35:48, 0:15] == 2).all()
    assert np.array_equal(postprocess(labels, remove_components=False), labels)
    # the low-slice rule reads axis 0 (the NIfTI slice axis k): the same block along W is kept
    moved = np.zeros_like(labels)
    moved[10:30, 10:30, 10:30] = 2
    moved[35:48, 0:15, 0:15] = 2
    assert (postprocess(moved)[35:48, 0:15, 0:15] == 2).all()


def test_postprocess_turns_small_et_into_ncr():
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[5:35, 5:35, 5:35] = 2
    labels[10:20, 10:20, 10:15] = 4                       # 500 ET voxels: kept
    assert np.count_nonzero(postprocess(labels) == 4) == 500
    labels[10, 10, 10] = 2                                # 499: all of them become NCR
    out = postprocess(labels)
    assert np.count_nonzero(out == 4) == 0 and np.count_nonzero(out == 1) == 499
    assert np.count_nonzero(postprocess(labels, et_min_voxels=400) == 4) == 499


def test_postprocess_kmeans_relabels_the_darker_oedema():
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[5:35, 5:35, 5:35] = 2                          # 27000 oedema voxels
    labels[18:22, 18:22, 18:20] = 4                       # 32 ET voxels: ET sum 128 < 450, ratios tiny
    t1ce = np.zeros(labels.shape, dtype=np.float32)
    t1ce[5:35, 5:35, 5:20] = 100.0                        # darker half of the oedema
    t1ce[5:35, 5:35, 20:35] = 300.0                       # brighter half
    out = postprocess(labels, t1ce=t1ce)
    edema = labels == 2
    assert (out[edema & (t1ce == 100.0)] == 1).all()
    assert (out[edema & (t1ce == 300.0)] == 2).all()
    assert (out[labels == 4] == 1).all()                  # and ET < 500 -> NCR
    assert not out[labels == 0].any()
    # without T1ce, or when a condition fails (too many NCR voxels), the oedema stays
    assert (postprocess(labels)[edema] == 2).all()
    assert (postprocess(labels, t1ce=t1ce, kmeans_max_ncr=0)[edema] == 2).all()


# -- the real model -----------------------------------------------------------------------------------------------
def test_tiny_shaspec_model_end_to_end():
    import shaspec_tf

    model = shaspec_tf.build_segmenter("tiny")
    image = _volume((40, 72, 72), seed=3)
    mask = np.array([1, 1, 0, 1], dtype=np.float32)
    prob = sliding_window_predict(model, image, mask, roi_size=(32, 64, 64), sw_batch_size=4)
    assert prob.shape == (40, 72, 72, 3) and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    changed = image.copy()
    changed[..., 2] = np.random.default_rng(7).normal(size=changed.shape[:3]) * 5.0  # the absent T1ce
    np.testing.assert_allclose(sliding_window_predict(model, changed, mask, roi_size=(32, 64, 64)), prob, atol=1e-6)
    present = image.copy()
    present[..., 0] = np.random.default_rng(8).normal(size=present.shape[:3]) * 5.0  # FLAIR is present
    assert np.abs(sliding_window_predict(model, present, mask, roi_size=(32, 64, 64)) - prob).max() > 1e-4


@pytest.mark.slow  # two XLA compilations of the tiny model under JAX (float32, bfloat16)
def test_bf16_window_follows_the_model_weights_and_stays_close_to_fp32():
    """``precision="bf16"``: the model's layers compute in bfloat16 (a twin built under mixed_bfloat16, fed the
    model's own weights at each call): probabilities close to float32's, float32 out, and a change of the model's
    weights shows in the next bf16 call (the twin never holds stale weights)."""
    import shaspec_tf

    keras.utils.set_random_seed(5)
    model = shaspec_tf.build_segmenter("tiny")
    image = _volume((32, 32, 48), seed=6)
    mask = np.array([1, 0, 1, 1], np.float32)
    fp32 = sliding_window_predict(model, image, mask, roi_size=(32, 32, 32))
    bf16 = sliding_window_predict(model, image, mask, roi_size=(32, 32, 32), precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    diff = np.abs(bf16 - fp32)  # bfloat16 keeps 8 bits of mantissa: close, not equal
    assert 0 < diff.mean() < 0.01 and diff.max() < 0.15, (diff.mean(), diff.max())
    assert ((bf16 > 0.5) == (fp32 > 0.5)).mean() > 0.98  # the same regions almost everywhere
    assert keras.config.dtype_policy().name == "float32"  # the twin was built without changing the global policy
    model.get_layer("decoder").set_weights([w * 0.5 for w in model.get_layer("decoder").get_weights()])
    changed = sliding_window_predict(model, image, mask, roi_size=(32, 32, 32))
    changed_bf16 = sliding_window_predict(model, image, mask, roi_size=(32, 32, 32), precision="bf16")
    assert np.abs(changed - fp32).mean() > 0.05  # the weights matter ...
    assert np.abs(changed_bf16 - changed).mean() < 0.01  # ... and the bf16 twin follows them
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp8'"):
        sliding_window_predict(model, image, mask, roi_size=(32, 32, 32), precision="fp8")
    with pytest.raises(ValueError, match="needs a shaspec_tf model"):
        sliding_window_predict(VoxelModel(), image, mask, roi_size=(32, 32, 32), precision="bf16")
