"""The layers of ``shaspec_tf.layers`` against small NumPy reference implementations.

Every expected value is computed here, independently of the package, from the semantics of the official PyTorch
code (weight standardisation, symmetric padding, instance norm, trilinear upsampling) or of the paper.
"""
import keras
import numpy as np
import pytest

from shaspec_tf import layers as L

try:
    from conftest import to_numpy
except ImportError:  # pragma: no cover - pytest puts tests/ on sys.path through its rootdir conftest
    def to_numpy(x):
        return np.asarray(keras.ops.convert_to_numpy(x))


# -- NumPy references ------------------------------------------------------------------------------------------------
def np_standardize(w, eps=1e-12):
    """Official ``Conv3d_wd``: per output filter (last axis in Keras layout), mean 0 and unbiased variance 1."""
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1))
    mean = w.mean(axis=axes, keepdims=True)
    var = w.var(axis=axes, ddof=1, keepdims=True)
    return (w - mean) / np.sqrt(var + eps)


def np_conv3d_valid(x, w, strides=(1, 1, 1), dilation=(1, 1, 1)):
    """Direct 'valid' 3D convolution (cross-correlation) of ``x`` [B, D, H, W, Ci] with ``w`` [kd, kh, kw, Ci, Co]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    _, *size, _ = x.shape
    kernel = w.shape[:3]
    out_size = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(size, kernel, strides, dilation)]
    out = np.zeros((x.shape[0], *out_size, w.shape[-1]))
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            for c in range(kernel[2]):
                starts = (a * dilation[0], b * dilation[1], c * dilation[2])
                index = (slice(None),) + tuple(slice(st, st + s * (o - 1) + 1, s)
                                               for st, s, o in zip(starts, strides, out_size))
                out += x[index] @ w[a, b, c]
    return out


def torch_conv_size(n, k, s, p, d=1):
    """PyTorch's Conv output size: floor((n + 2p - d (k - 1) - 1) / s) + 1."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def np_instance_norm(x, gamma, beta, eps=1e-5):
    """PyTorch ``InstanceNorm(affine=True)``: per sample and channel over spatial axes, biased variance."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def np_interpolate_x2(x, axis):
    """PyTorch ``F.interpolate(scale_factor=2, mode='linear', align_corners=False)`` along one axis:
    source coordinate ``(dst + 0.5) / 2 - 0.5`` clamped at 0, linear weights, upper neighbour clamped to the edge."""
    x = np.asarray(x, np.float64)
    n = x.shape[axis]
    src = np.maximum((np.arange(2 * n) + 0.5) / 2.0 - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    lam = src - lo
    shape = [1] * x.ndim
    shape[axis] = 2 * n
    lam = lam.reshape(shape)
    return (1.0 - lam) * np.take(x, lo, axis=axis) + lam * np.take(x, hi, axis=axis)


def np_leaky_relu(x, slope=0.01):
    return np.where(x > 0, x, slope * x)


def ceil_half(n):
    return -(-n // 2)


@pytest.fixture
def rng():
    return np.random.default_rng(20230718)


# -- weight standardisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 3, 3, 4, 5), (7, 7, 7, 1, 3), (1, 1, 1, 6, 2), (3, 3, 2, 4)])
def test_standardize_kernel_gives_zero_mean_unit_unbiased_variance_per_filter(rng, shape):
    kernel = rng.normal(loc=0.7, scale=3.0, size=shape).astype("float32")
    std = to_numpy(L.standardize_kernel(keras.ops.convert_to_tensor(kernel))).astype(np.float64)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(std.mean(axis=axes), 0.0, atol=1e-6)
    np.testing.assert_allclose(std.var(axis=axes, ddof=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(std, np_standardize(kernel), rtol=1e-5, atol=1e-6)


def test_standardize_kernel_maps_a_constant_filter_to_zeros_not_nan():
    kernel = np.ones((3, 3, 3, 2, 2), "float32")
    kernel[..., 1] = np.arange(54, dtype="float32").reshape(3, 3, 3, 2)
    std = to_numpy(L.standardize_kernel(keras.ops.convert_to_tensor(kernel)))
    np.testing.assert_array_equal(std[..., 0], 0.0)
    np.testing.assert_allclose(std[..., 1], np_standardize(kernel)[..., 1], rtol=1e-5, atol=1e-6)


def test_wsconv3d_equals_plain_conv3d_with_the_standardised_kernel(rng):
    x = rng.normal(size=(2, 5, 6, 7, 3)).astype("float32")
    ws = L.WSConv3D(4, 3, padding="same")
    y = to_numpy(ws(x))
    assert not ws.use_bias  # bias-free by default, as Conv3d_wd in the official model
    plain = keras.layers.Conv3D(4, 3, padding="same", use_bias=False)
    plain.build(x.shape)
    plain.kernel.assign(np_standardize(to_numpy(ws.kernel)).astype("float32"))
    np.testing.assert_allclose(y, to_numpy(plain(x)), rtol=1e-5, atol=1e-5)
    # The raw kernel is not standardised, so a plain conv with it differs: the layer really standardises.
    plain.kernel.assign(to_numpy(ws.kernel))
    assert not np.allclose(y, to_numpy(plain(x)), atol=1e-3)


def test_wsconv3d_valid_matches_a_direct_numpy_convolution(rng):
    x = rng.normal(size=(1, 6, 7, 8, 2)).astype("float32")
    ws = L.WSConv3D(3, (3, 2, 3), strides=(1, 2, 2), dilation_rate=1, padding="valid")
    y = to_numpy(ws(x))
    expected = np_conv3d_valid(x, np_standardize(to_numpy(ws.kernel)), strides=(1, 2, 2))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_wsconv2d_equals_plain_conv2d_with_the_standardised_kernel(rng):
    x = rng.normal(size=(2, 9, 8, 3)).astype("float32")
    ws = L.WSConv2D(5, 3, padding="valid")
    y = to_numpy(ws(x))
    plain = keras.layers.Conv2D(5, 3, padding="valid", use_bias=False)
    plain.build(x.shape)
    plain.kernel.assign(np_standardize(to_numpy(ws.kernel)).astype("float32"))
    np.testing.assert_allclose(y, to_numpy(plain(x)), rtol=1e-5, atol=1e-5)


# -- Conv3DUnit and symmetric padding --------------------------------------------------------------------------------
def test_conv3d_unit_symmetric_padding_matches_pytorch_stem_semantics(rng):
    """The official stem: 7x7x7 conv, stride (1, 2, 2), padding 3 on every side, weight-standardised."""
    x = rng.normal(size=(1, 8, 16, 16, 2)).astype("float32")
    unit = L.Conv3DUnit(3, 7, strides=(1, 2, 2), symmetric_padding=True)
    y = to_numpy(unit(x))
    padded = np.pad(x, ((0, 0), (3, 3), (3, 3), (3, 3), (0, 0)))
    expected = np_conv3d_valid(padded, np_standardize(to_numpy(unit.conv.kernel)), strides=(1, 2, 2))
    assert y.shape == (1, torch_conv_size(8, 7, 1, 3), torch_conv_size(16, 7, 2, 3), torch_conv_size(16, 7, 2, 3), 3)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_conv3d_unit_symmetric_padding_with_dilation_matches_pytorch(rng):
    """ASPP-style 3x3x3 conv at dilation 2 with PyTorch padding 2 (no weight standardisation)."""
    x = rng.normal(size=(1, 5, 6, 7, 2)).astype("float32")
    unit = L.Conv3DUnit(3, 3, dilation_rate=2, weight_std=False, symmetric_padding=True)
    y = to_numpy(unit(x))
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (2, 2), (0, 0)))
    expected = np_conv3d_valid(padded, to_numpy(unit.conv.kernel), dilation=(2, 2, 2))
    assert y.shape == (1, 5, 6, 7, 3)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,dilation", [(7, (1, 2, 2), 1), (3, 2, 1), (1, 2, 1), (3, 1, 2)])
@pytest.mark.parametrize("size", [(8, 16, 16), (6, 10, 4), (5, 7, 9)])
def test_conv3d_unit_symmetric_output_size_follows_pytorch_formula(kernel, stride, dilation, size):
    unit = L.Conv3DUnit(2, kernel, strides=stride, dilation_rate=dilation, symmetric_padding=True)
    strides = stride if isinstance(stride, tuple) else (stride,) * 3
    pad = dilation * (kernel - 1) // 2
    expected = tuple(torch_conv_size(n, kernel, s, pad, dilation) for n, s in zip(size, strides))
    assert tuple(unit.compute_output_shape((1, *size, 1))) == (1, *expected, 2)
    y = unit(np.zeros((1, *size, 1), "float32"))
    assert tuple(y.shape) == (1, *expected, 2)


def test_symmetric_and_same_padding_differ_for_stride_two_on_even_inputs(rng):
    x = rng.normal(size=(1, 8, 8, 8, 2)).astype("float32")
    sym = L.Conv3DUnit(3, 3, strides=2, symmetric_padding=True)
    same = L.Conv3DUnit(3, 3, strides=2, symmetric_padding=False)
    y_sym = to_numpy(sym(x))
    same.build(x.shape)
    same.set_weights(sym.get_weights())
    y_same = to_numpy(same(x))
    assert y_sym.shape == y_same.shape == (1, 4, 4, 4, 3)
    assert not np.allclose(y_sym, y_same, atol=1e-3)
    # Keras 'same' pads only at the end here, so it equals the valid conv of the input padded (0, 1) per axis.
    expected_same = np_conv3d_valid(np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 1), (0, 0))),
                                    np_standardize(to_numpy(sym.conv.kernel)), strides=(2, 2, 2))
    np.testing.assert_allclose(y_same, expected_same, rtol=1e-4, atol=1e-4)


def test_symmetric_and_same_padding_agree_for_stride_one(rng):
    x = rng.normal(size=(1, 6, 5, 4, 2)).astype("float32")
    sym = L.Conv3DUnit(3, 3, symmetric_padding=True)
    same = L.Conv3DUnit(3, 3, symmetric_padding=False)
    y_sym = to_numpy(sym(x))
    same.build(x.shape)
    same.set_weights(sym.get_weights())
    np.testing.assert_allclose(y_sym, to_numpy(same(x)), rtol=1e-5, atol=1e-5)


def test_symmetric_padding3d_pads_both_sides_with_the_constant(rng):
    x = rng.normal(size=(2, 3, 4, 5, 2)).astype("float32")
    layer = L.SymmetricPadding3D((1, 0, 2), constant=-7.5)
    y = to_numpy(layer(x))
    expected = np.pad(x, ((0, 0), (1, 1), (0, 0), (2, 2), (0, 0)), constant_values=-7.5)
    np.testing.assert_array_equal(y, expected)
    assert layer.compute_output_shape((None, 3, None, 5, 2)) == (None, 5, None, 9, 2)


# -- instance normalisation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 3), (2, 7, 5, 3), (1, 3, 4, 2, 4)])
def test_instance_norm_matches_numpy_reference(rng, shape):
    x = rng.normal(loc=2.0, scale=3.0, size=shape).astype("float32")
    layer = L.InstanceNormalization()
    layer.build(shape)
    gamma = rng.normal(size=shape[-1]).astype("float32")
    beta = rng.normal(size=shape[-1]).astype("float32")
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    y = to_numpy(layer(x))
    np.testing.assert_allclose(y, np_instance_norm(x, gamma, beta), rtol=1e-4, atol=1e-4)


def test_instance_norm_is_per_sample_not_per_batch(rng):
    x = rng.normal(size=(2, 3, 3, 3, 2)).astype("float32")
    layer = L.InstanceNormalization()
    both = to_numpy(layer(x))
    alone = to_numpy(layer(x[1:]))
    np.testing.assert_allclose(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_instance_norm_on_1x1x1_returns_beta_exactly(rng):
    x = rng.normal(scale=10.0, size=(2, 1, 1, 1, 5)).astype("float32")
    layer = L.InstanceNormalization()
    layer.build(x.shape)
    beta = rng.normal(size=5).astype("float32")
    layer.gamma.assign(rng.normal(size=5).astype("float32"))
    layer.beta.assign(beta)
    y = to_numpy(layer(x))
    np.testing.assert_array_equal(y, np.broadcast_to(beta, y.shape))


def test_instance_norm_on_spatially_constant_maps_returns_beta_exactly(rng):
    values = rng.normal(scale=100.0, size=(3, 1, 1, 1, 4)).astype("float32")
    x = np.broadcast_to(values, (3, 4, 5, 6, 4)).copy()
    x[1] = 0.0  # an absent modality's zero-filled input
    layer = L.InstanceNormalization()
    layer.build(x.shape)
    beta = rng.normal(size=4).astype("float32")
    layer.gamma.assign(rng.normal(size=4).astype("float32"))
    layer.beta.assign(beta)
    y = to_numpy(layer(x))
    np.testing.assert_array_equal(y, np.broadcast_to(beta, y.shape))


def test_instance_norm_is_accurate_for_a_large_offset(rng):
    """Shifted moments: a small spread on a large mean is normalised as accurately as a centred map."""
    x = (1000.0 + 0.05 * rng.normal(size=(1, 6, 6, 6, 2))).astype("float32")
    y = to_numpy(L.InstanceNormalization()(x))
    np.testing.assert_allclose(y, np_instance_norm(x, 1.0, 0.0), atol=2e-3)


def test_instance_norm_without_affine_has_no_weights(rng):
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    layer = L.InstanceNormalization(center=False, scale=False)
    y = to_numpy(layer(x))
    assert layer.weights == []
    np.testing.assert_allclose(y, np_instance_norm(x, 1.0, 0.0), rtol=1e-4, atol=1e-4)


# -- linear upsampling -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_upsample_linear_x2_matches_pytorch_half_pixel_interpolation(rng, axis, n):
    shape = [2, 3, 4, 3, 2]
    shape[axis] = n
    x = rng.normal(size=shape).astype("float32")
    y = to_numpy(L.upsample_linear_x2(keras.ops.convert_to_tensor(x), axis))
    np.testing.assert_allclose(y, np_interpolate_x2(x, axis), rtol=1e-6, atol=1e-6)


def test_upsample_linear_x2_known_1d_values():
    """Spot values of the half-pixel rule: out[2i] = .75 x[i] + .25 x[i-1], out[2i+1] = .75 x[i] + .25 x[i+1]."""
    x = np.array([0.0, 4.0, 8.0], "float32").reshape(1, 3, 1, 1, 1)
    y = to_numpy(L.upsample_linear_x2(keras.ops.convert_to_tensor(x), 1)).ravel()
    np.testing.assert_allclose(y, [0.0, 1.0, 3.0, 5.0, 7.0, 8.0], atol=1e-6)


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (2, 1, 1), (1, 1, 1)])
def test_linear_upsampling3d_matches_pytorch_trilinear(rng, factors):
    x = rng.normal(size=(2, 3, 4, 5, 2)).astype("float32")
    layer = L.LinearUpsampling3D(factors)
    y = to_numpy(layer(x))
    expected = x.astype(np.float64)
    for axis, factor in zip((1, 2, 3), factors):
        if factor == 2:  # trilinear with align_corners=False is separable
            expected = np_interpolate_x2(expected, axis)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert layer.compute_output_shape((None, 3, None, 5, 2)) == (
        None, 3 * factors[0], None, 5 * factors[2], 2)


@pytest.mark.parametrize("factors", [(1, 3, 2), (2, 2), (0, 1, 1)])
def test_linear_upsampling3d_rejects_unsupported_factors(factors):
    with pytest.raises(ValueError):
        L.LinearUpsampling3D(factors)


# -- ASPP ------------------------------------------------------------------------------------------------------------
def test_aspp_output_shapes_and_pooled_is_the_input_mean(rng):
    x = rng.normal(size=(2, 3, 4, 5, 6)).astype("float32")
    layer = L.ASPP3D(4, rates=(1, 2, 3))
    features, pooled = layer(x)
    assert tuple(features.shape) == (2, 3, 4, 5, 4)
    assert tuple(pooled.shape) == (2, 6)
    np.testing.assert_allclose(to_numpy(pooled), x.mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_aspp_image_pool_with_norm_is_a_constant_leaky_relu_of_beta(rng):
    layer = L.ASPP3D(4, rates=(1, 2, 2), image_pool_norm=True)
    layer(rng.normal(size=(1, 3, 3, 3, 5)).astype("float32"))
    beta = rng.normal(size=4).astype("float32")
    layer.image_pool.norm.beta.assign(beta)
    a = to_numpy(layer.image_pool(rng.normal(size=(2, 1, 1, 1, 5)).astype("float32")))
    b = to_numpy(layer.image_pool(rng.normal(scale=5.0, size=(2, 1, 1, 1, 5)).astype("float32")))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, np.broadcast_to(np_leaky_relu(beta), a.shape), rtol=1e-6)


def test_aspp_image_pool_without_norm_depends_on_the_input(rng):
    layer = L.ASPP3D(4, rates=(1, 2, 2), image_pool_norm=False)
    layer(rng.normal(size=(1, 3, 3, 3, 5)).astype("float32"))
    v1 = rng.normal(size=(2, 1, 1, 1, 5)).astype("float32")
    v2 = rng.normal(size=(2, 1, 1, 1, 5)).astype("float32")
    a, b = to_numpy(layer.image_pool(v1)), to_numpy(layer.image_pool(v2))
    assert not np.allclose(a, b)
    # no norm: the branch is LeakyReLU(v @ standardised kernel)
    kernel = np_standardize(to_numpy(layer.image_pool.conv.conv.kernel))[0, 0, 0]
    np.testing.assert_allclose(a, np_leaky_relu(v1.astype(np.float64) @ kernel), rtol=1e-4, atol=1e-5)


# -- ResNet3D and Encoder3D ------------------------------------------------------------------------------------------
TINY_TRUNK = dict(stem_filters=4, planes=(4, 4, 8, 8), blocks=(1, 1, 1, 1))


def expected_stage_sizes(size):
    """Stem stride (1, 2, 2); then the max-pool and layers 2-4 halve (ceil) every axis."""
    d, h, w = size
    sizes = [(d, ceil_half(h), ceil_half(w))]
    for _ in range(4):
        sizes.append(tuple(ceil_half(n) for n in sizes[-1]))
    return sizes


@pytest.mark.parametrize("depth,symmetric", [(10, False), (50, False), (10, True)])
@pytest.mark.parametrize("size", [(8, 16, 16), (9, 17, 15)])
def test_resnet3d_stage_shapes(rng, depth, symmetric, size):
    trunk = L.ResNet3D(depth, symmetric_padding=symmetric, **TINY_TRUNK)
    expansion = 1 if depth == 10 else 4
    expected_channels = (4, 4 * expansion, 4 * expansion, 8 * expansion, 8 * expansion)
    assert tuple(trunk.stage_channels) == expected_channels
    outputs = trunk(rng.normal(size=(2, *size, 1)).astype("float32"))
    assert len(outputs) == 5
    for out, spatial, channels in zip(outputs, expected_stage_sizes(size), expected_channels):
        assert tuple(out.shape) == (2, *spatial, channels)
        assert np.all(np.isfinite(to_numpy(out)))


def test_resnet3d_rejects_unknown_depth_and_wrong_stage_counts():
    with pytest.raises(ValueError):
        L.ResNet3D(depth=11)
    with pytest.raises(ValueError):
        L.ResNet3D(10, planes=(4, 4, 8))


def _spec_shapes(spec):
    return {"features": tuple(spec["features"].shape), "pooled": tuple(spec["pooled"].shape),
            "skips": [tuple(s.shape) for s in spec["skips"]]}


@pytest.mark.parametrize("depth", [10, 50])
@pytest.mark.parametrize("size", [(16, 32, 32), (17, 33, 35)])
def test_encoder3d_outputs_and_compute_output_spec_agree(rng, depth, size):
    enc = L.Encoder3D(depth, feature_channels=6, aspp_rates=(1, 2, 2), **TINY_TRUNK)
    x = rng.normal(size=(2, *size, 1)).astype("float32")
    out = enc(x)
    sizes = expected_stage_sizes(size)
    expansion = 1 if depth == 10 else 4
    assert tuple(out["features"].shape) == (2, *sizes[4], 6)
    assert tuple(out["pooled"].shape) == (2, 6)
    assert len(out["skips"]) == 4
    skip_channels = (4, 4 * expansion, 4 * expansion, 8 * expansion)
    for skip, spatial, channels in zip(out["skips"], sizes[:4], skip_channels):
        assert tuple(skip.shape) == (2, *spatial, channels)
    assert tuple(enc.skip_channels) == skip_channels
    actual = {"features": tuple(out["features"].shape), "pooled": tuple(out["pooled"].shape),
              "skips": [tuple(s.shape) for s in out["skips"]]}
    assert _spec_shapes(enc.compute_output_spec(keras.KerasTensor(x.shape))) == actual


def test_encoder3d_symbolic_spec_keeps_unknown_sizes_unknown():
    enc = L.Encoder3D(10, feature_channels=6, aspp_rates=(1, 2, 2), **TINY_TRUNK)
    spec = enc.compute_output_spec(keras.KerasTensor((None, None, 32, None, 1)))
    assert tuple(spec["features"].shape) == (None, None, 1, None, 6)
    assert tuple(spec["pooled"].shape) == (None, 6)
    assert [tuple(s.shape) for s in spec["skips"]] == [(None, None, 16, None, 4), (None, None, 8, None, 4),
                                                         (None, None, 4, None, 4), (None, None, 2, None, 8)]


def test_encoder3d_pooled_is_the_mean_of_the_aspp_input(rng):
    enc = L.Encoder3D(10, feature_channels=6, aspp_rates=(1, 1, 1), **TINY_TRUNK)
    x = rng.normal(size=(2, 16, 32, 32, 1)).astype("float32")
    out = enc(x)
    stages = enc.trunk(x)
    reduced = to_numpy(enc.reduce(stages[-1]))
    np.testing.assert_allclose(to_numpy(out["pooled"]), reduced.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-5)


# -- Decoder3D -------------------------------------------------------------------------------------------------------
def test_decoder3d_restores_the_input_volume_size(rng):
    m, size = 2, (16, 32, 32)
    enc = L.Encoder3D(10, feature_channels=6, aspp_rates=(1, 1, 1), **TINY_TRUNK)
    x = rng.normal(size=(1, *size, m)).astype("float32")
    out = enc(L.FoldModalities()(x))
    to_channels = lambda t: L.ModalitiesToChannels()(L.UnfoldModalities(m)(t))  # noqa: E731
    features = to_channels(out["features"])
    skips = [to_channels(s) for s in out["skips"]]
    assert features.shape[-1] == m * 6
    dec = L.Decoder3D((8, 4, 4, 4), num_classes=3)
    logits = dec(features, skips)
    assert tuple(logits.shape) == (1, *size, 3)
    assert np.all(np.isfinite(to_numpy(logits)))
    spec = dec.compute_output_spec(keras.KerasTensor(features.shape), [keras.KerasTensor(s.shape) for s in skips])
    assert tuple(spec.shape) == tuple(logits.shape)


def test_decoder3d_rejects_a_wrong_number_of_skips():
    dec = L.Decoder3D((4, 4, 4, 4), num_classes=2)
    with pytest.raises(ValueError):
        dec.build((None, 1, 1, 1, 8), [(None, 2, 2, 2, 4)] * 3)


# -- ResidualFusion --------------------------------------------------------------------------------------------------
def test_residual_fusion_projection_scale_by_init(rng):
    """Default (plain Glorot): proj(concat[r, s]) at about the scale of r. "zeros": f = r exactly before training.
    "standardised" (official): about sqrt(k^3 * 2C) times the scale of r, whatever the kernel's values."""
    r = rng.normal(size=(2, 6, 6, 6, 8)).astype("float32")
    s = rng.normal(size=(2, 6, 6, 6, 8)).astype("float32")
    ratio = {}
    for init in ("default", "zeros", "standardised"):
        layer = L.ResidualFusion(rank=3, kernel_size=3) if init == "default" else L.ResidualFusion(init=init)
        ratio[init] = np.std(to_numpy(layer(r, s)) - r) / np.std(r)
        assert layer.proj.weight_std == (init == "standardised")
    assert 0.3 < ratio["default"] < 3
    assert ratio["zeros"] == 0
    assert 0.5 * np.sqrt(27 * 16) < ratio["standardised"] < 1.5 * np.sqrt(27 * 16)


def test_residual_fusion_with_zero_projection_returns_r_exactly(rng):
    r = rng.normal(size=(2, 3, 3, 3, 4)).astype("float32")
    s = rng.normal(size=(2, 3, 3, 3, 4)).astype("float32")
    layer = L.ResidualFusion(rank=3, kernel_size=3, init="standardised")
    layer(r, s)
    layer.proj.conv.kernel.assign(np.zeros(layer.proj.conv.kernel.shape, "float32"))
    np.testing.assert_array_equal(to_numpy(layer(r, s)), r)


def test_residual_fusion_is_r_plus_projection_of_concatenation(rng):
    r = rng.normal(size=(2, 3, 4, 3, 4)).astype("float32")
    s = rng.normal(size=(2, 3, 4, 3, 5)).astype("float32")
    layer = L.ResidualFusion(rank=3, kernel_size=3, init="standardised")
    y = to_numpy(layer(r, s))
    assert tuple(layer.proj.conv.kernel.shape) == (3, 3, 3, 9, 4)
    assert np.abs(y - r).max() > 1.0  # the projection is not trivially zero
    expected = r + to_numpy(layer.proj(np.concatenate([r, s], axis=-1)))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_residual_fusion_linear_kernel_matches_numpy(rng):
    """kernel_size=1 without weight standardisation is a per-voxel matrix product of concat[r, s]."""
    r = rng.normal(size=(2, 3, 2, 2, 4)).astype("float32")
    s = rng.normal(size=(2, 3, 2, 2, 3)).astype("float32")
    layer = L.ResidualFusion(rank=3, kernel_size=1)
    y = to_numpy(layer(r, s))
    w = to_numpy(layer.proj.conv.kernel)[0, 0, 0].astype(np.float64)
    expected = r + np.concatenate([r, s], axis=-1).astype(np.float64) @ w
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_residual_fusion_dense_variant_on_vectors(rng):
    r = rng.normal(size=(5, 6)).astype("float32")
    s = rng.normal(size=(5, 3)).astype("float32")
    layer = L.ResidualFusion(rank=0)
    layer(r, s)
    w = rng.normal(size=(9, 6)).astype("float32")
    b = rng.normal(size=6).astype("float32")
    layer.proj.kernel.assign(w)
    layer.proj.bias.assign(b)
    y = to_numpy(layer(r, s))
    expected = r + np.concatenate([r, s], axis=-1).astype(np.float64) @ w + b
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    layer.proj.kernel.assign(np.zeros((9, 6), "float32"))
    layer.proj.bias.assign(np.zeros(6, "float32"))
    np.testing.assert_array_equal(to_numpy(layer(r, s)), r)


def test_residual_fusion_rejects_other_ranks_and_inits():
    with pytest.raises(ValueError):
        L.ResidualFusion(rank=2)
    with pytest.raises(ValueError, match="unknown fusion init"):
        L.ResidualFusion(init="glorot_sideways")


# -- MissingFeatureGenerator -----------------------------------------------------------------------------------------
MASKS = np.array([[1, 1, 1, 1],   # all present
                  [0, 0, 1, 0],   # one present
                  [1, 0, 1, 1],
                  [0, 1, 0, 1]], "float32")


def np_generated(shared, mask, rule):
    out = []
    for feats, m in zip(shared.astype(np.float64), mask):
        present = np.flatnonzero(m > 0)
        out.append(feats[present].mean(axis=0) if rule == "mean" else feats[present[0]])
    return np.stack(out)


@pytest.mark.parametrize("rule", ["mean", "first"])
@pytest.mark.parametrize("feature_shape", [(5,), (2, 2, 1, 3)])
def test_missing_feature_generator_matches_numpy(rng, rule, feature_shape):
    shared = rng.normal(size=(4, 4, *feature_shape)).astype("float32")
    y = to_numpy(L.MissingFeatureGenerator(rule)(shared, MASKS))
    assert y.shape == (4, *feature_shape)
    np.testing.assert_allclose(y, np_generated(shared, MASKS, rule), rtol=1e-5, atol=1e-6)


def test_missing_feature_generator_random_masks(rng):
    masks = (rng.random((12, 4)) < 0.5).astype("float32")
    masks[np.arange(12), rng.integers(0, 4, 12)] = 1.0  # at least one present
    shared = rng.normal(size=(12, 4, 3)).astype("float32")
    for rule in ("mean", "first"):
        y = to_numpy(L.MissingFeatureGenerator(rule)(shared, masks))
        np.testing.assert_allclose(y, np_generated(shared, masks, rule), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "first"])
def test_missing_feature_generator_fills_only_absent_slots_of_fused(rng, rule):
    shared = rng.normal(size=(4, 4, 2, 3)).astype("float32")
    fused = rng.normal(size=(4, 4, 2, 3)).astype("float32")
    fused[MASKS == 0] = np.nan  # absent slots' fused values must be replaced, whatever they hold
    y = to_numpy(L.MissingFeatureGenerator(rule)(shared, MASKS, fused))
    generated = np_generated(shared, MASKS, rule)
    for b in range(4):
        for m in range(4):
            expected = fused[b, m] if MASKS[b, m] else generated[b]
            np.testing.assert_allclose(y[b, m], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "first"])
def test_missing_feature_generator_ignores_absent_shared_values(rng, rule):
    shared = rng.normal(size=(4, 4, 3)).astype("float32")
    fused = rng.normal(size=(4, 4, 3)).astype("float32")
    layer = L.MissingFeatureGenerator(rule)
    clean_gen = to_numpy(layer(shared, MASKS))
    clean_fused = to_numpy(layer(shared, MASKS, fused))
    for poison in (np.nan, np.inf, -np.inf, 1e30):
        dirty = shared.copy()
        dirty[MASKS == 0] = poison
        np.testing.assert_array_equal(to_numpy(layer(dirty, MASKS)), clean_gen)
        np.testing.assert_array_equal(to_numpy(layer(dirty, MASKS, fused)), clean_fused)


@pytest.mark.parametrize("rule", ["mean", "first"])
def test_missing_feature_generator_gives_nan_when_nothing_is_present(rng, rule):
    shared = rng.normal(size=(2, 3, 4)).astype("float32")
    mask = np.array([[0, 0, 0], [0, 1, 0]], "float32")
    y = to_numpy(L.MissingFeatureGenerator(rule)(shared, mask))
    assert np.all(np.isnan(y[0]))
    np.testing.assert_allclose(y[1], shared[1, 1], rtol=1e-6)
    fused = to_numpy(L.MissingFeatureGenerator(rule)(shared, mask, shared))
    assert np.all(np.isnan(fused[0]))


def test_missing_feature_generator_rejects_unknown_rule():
    with pytest.raises(ValueError):
        L.MissingFeatureGenerator("median")


# -- MaskModalities --------------------------------------------------------------------------------------------------
def test_mask_modalities_zeros_absent_channels_even_nan_and_inf(rng):
    x = rng.normal(size=(3, 2, 3, 4, 4)).astype("float32")
    mask = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]], "float32")
    x[0, ..., 1] = np.nan
    x[0, 0, 0, 0, 3] = np.inf
    x[1, ..., 0] = -np.inf
    y = to_numpy(L.MaskModalities()(x, mask))
    for b in range(3):
        for m in range(4):
            if mask[b, m]:
                np.testing.assert_array_equal(y[b, ..., m], x[b, ..., m])
            else:
                np.testing.assert_array_equal(y[b, ..., m], 0.0)


def test_mask_modalities_single_column_on_images(rng):
    """The classifier masks each modality tensor [B, H, W, 1] with one mask column [B, 1]."""
    x = rng.normal(size=(3, 5, 5, 1)).astype("float32")
    x[1] = np.nan
    mask = np.array([[1], [0], [1]], "int32")
    y = to_numpy(L.MaskModalities()(x, mask))
    np.testing.assert_array_equal(y[[0, 2]], x[[0, 2]])
    np.testing.assert_array_equal(y[1], 0.0)


def test_mask_modalities_on_the_modality_axis_of_per_modality_tensors(rng):
    """``axis=1``: the segmenter's skip maps [B, M, d, h, w, C]; what an absent entry held (NaN here) is gone."""
    x = rng.normal(size=(2, 3, 2, 4, 4, 5)).astype("float32")
    x[0, 1] = np.nan
    mask = np.array([[1, 0, 1], [0, 1, 1]], "float32")
    layer = L.MaskModalities(axis=1)
    y = to_numpy(layer(x, mask))
    for b in range(2):
        for m in range(3):
            np.testing.assert_array_equal(y[b, m], x[b, m] if mask[b, m] else 0.0)
    assert L.MaskModalities.from_config(layer.get_config()).axis == 1
    with pytest.raises(ValueError, match="modality axis 1 or -1, got axis=2"):
        L.MaskModalities(axis=2)
    with pytest.raises(ValueError, match="absent must be 'zeros' or 'detached', got 'nan'"):
        L.MaskModalities(absent="nan")


def test_mask_modalities_detached_keeps_values_and_stops_their_gradient(rng):
    from conftest import gradients

    x = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    mask = np.array([[1, 0, 1], [0, 1, 1]], "float32")
    layer = L.MaskModalities(axis=1, absent="detached")
    np.testing.assert_array_equal(to_numpy(layer(x, mask)), x)
    assert L.MaskModalities.from_config(layer.get_config()).absent == "detached"
    inputs, mask_in = keras.Input((3, 4, 5)), keras.Input((3,))
    model = keras.Model([inputs, mask_in], layer(keras.layers.Dense(5, kernel_initializer="ones")(inputs), mask_in))
    # d(sum of the outputs) / d(kernel[c, j]) sums x[..., c] over the present entries only
    kernel_grad = gradients(model, [x, mask], lambda out: keras.ops.sum(out))[0]
    expected = np.repeat(np.einsum("bmhc,bm->c", x, mask)[:, None], 5, axis=1)
    np.testing.assert_allclose(kernel_grad, expected, rtol=1e-5, atol=1e-5)


# -- modality axis helpers -------------------------------------------------------------------------------------------
def test_fold_modalities_row_layout(rng):
    b, m = 2, 3
    x = rng.normal(size=(b, 4, 2, 3, m)).astype("float32")
    folded = to_numpy(L.FoldModalities()(x))
    assert folded.shape == (b * m, 4, 2, 3, 1)
    for i in range(b):
        for j in range(m):
            np.testing.assert_array_equal(folded[i * m + j, ..., 0], x[i, ..., j])


def test_unfold_and_merge_are_inverse_with_row_layout(rng):
    b, m = 3, 4
    flat = rng.normal(size=(b * m, 2, 5)).astype("float32")
    unfolded = to_numpy(L.UnfoldModalities(m)(flat))
    assert unfolded.shape == (b, m, 2, 5)
    for i in range(b):
        for j in range(m):
            np.testing.assert_array_equal(unfolded[i, j], flat[i * m + j])
    np.testing.assert_array_equal(to_numpy(L.MergeModalityBatch()(unfolded)), flat)


def test_stack_modalities_layout(rng):
    tensors = [rng.normal(size=(2, 3, 4)).astype("float32") for _ in range(3)]
    stacked = to_numpy(L.StackModalities()(tensors))
    assert stacked.shape == (2, 3, 3, 4)
    for j, t in enumerate(tensors):
        np.testing.assert_array_equal(stacked[:, j], t)


def test_modalities_to_channels_layout(rng):
    b, m, c = 2, 3, 4
    x = rng.normal(size=(b, m, 2, 3, 1, c)).astype("float32")
    y = to_numpy(L.ModalitiesToChannels()(x))
    assert y.shape == (b, 2, 3, 1, m * c)
    for j in range(m):
        for k in range(c):
            np.testing.assert_array_equal(y[..., j * c + k], x[:, j, ..., k])


def test_fold_unfold_to_channels_round_trip(rng):
    """Fold a [B, ..., M] image into the batch, unfold it, and move modalities back to channels: the identity."""
    x = rng.normal(size=(2, 3, 4, 5, 4)).astype("float32")
    folded = L.FoldModalities()(x)
    back = to_numpy(L.ModalitiesToChannels()(L.UnfoldModalities(4)(folded)))
    np.testing.assert_array_equal(back, x)


def test_modality_helpers_compute_output_shape_with_unknown_dims():
    assert tuple(L.FoldModalities().compute_output_shape((None, None, 8, None, 4))) == (None, None, 8, None, 1)
    assert tuple(L.FoldModalities().compute_output_shape((2, 3, 8, 5, 4))) == (8, 3, 8, 5, 1)
    assert tuple(L.UnfoldModalities(4).compute_output_shape((None, None, 2, 2, 16))) == (None, 4, None, 2, 2, 16)
    assert tuple(L.UnfoldModalities(4).compute_output_shape((8, 1, 1, 1, 16))) == (2, 4, 1, 1, 1, 16)
    assert tuple(L.MergeModalityBatch().compute_output_shape((None, 4, None, 3))) == (None, None, 3)
    assert tuple(L.MergeModalityBatch().compute_output_shape((2, 4, 5))) == (8, 5)
    assert tuple(L.StackModalities().compute_output_shape([(None, None, 5)] * 3)) == (None, 3, None, 5)
    assert tuple(L.ModalitiesToChannels().compute_output_shape((None, 4, None, None, None, 16))) == (
        None, None, None, None, 64)


def test_modality_helpers_on_symbolic_inputs():
    image = keras.Input((None, None, None, 4))
    folded = L.FoldModalities()(image)
    assert tuple(folded.shape) == (None, None, None, None, 1)
    unfolded = L.UnfoldModalities(4)(keras.Input((None, None, None, 16)))
    assert tuple(unfolded.shape) == (None, 4, None, None, None, 16)
    assert tuple(L.ModalitiesToChannels()(unfolded).shape) == (None, None, None, None, 64)
    assert tuple(L.MergeModalityBatch()(unfolded).shape) == (None, None, None, None, 16)


# -- DomainClassifier ------------------------------------------------------------------------------------------------
def test_domain_classifier_shape_and_values(rng):
    x = rng.normal(size=(3, 4, 6)).astype("float32")
    layer = L.DomainClassifier(4)
    y = to_numpy(layer(x))
    assert y.shape == (3, 4, 4)
    w, b = to_numpy(layer.dense.kernel), to_numpy(layer.dense.bias)
    assert w.shape == (6, 4) and b.shape == (4,)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w + b, rtol=1e-5, atol=1e-5)


# -- 2D encoders -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_size", [28, 20, 12])
def test_modality_stem2d_maps_onto_the_common_grid(rng, input_size):
    x = rng.normal(size=(2, input_size, input_size, 1)).astype("float32")
    stem = L.ModalityStem2D(input_size, 12, filters=4, norm_groups=2)
    y = to_numpy(stem(x))
    assert y.shape == (2, 12, 12, 4)
    assert np.all(y >= 0.0)  # ends with ReLU


def test_modality_stem2d_rejects_an_input_smaller_than_the_grid():
    with pytest.raises(ValueError):
        L.ModalityStem2D(8, 12)


def test_conv_trunk2d_output_shape(rng):
    x = rng.normal(size=(3, 12, 12, 4)).astype("float32")
    trunk = L.ConvTrunk2D((4, 8), feature_dim=5, norm_groups=2)
    y = to_numpy(trunk(x))
    assert y.shape == (3, 5)
    assert np.all(y >= 0.0)
    assert tuple(trunk.dense.kernel.shape) == (3 * 3 * 8, 5)  # two 2x poolings: 12 -> 6 -> 3


# -- configuration round trips ---------------------------------------------------------------------------------------
def _f32(rng, *shape):
    return rng.normal(size=shape).astype("float32")


CONFIG_CASES = {
    "WSConv3D": (lambda: L.WSConv3D(3, 3, padding="same", ws_epsilon=1e-6), lambda r: (_f32(r, 1, 4, 4, 4, 2),)),
    "WSConv2D": (lambda: L.WSConv2D(3, 3), lambda r: (_f32(r, 1, 5, 5, 2),)),
    "SymmetricPadding3D": (lambda: L.SymmetricPadding3D((1, 0, 2), constant=2.5), lambda r: (_f32(r, 1, 2, 2, 2, 1),)),
    "Conv3DUnit": (lambda: L.Conv3DUnit(3, 3, strides=2, symmetric_padding=True, use_bias=True),
                   lambda r: (_f32(r, 1, 6, 6, 6, 2),)),
    "ConvNormAct": (lambda: L.ConvNormAct(3, 3, strides=2, activation="relu"), lambda r: (_f32(r, 1, 6, 6, 6, 2),)),
    "ResidualBlock3D": (lambda: L.ResidualBlock3D(2, "bottleneck", strides=2, projection_shortcut=True),
                        lambda r: (_f32(r, 1, 4, 4, 4, 3),)),
    "ResNet3D": (lambda: L.ResNet3D(10, symmetric_padding=True, **TINY_TRUNK), None),
    "ASPP3D": (lambda: L.ASPP3D(4, (1, 2, 2), image_pool_norm=True), lambda r: (_f32(r, 1, 3, 3, 3, 4),)),
    "Encoder3D": (lambda: L.Encoder3D(10, feature_channels=4, aspp_rates=(1, 1, 1), **TINY_TRUNK), None),
    "Decoder3D": (lambda: L.Decoder3D((8, 4, 4, 4), num_classes=2, final_upsample=(2, 2, 2), norm="batch"), None),
    "InstanceNormalization": (lambda: L.InstanceNormalization(epsilon=1e-3, center=False),
                              lambda r: (_f32(r, 2, 3, 3, 3, 2),)),
    "LinearUpsampling3D": (lambda: L.LinearUpsampling3D((2, 1, 2)), lambda r: (_f32(r, 1, 2, 3, 2, 2),)),
    "ModalityStem2D": (lambda: L.ModalityStem2D(20, 12, 4, 2), lambda r: (_f32(r, 1, 20, 20, 1),)),
    "ConvTrunk2D": (lambda: L.ConvTrunk2D((4, 8), 6, 2), lambda r: (_f32(r, 1, 12, 12, 4),)),
    "ResidualFusion": (lambda: L.ResidualFusion(0), lambda r: (_f32(r, 2, 5), _f32(r, 2, 3))),
    "MissingFeatureGenerator": (lambda: L.MissingFeatureGenerator("first"),
                                lambda r: (_f32(r, 3, 2, 4), np.array([[0, 1], [1, 1], [1, 0]], "float32"))),
    "DomainClassifier": (lambda: L.DomainClassifier(3), lambda r: (_f32(r, 2, 3, 5),)),
    "UnfoldModalities": (lambda: L.UnfoldModalities(3), lambda r: (_f32(r, 6, 2),)),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_layer_config_round_trip(rng, name):
    make, inputs = CONFIG_CASES[name]
    layer = make()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert type(clone) is type(layer)
    assert clone.get_config() == config
    if inputs is None:
        return
    args = inputs(rng)
    expected = layer(*args)
    clone(*args)  # builds the clone; then give it the original's weights
    clone.set_weights(layer.get_weights())
    result = clone(*args)
    for a, b in zip(keras.tree.flatten(expected), keras.tree.flatten(result)):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-6, atol=1e-6)


def test_config_round_trip_through_keras_serialization():
    """The registered names let ``keras.saving`` rebuild the layers from JSON-like configs."""
    import json

    for make, _ in CONFIG_CASES.values():
        layer = make()
        payload = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
        clone = keras.saving.deserialize_keras_object(payload)
        assert type(clone) is type(layer)
        assert clone.get_config() == layer.get_config()
