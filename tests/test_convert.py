"""Loading official PyTorch ``DualNet_SS`` state dicts (``shaspec_tf.convert``).

The fake state dicts are generated here from the official module names and PyTorch shapes (``DualNet_SS.py`` and
``Res50.py`` of github.com/billhhh/ShaSpec; digest section 3), scaled by the model's preset configuration. They do
not come from inverting ``convert.py``'s mapping, so a wrong rule or layout in the converter fails these tests.
"""
import sys
import types
import zlib

import keras
import numpy as np
import pytest

import shaspec_tf
from shaspec_tf import convert
from shaspec_tf.models.presets import SEGMENTER_PRESETS

try:
    from conftest import to_numpy
except ImportError:  # pragma: no cover
    def to_numpy(x):
        return np.asarray(keras.ops.convert_to_numpy(x))

ENCODERS = ("shared_enc", "flair_enc", "t1_enc", "t1ce_enc", "t2_enc")
# DualNet_SS(norm_cfg='IN', weight_std=True, num_classes=3) counted in torch (also tests/test_models.py); the digest
# gives 187.71 M.
OFFICIAL_PARAMETERS = 187_708_132


# -- the official state dict, from the official module structure -----------------------------------------------------
def official_state_dict_shapes(cfg, num_modalities=4, num_classes=3):
    """``{key: PyTorch shape}`` of ``DualNet_SS`` built with the widths/depths of a preset configuration."""
    depth = cfg["depth"]
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    blocks = cfg["blocks"] or {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    stem, c, m = cfg["stem_filters"], cfg["feature_channels"], num_modalities
    shapes = {}

    def conv(key, out, inp, k):
        shapes[f"{key}.weight"] = (out, inp, k, k, k)

    def norm(key, channels):
        shapes[f"{key}.weight"] = (channels,)
        shapes[f"{key}.bias"] = (channels,)

    for enc in ENCODERS:
        bb = f"{enc}.backbone"
        conv(f"{bb}.conv1", stem, 1, 7)
        norm(f"{bb}.norm1", stem)
        inplanes = stem
        for layer, (planes, n) in enumerate(zip(cfg["planes"], blocks), start=1):
            for b in range(n):
                block = f"{bb}.layer{layer}.{b}"
                if bottleneck:
                    convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
                else:
                    convs = [(planes, inplanes, 3), (planes, planes, 3)]
                for k, (out, inp, ks) in enumerate(convs, start=1):
                    conv(f"{block}.conv{k}", out, inp, ks)
                    norm(f"{block}.norm{k}", out)
                if b == 0:  # type-B shortcut: Res50 tests `stride != 1` on a tuple, so every layer's first block
                    conv(f"{block}.downsample.0", planes * expansion, inplanes, 1)
                    norm(f"{block}.downsample.1", planes * expansion)
                inplanes = planes * expansion
        conv(f"{enc}.asppreduce.0", c, inplanes, 1)
        norm(f"{enc}.asppreduce.1", c)
        for branch, k in zip((1, 2, 3, 4), (1, 3, 3, 3)):
            conv(f"{enc}.aspp.branch{branch}.0", c, c, k)
            norm(f"{enc}.aspp.branch{branch}.1", c)
        conv(f"{enc}.aspp.branch5_conv", c, c, 1)
        norm(f"{enc}.aspp.branch5_norm", c)
        conv(f"{enc}.aspp.conv_cat.0", c, 5 * c, 1)
        norm(f"{enc}.aspp.conv_cat.1", c)

    # Decoder: stage 3 (deepest) first; skips are the shared encoder's stage outputs of all modalities concatenated.
    stage_out = [stem] + [p * expansion for p in cfg["planes"]]  # stem, layer1..layer4
    filters = dict(zip((3, 2, 1, 0), cfg["decoder_filters"]))
    inp = m * c
    for stage in (3, 2, 1, 0):
        f = filters[stage]
        shapes[f"shared_dec.transposeconv_stage{stage}.weight"] = (inp, f, 2, 2, 2)  # ConvTranspose3d: (in, out, k)
        conv(f"shared_dec.shortcut_conv{stage}.0", f, m * stage_out[stage], 1)
        norm(f"shared_dec.shortcut_conv{stage}.1", f)
        for k in (1, 2):
            conv(f"shared_dec.stage{stage}_de.conv{k}", f, f, 3)
            norm(f"shared_dec.stage{stage}_de.norm{k}", f)
        inp = f
    conv("shared_dec.cls_conv.0", num_classes, inp, 1)
    conv("compos_layer.conv", c, 2 * c, 3)
    shapes["dom_classifier.weight"] = (m, c)
    shapes["dom_classifier.bias"] = (m,)
    return shapes


def fake_state_dict(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {key: rng.normal(scale=0.5, size=shape).astype("float32")
            for key, shape in official_state_dict_shapes(cfg).items()}


def to_keras_layout(value):
    """PyTorch -> Keras layout, from the frameworks' conventions: Conv3d (out, in, k...) and ConvTranspose3d
    (in, out, k...) -> (k..., in|out, out|in); Linear (out, in) -> (in, out); vectors unchanged."""
    if value.ndim == 5:
        return np.transpose(value, (2, 3, 4, 1, 0))
    if value.ndim == 2:
        return value.T
    return value


def snapshot(model):
    return {v.path: to_numpy(v).copy() for v in model.weights}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


TINY = SEGMENTER_PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    return shaspec_tf.build_segmenter("tiny", official_parity=True)


@pytest.fixture
def state_dict(request):
    """Fresh values per test (seeded by its name), so that a failed load can never look like a no-op just because
    an earlier test already loaded the same values into the shared model."""
    return fake_state_dict(TINY, seed=zlib.crc32(request.node.name.encode()))


def var(model, path):
    return to_numpy({v.path: v for v in model.weights}[path])


# -- the generator itself --------------------------------------------------------------------------------------------
def test_generated_paper_state_dict_has_the_official_parameter_count():
    """The helper reproduces the official model's size for the 'paper' widths (no model is built)."""
    shapes = official_state_dict_shapes(SEGMENTER_PRESETS["paper"])
    assert sum(int(np.prod(s)) for s in shapes.values()) == OFFICIAL_PARAMETERS
    assert shapes["shared_dec.transposeconv_stage3.weight"] == (1024, 256, 2, 2, 2)
    assert shapes["shared_dec.shortcut_conv3.0.weight"] == (256, 4096, 1, 1, 1)
    assert shapes["shared_dec.shortcut_conv0.0.weight"] == (32, 256, 1, 1, 1)
    assert shapes["shared_enc.asppreduce.0.weight"] == (256, 1280, 1, 1, 1)


def test_every_paper_key_maps_to_a_distinct_keras_path():
    keys = official_state_dict_shapes(SEGMENTER_PRESETS["paper"])
    paths = {key: convert.official_key_to_path(key) for key in keys}
    assert all(paths.values()), [k for k, p in paths.items() if not p]
    assert len(set(paths.values())) == len(paths)


# -- key mapping and layouts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,path", [
    ("shared_enc.backbone.conv1.weight", "shared_encoder/trunk/stem/conv/conv/kernel"),
    ("t1ce_enc.backbone.norm1.bias", "t1ce_encoder/trunk/stem/norm/beta"),
    ("flair_enc.backbone.layer3.0.conv2.weight", "flair_encoder/trunk/layer3_block0/unit2/conv/conv/kernel"),
    ("t2_enc.backbone.layer2.3.norm3.weight", "t2_encoder/trunk/layer2_block3/unit3/norm/gamma"),
    ("t1_enc.backbone.layer4.0.downsample.0.weight", "t1_encoder/trunk/layer4_block0/shortcut/conv/conv/kernel"),
    ("t1_enc.backbone.layer1.0.downsample.1.bias", "t1_encoder/trunk/layer1_block0/shortcut/norm/beta"),
    ("shared_enc.asppreduce.1.weight", "shared_encoder/reduce/norm/gamma"),
    ("shared_enc.aspp.branch3.0.weight", "shared_encoder/aspp/branch3/conv/conv/kernel"),
    ("shared_enc.aspp.branch5_conv.weight", "shared_encoder/aspp/image_pool/conv/conv/kernel"),
    ("shared_enc.aspp.branch5_norm.bias", "shared_encoder/aspp/image_pool/norm/beta"),
    ("shared_enc.aspp.conv_cat.1.weight", "shared_encoder/aspp/project/norm/gamma"),
    ("shared_dec.transposeconv_stage3.weight", "decoder/up3/kernel"),
    ("shared_dec.shortcut_conv0.1.bias", "decoder/skip0/norm/beta"),
    ("shared_dec.stage2_de.conv1.weight", "decoder/block2/unit1/conv/conv/kernel"),
    ("shared_dec.stage1_de.norm2.weight", "decoder/block1/unit2/norm/gamma"),
    ("shared_dec.cls_conv.0.weight", "decoder/head/kernel"),
    ("compos_layer.conv.weight", "fusion/proj/conv/kernel"),
    ("dom_classifier.weight", "domain_classifier/dense/kernel"),
    ("dom_classifier.bias", "domain_classifier/dense/bias"),
])
def test_official_key_to_path(key, path):
    assert convert.official_key_to_path(key) == path


@pytest.mark.parametrize("key", ["multihead_attn.in_proj_weight", "shared_enc.backbone.fc.weight", "foo",
                                 "shared_dec.upsamplex2.weight", "module.dom_classifier.weight"])
def test_keys_without_a_counterpart_map_to_none(key):
    assert convert.official_key_to_path(key) is None


def test_convert_tensor_layouts():
    rng = np.random.default_rng(3)
    conv = rng.normal(size=(5, 3, 3, 2, 1)).astype("float32")  # (out, in, kd, kh, kw)
    out = convert.convert_tensor("x.weight", conv)
    assert out.shape == (3, 2, 1, 3, 5)
    assert out[2, 1, 0, 1, 4] == conv[4, 1, 2, 1, 0]
    linear = rng.normal(size=(4, 6)).astype("float32")
    np.testing.assert_array_equal(convert.convert_tensor("dom_classifier.weight", linear), linear.T)
    vec = rng.normal(size=7)
    np.testing.assert_array_equal(convert.convert_tensor("n.bias", vec), vec.astype("float32"))
    assert convert.convert_tensor("n.bias", vec).dtype == np.float32


# -- loading ---------------------------------------------------------------------------------------------------------
def test_generated_tiny_state_dict_matches_the_models_variable_count(model, state_dict):
    assert len(state_dict) == len(model.weights)
    assert sum(v.size for v in state_dict.values()) == model.count_params()


def test_load_assigns_every_variable(model, state_dict):
    mapping = convert.load_official_state_dict(model, state_dict)
    assert set(mapping) == set(state_dict)
    assert sorted(mapping.values()) == sorted(v.path for v in model.weights)  # each variable exactly once
    values = snapshot(model)
    for key, path in mapping.items():
        np.testing.assert_array_equal(values[path], to_keras_layout(state_dict[key]), err_msg=key)


def test_load_specific_tensors(model, state_dict):
    convert.load_official_state_dict(model, state_dict)
    np.testing.assert_array_equal(var(model, "shared_encoder/trunk/stem/conv/conv/kernel"),
                                  np.transpose(state_dict["shared_enc.backbone.conv1.weight"], (2, 3, 4, 1, 0)))
    np.testing.assert_array_equal(var(model, "t2_encoder/trunk/stem/conv/conv/kernel"),
                                  np.transpose(state_dict["t2_enc.backbone.conv1.weight"], (2, 3, 4, 1, 0)))
    # ConvTranspose3d (in, out, k, k, k) -> Keras Conv3DTranspose (k, k, k, out, in)
    up3 = state_dict["shared_dec.transposeconv_stage3.weight"]
    np.testing.assert_array_equal(var(model, "decoder/up3/kernel"), np.transpose(up3, (2, 3, 4, 1, 0)))
    assert var(model, "decoder/up3/kernel").shape == (2, 2, 2, up3.shape[1], up3.shape[0])
    np.testing.assert_array_equal(var(model, "domain_classifier/dense/kernel"), state_dict["dom_classifier.weight"].T)
    np.testing.assert_array_equal(var(model, "domain_classifier/dense/bias"), state_dict["dom_classifier.bias"])
    np.testing.assert_array_equal(var(model, "flair_encoder/trunk/layer2_block0/unit1/norm/gamma"),
                                  state_dict["flair_enc.backbone.layer2.0.norm1.weight"])
    np.testing.assert_array_equal(var(model, "decoder/skip1/norm/beta"),
                                  state_dict["shared_dec.shortcut_conv1.1.bias"])
    np.testing.assert_array_equal(var(model, "fusion/proj/conv/kernel"),
                                  np.transpose(state_dict["compos_layer.conv.weight"], (2, 3, 4, 1, 0)))


def test_missing_key_raises_and_assigns_nothing(model, state_dict):
    before = snapshot(model)
    del state_dict["t1_enc.aspp.branch2.1.bias"]
    with pytest.raises(ValueError, match=r"1 model variable\(s\) not in the checkpoint"):
        convert.load_official_state_dict(model, state_dict)
    assert_unchanged(model, before)


def test_missing_key_with_strict_false_loads_the_rest(model, state_dict):
    before = snapshot(model)
    del state_dict["t1_enc.aspp.branch2.1.bias"]
    mapping = convert.load_official_state_dict(model, state_dict, strict=False)
    assert len(mapping) == len(model.weights) - 1
    after = snapshot(model)
    beta = "t1_encoder/aspp/branch2/norm/beta"
    np.testing.assert_array_equal(after[beta], before[beta])
    np.testing.assert_array_equal(after["t1_encoder/aspp/branch2/norm/gamma"],
                                  state_dict["t1_enc.aspp.branch2.1.weight"])


def test_shape_mismatch_raises_and_assigns_nothing(model, state_dict):
    before = snapshot(model)
    w = state_dict["shared_dec.cls_conv.0.weight"]
    state_dict["shared_dec.cls_conv.0.weight"] = np.zeros((w.shape[0] + 1, *w.shape[1:]), "float32")
    with pytest.raises(ValueError, match="shape mismatch"):
        convert.load_official_state_dict(model, state_dict)
    assert_unchanged(model, before)


def test_swapped_conv_layout_is_a_shape_mismatch(model, state_dict):
    """A Conv3d weight given in Keras layout (not PyTorch's) is refused rather than silently scrambled."""
    before = snapshot(model)
    key = "compos_layer.conv.weight"
    state_dict[key] = np.transpose(state_dict[key], (2, 3, 4, 1, 0)).copy()
    with pytest.raises(ValueError, match="shape mismatch"):
        convert.load_official_state_dict(model, state_dict)
    assert_unchanged(model, before)


@pytest.mark.parametrize("extra", ["multihead_attn.in_proj_weight", "shared_enc.backbone.layer1.7.conv1.weight"])
def test_unknown_extra_key_raises_and_assigns_nothing(model, state_dict, extra):
    before = snapshot(model)
    state_dict[extra] = np.zeros((4, 4), "float32")
    with pytest.raises(ValueError, match="without a counterpart"):
        convert.load_official_state_dict(model, state_dict)
    assert_unchanged(model, before)


def test_a_model_without_the_standardised_fusion_is_refused(state_dict):
    """Official weights in a model whose fusion projection is not weight-standardised would compute something else."""
    default = shaspec_tf.build_segmenter("tiny")
    before = snapshot(default)
    with pytest.raises(ValueError, match="official_parity=True"):
        convert.load_official_state_dict(default, state_dict)
    assert_unchanged(default, before)


# -- reading sources -------------------------------------------------------------------------------------------------
def test_npz_path_input(model, state_dict, tmp_path):
    path = tmp_path / "official.npz"
    np.savez(path, **state_dict)
    read = convert.read_state_dict(path)
    assert read.keys() == state_dict.keys()
    mapping = convert.load_official_state_dict(model, str(path))
    assert set(mapping) == set(state_dict)
    np.testing.assert_array_equal(var(model, "t1ce_encoder/aspp/project/conv/conv/kernel"),
                                  np.transpose(state_dict["t1ce_enc.aspp.conv_cat.0.weight"], (2, 3, 4, 1, 0)))


def test_missing_path_raises_file_not_found(model, tmp_path):
    with pytest.raises(FileNotFoundError):
        convert.load_official_state_dict(model, tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError):
        convert.read_state_dict(str(tmp_path / "nope.pth"))


def test_read_state_dict_from_mapping_converts_tensor_like_values():
    class FakeTorchTensor:
        def __init__(self, value):
            self.value = value

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.value

    source = {"a.weight": FakeTorchTensor(np.arange(6.0).reshape(2, 3)), "b.bias": [1.0, 2.0]}
    read = convert.read_state_dict(source)
    assert set(read) == {"a.weight", "b.bias"}
    np.testing.assert_array_equal(read["a.weight"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(read["b.bias"], [1.0, 2.0])


def test_read_state_dict_keeps_mapping_and_npz_keys_verbatim(tmp_path):
    """Only torch checkpoints are unwrapped ('model' nesting, 'module.' prefixes); mappings and .npz are read as
    given."""
    sd = {"module.dom_classifier.bias": np.ones(4, "float32")}
    assert set(convert.read_state_dict(sd)) == {"module.dom_classifier.bias"}
    np.savez(tmp_path / "m.npz", **sd)
    assert set(convert.read_state_dict(tmp_path / "m.npz")) == {"module.dom_classifier.bias"}


def test_pth_checkpoint_is_unnested_and_dataparallel_prefix_stripped(model, state_dict, tmp_path, monkeypatch):
    """A .pth read through torch.load (faked here): the official snapshots nest weights under 'model' and
    DataParallel prefixes keys with 'module.'."""
    path = tmp_path / "snapshot.pth"
    path.write_bytes(b"not read by the fake torch")
    saved = {"model": {f"module.{k}": v for k, v in state_dict.items()}, "optimizer": {}, "iter": 80000}
    calls = []

    def fake_load(p, map_location=None, weights_only=False):
        calls.append((str(p), map_location, weights_only))
        return saved

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=fake_load))
    read = convert.read_state_dict(path)
    assert calls == [(str(path), "cpu", True)]  # the safe loader first
    assert read.keys() == state_dict.keys()
    mapping = convert.load_official_state_dict(model, path)
    assert set(mapping) == set(state_dict)
    np.testing.assert_array_equal(var(model, "domain_classifier/dense/kernel"), state_dict["dom_classifier.weight"].T)


def test_official_training_snapshot_with_a_pickled_module_loads(model, state_dict, tmp_path, monkeypatch):
    """train_SS.py saves ``torch.save({'model': model, 'optimizer': optimizer, 'iter': i_iter}, 'final.pth')`` with
    ``model`` the module (DataParallel-wrapped when several GPUs are used); eval.py restores it as
    ``model = checkpoint['model']``. The weights are ``checkpoint['model'].state_dict()``."""
    class FakeModule:  # an nn.Module is not a Mapping; it has state_dict()
        def state_dict(self):
            return {f"module.{k}": v for k, v in state_dict.items()}

    path = tmp_path / "final.pth"
    path.write_bytes(b"not read by the fake torch")
    saved = {"model": FakeModule(), "optimizer": object(), "iter": 179_999}
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=lambda p, map_location=None, **kw: saved))
    mapping = convert.load_official_state_dict(model, path)
    assert set(mapping) == set(state_dict)
    np.testing.assert_array_equal(var(model, "domain_classifier/dense/bias"), state_dict["dom_classifier.bias"])


def test_pickled_snapshot_needs_trust_pickle(model, state_dict, tmp_path, monkeypatch):
    """A snapshot the safe loader refuses (a pickled module) is only unpickled with trust_pickle=True."""
    class FakeModule:
        def state_dict(self):
            return dict(state_dict)

    def fake_load(path, map_location=None, weights_only=True):
        if weights_only:
            raise RuntimeError("Weights only load failed: unsupported global DualNet_SS")
        return {"model": FakeModule(), "iter": 1}

    path = tmp_path / "final.pth"
    path.write_bytes(b"not read by the fake torch")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=fake_load))
    with pytest.raises(ValueError, match="trust_pickle=True"):
        convert.load_official_state_dict(model, path)
    assert set(convert.load_official_state_dict(model, path, trust_pickle=True)) == set(state_dict)


def test_pth_without_torch_raises_import_error(tmp_path, monkeypatch):
    path = tmp_path / "snapshot.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="npz"):
        convert.read_state_dict(path)


# -- end to end ------------------------------------------------------------------------------------------------------
def test_loaded_model_runs_and_domain_classifier_uses_the_official_linear(model, state_dict):
    convert.load_official_state_dict(model, state_dict)
    rng = np.random.default_rng(11)
    x = {"image": rng.normal(size=(2, *TINY["crop_size"], 4)).astype("float32"),
         "modality_mask": np.array([[1, 1, 1, 1], [0, 1, 0, 1]], "float32")}
    out = model(x)
    logits = to_numpy(out["logits"])
    assert logits.shape == (2, *TINY["crop_size"], 3)
    assert np.all(np.isfinite(logits))
    probe = keras.Model(model.inputs, model.get_layer("stack_pooled").output)
    pooled = to_numpy(probe(x)).astype(np.float64)  # [B, M, C]: each specific encoder's mean ASPP input
    assert pooled.shape == (2, 4, TINY["feature_channels"])
    expected = pooled @ state_dict["dom_classifier.weight"].T.astype(np.float64) + state_dict["dom_classifier.bias"]
    np.testing.assert_allclose(to_numpy(out["domain_logits"]), expected, rtol=1e-4, atol=1e-4)
