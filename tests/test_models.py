"""The ShaSpec models: presets, the modality mask contract, missing-feature generation, losses, gradients, XLA."""
import json

import keras
import numpy as np
import pytest

import shaspec_tf
from conftest import BACKEND, gradients, to_numpy
from shaspec_tf.models import build_model

OFFICIAL_PARAMETERS = 187_708_132  # DualNet_SS(norm_cfg='IN', weight_std=True, num_classes=3), counted from torch


def seg_inputs(rng, batch=2, shape=(32, 32, 32), masks=None):
    masks = np.ones((batch, 4), "float32") if masks is None else np.asarray(masks, "float32")
    return {"image": rng.normal(size=(batch, *shape, 4)).astype("float32"), "modality_mask": masks}


def cls_inputs(rng, batch=3, masks=None):
    masks = np.ones((batch, 2), "float32") if masks is None else np.asarray(masks, "float32")
    return {"image": rng.random((batch, 28, 28, 1), dtype="float32"),
            "audio": rng.normal(size=(batch, 20, 20, 1)).astype("float32"), "modality_mask": masks}


def probe(model, **layer_outputs):
    """A model exposing intermediate layer outputs by name."""
    return keras.Model(model.inputs, {key: model.get_layer(name).output for key, name in layer_outputs.items()})


# -- presets ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_paper_preset_matches_the_official_parameter_count():
    parity = shaspec_tf.build_segmenter("paper", official_parity=True)
    assert parity.count_params() == OFFICIAL_PARAMETERS
    default = shaspec_tf.build_segmenter("paper")
    assert abs(default.count_params() - 187.71e6) / 187.71e6 < 0.01
    spec = default.compute_output_spec({"image": keras.KerasTensor((1, 80, 160, 160, 4)),
                                        "modality_mask": keras.KerasTensor((1, 4))})
    assert tuple(spec["logits"].shape) == (1, 80, 160, 160, 3)
    assert tuple(spec["shared_features"].shape) == (1, 4, 5, 5, 5, 256)
    assert tuple(spec["domain_logits"].shape) == (1, 4, 4)


@pytest.mark.parametrize("preset,shape", [("tiny", (32, 32, 32)), ("small", (32, 64, 64))])
def test_segmenter_presets_output_shapes(preset, shape):
    model = shaspec_tf.build_segmenter(preset)
    c = model.shaspec_config
    out = model(seg_inputs(np.random.default_rng(0), batch=1, shape=shape))
    assert tuple(out["logits"].shape) == (1, *shape, 3)
    bottleneck = (shape[0] // 16, shape[1] // 32, shape[2] // 32)
    assert tuple(out["shared_features"].shape) == (1, 4, *bottleneck, c["feature_channels"])
    assert tuple(out["specific_features"].shape) == (1, 4, *bottleneck, c["feature_channels"])
    assert tuple(out["domain_logits"].shape) == (1, 4, 4)
    assert np.all(np.isfinite(to_numpy(out["logits"])))


def test_baseline_segmenter_has_no_specific_branch():
    model = shaspec_tf.build_baseline_segmenter("tiny")
    out = model(seg_inputs(np.random.default_rng(0)))
    assert set(out) == {"logits", "shared_features"}
    assert not any("encoder" in layer.name and layer.name != "shared_encoder" for layer in model.layers)
    assert model.count_params() < shaspec_tf.build_segmenter("tiny").count_params()


def test_concatenation_classifier_is_the_specific_encoders_and_the_head():
    """The plain late-fusion model: one encoder per modality, no shared encoder, no auxiliary loss; an absent
    modality's encoder sees zeros, so what that modality held cannot reach the logits."""
    model = shaspec_tf.build_classifier("avmnist-tiny", variant="concat")
    assert model.name == "concat_classifier_avmnist-tiny"
    names = {layer.name for layer in model.layers}
    assert {"image_trunk", "audio_trunk"} <= names and not any(n.startswith("shared") for n in names)
    x = cls_inputs(np.random.default_rng(3), masks=[[1, 0], [1, 1], [0, 1]])
    out = model(x)
    assert set(out) == {"logits", "specific_features"} and tuple(out["logits"].shape) == (3, 10)
    y = dict(x, audio=x["audio"] + 5.0)
    changed = np.abs(to_numpy(model(y)["logits"]) - to_numpy(out["logits"])).max(axis=1)
    assert changed[0] == 0.0 and changed[1] > 0 and changed[2] > 0     # audio absent in sample 0 only
    terms = model.loss_terms(x, np.array([1, 2, 3]), out)
    assert float(to_numpy(terms["alignment"])) == 0.0 and float(to_numpy(terms["domain"])) == 0.0
    assert model.count_params() < shaspec_tf.build_classifier("avmnist-tiny").count_params()
    with pytest.raises(ValueError, match="unknown variant 'concat' for the tiny preset"):
        shaspec_tf.build_segmenter("tiny", variant="concat")


@pytest.mark.parametrize("preset", ["avmnist", "avmnist-tiny"])
def test_classifier_presets_output_shapes(preset):
    model = shaspec_tf.build_classifier(preset)
    out = model(cls_inputs(np.random.default_rng(0), masks=[[1, 1], [1, 0], [0, 1]]))
    assert tuple(out["logits"].shape) == (3, 10)
    assert tuple(out["domain_logits"].shape) == (3, 2, 2)
    assert np.all(np.isfinite(to_numpy(out["logits"])))


def test_avmnist_classifier_is_near_the_papers_size():
    # Paper section 4.5: 0.22 M parameters.
    assert 0.18e6 <= shaspec_tf.build_classifier("avmnist").count_params() <= 0.26e6
    assert shaspec_tf.build_baseline_classifier("avmnist").count_params() < 0.22e6


def test_unknown_preset_and_option_are_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        shaspec_tf.build_segmenter("huge")
    with pytest.raises(ValueError, match="unknown option"):
        shaspec_tf.build_segmenter("tiny", missing_rul="mean")
    with pytest.raises(ValueError, match="missing-feature rule"):
        shaspec_tf.build_segmenter("tiny", missing_rule="median")


def test_official_parity_switches_to_the_official_behaviour():
    c = shaspec_tf.build_segmenter("tiny", official_parity=True).shaspec_config
    assert (c["missing_rule"], c["masked_aux_losses"], c["symmetric_padding"]) == ("first", False, True)
    d = shaspec_tf.build_segmenter("tiny").shaspec_config
    assert (d["missing_rule"], d["masked_aux_losses"], d["symmetric_padding"]) == ("mean", True, False)


# -- the modality mask ------------------------------------------------------------------------------------------------
def test_absent_modality_values_change_no_output_segmenter():
    model = shaspec_tf.build_segmenter("tiny")
    rng = np.random.default_rng(1)
    a = seg_inputs(rng, masks=[[1, 0, 1, 0], [0, 1, 1, 1]])
    b = {"image": a["image"].copy(), "modality_mask": a["modality_mask"]}
    b["image"][0, ..., 1] = rng.normal(size=b["image"].shape[1:4]) * 50
    b["image"][0, ..., 3] = np.nan
    b["image"][1, ..., 0] = np.inf
    out_a, out_b = model(a), model(b)
    for key in ("logits", "domain_logits"):
        np.testing.assert_allclose(to_numpy(out_a[key]), to_numpy(out_b[key]), rtol=1e-6, atol=1e-6)
    # while changing a present modality does change the prediction
    c = {"image": a["image"].copy(), "modality_mask": a["modality_mask"]}
    c["image"][0, ..., 0] += 1.0
    assert not np.allclose(to_numpy(model(c)["logits"])[0], to_numpy(out_a["logits"])[0])


def test_absent_modality_values_change_no_output_classifier():
    model = shaspec_tf.build_classifier("avmnist")
    rng = np.random.default_rng(2)
    a = cls_inputs(rng, masks=[[1, 0], [0, 1], [1, 1]])
    b = dict(a, audio=a["audio"].copy(), image=a["image"].copy())
    b["audio"][0] = np.nan
    b["image"][1] = 7.0
    np.testing.assert_allclose(to_numpy(model(a)["logits"]), to_numpy(model(b)["logits"]), rtol=1e-6, atol=1e-6)


def test_mean_rule_fills_absent_slots_with_the_mean_of_present_shared_features():
    model = shaspec_tf.build_segmenter("tiny")
    view = probe(model, shared="unfold_shared", fused="unfold_fused", completed="missing_features")
    masks = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], "float32")
    out = {k: to_numpy(v) for k, v in view(seg_inputs(np.random.default_rng(3), batch=3, masks=masks)).items()}
    for b, mask in enumerate(masks):
        present = mask > 0
        expected = out["shared"][b][present].mean(axis=0)
        for m in range(4):
            want = out["fused"][b, m] if present[m] else expected
            np.testing.assert_allclose(out["completed"][b, m], want, rtol=1e-5, atol=1e-5)


def test_first_rule_uses_the_first_present_modality():
    model = shaspec_tf.build_segmenter("tiny", missing_rule="first")
    view = probe(model, shared="unfold_shared", completed="missing_features")
    masks = np.array([[0, 1, 0, 1], [0, 0, 1, 1]], "float32")
    out = {k: to_numpy(v) for k, v in view(seg_inputs(np.random.default_rng(4), masks=masks)).items()}
    np.testing.assert_allclose(out["completed"][0, 0], out["shared"][0, 1], rtol=1e-6)
    np.testing.assert_allclose(out["completed"][0, 2], out["shared"][0, 1], rtol=1e-6)
    np.testing.assert_allclose(out["completed"][1, 1], out["shared"][1, 2], rtol=1e-6)


@pytest.mark.parametrize("build", [lambda: shaspec_tf.build_segmenter("tiny"),
                                   lambda: shaspec_tf.build_classifier("avmnist-tiny")])
def test_invalid_masks_raise_a_clear_error(build):
    model = build()
    m = len(model.modalities)
    rng = np.random.default_rng(5)
    inputs = seg_inputs(rng) if m == 4 else cls_inputs(rng, batch=2)
    with pytest.raises(ValueError, match=r"all zero for sample\(s\) \[1\]"):
        model(dict(inputs, modality_mask=np.array([[1] * m, [0] * m], "float32")))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(dict(inputs, modality_mask=np.full((2, m), 0.5, "float32")))
    with pytest.raises(ValueError, match="must have shape"):
        model(dict(inputs, modality_mask=np.ones((2, m + 1), "float32")))


def test_volume_shape_errors_name_the_problem():
    model = shaspec_tf.build_segmenter("tiny")
    with pytest.raises(ValueError, match="divisible by"):
        model({"image": np.zeros((1, 32, 30, 32, 4), "float32"), "modality_mask": np.ones((1, 4), "float32")})
    with pytest.raises(ValueError, match="modality channels"):
        model({"image": np.zeros((1, 32, 32, 32, 3), "float32"), "modality_mask": np.ones((1, 4), "float32")})
    with pytest.raises(ValueError, match="1x1x1 bottleneck"):
        model({"image": np.zeros((1, 16, 32, 32, 4), "float32"), "modality_mask": np.ones((1, 4), "float32")})


def test_batch_of_one_works():
    model = shaspec_tf.build_segmenter("tiny")
    out = model(seg_inputs(np.random.default_rng(6), batch=1, masks=[[0, 0, 1, 0]]))
    assert np.all(np.isfinite(to_numpy(out["logits"])))


# -- losses through the model ----------------------------------------------------------------------------------------
def test_auxiliary_losses_ignore_absent_modalities_by_default():
    rng = np.random.default_rng(7)
    x = seg_inputs(rng, masks=[[1, 1, 0, 0], [1, 1, 1, 0]])
    y = (rng.random((2, 32, 32, 32, 3)) > 0.5).astype("float32")
    for parity, should_change in ((False, False), (True, True)):
        model = shaspec_tf.build_segmenter("tiny", official_parity=parity)
        out = {k: to_numpy(v) for k, v in model(x).items()}
        moved = dict(out)
        moved["shared_features"] = out["shared_features"].copy()
        moved["shared_features"][:, 3] += 5.0  # T2 is absent in both samples
        moved["domain_logits"] = out["domain_logits"].copy()
        moved["domain_logits"][:, 3] = [9.0, -9.0, 0.0, 0.0]
        before = {k: float(to_numpy(v)) for k, v in model.loss_terms(x, y, out).items()}
        after = {k: float(to_numpy(v)) for k, v in model.loss_terms(x, y, moved).items()}
        for term in ("alignment", "domain"):
            assert (abs(before[term] - after[term]) > 1e-3) == should_change, (parity, term)
        assert before["task"] == pytest.approx(after["task"])
        total = before["task"] + 0.1 * before["alignment"] + 0.02 * before["domain"]
        assert before["total"] == pytest.approx(total, rel=1e-5)


def test_baseline_has_no_auxiliary_losses():
    model = shaspec_tf.build_baseline_segmenter("tiny")
    rng = np.random.default_rng(8)
    x = seg_inputs(rng)
    terms = model.loss_terms(x, np.zeros((2, 32, 32, 32, 3), "float32"), model(x))
    assert float(to_numpy(terms["alignment"])) == 0.0 and float(to_numpy(terms["domain"])) == 0.0


# -- gradients --------------------------------------------------------------------------------------------------------
def _nonzero_gradients(model, x, y):
    grads = gradients(model, x, lambda out: model.loss_terms(x, y, out)["total"])
    return {v.path: g is not None and bool(np.any(g != 0)) for v, g in zip(model.trainable_variables, grads)}


def test_gradients_reach_every_trainable_weight():
    rng = np.random.default_rng(9)
    model = shaspec_tf.build_segmenter("tiny")
    x = seg_inputs(rng, batch=2, shape=(32, 64, 64))  # a 2x2x2 bottleneck: instance norm is not degenerate there
    y = (rng.random((2, 32, 64, 64, 3)) > 0.7).astype("float32")
    reached = _nonzero_gradients(model, x, y)
    assert [path for path, ok in reached.items() if not ok] == []


def test_fused_features_keep_the_shared_scale_at_initialisation():
    """The default fusion keeps the fused features at the shared features' scale; the official standardised
    projection is tens of times larger than r, which drowns the shared feature and the decoder's skips at the
    start of training."""
    x = seg_inputs(np.random.default_rng(15), batch=1, shape=(32, 64, 64))
    ratios = {}
    for init in ("glorot_uniform", "zeros", "standardised"):
        model = shaspec_tf.build_segmenter("tiny", fusion_init=init)
        out = probe(model, shared="unfold_shared", fused="unfold_fused")(x)
        ratios[init] = float(np.std(to_numpy(out["fused"])) / np.std(to_numpy(out["shared"])))
    assert shaspec_tf.build_segmenter("tiny").shaspec_config["fusion_init"] == "glorot_uniform"
    assert 0.5 < ratios["glorot_uniform"] < 2.5
    assert ratios["zeros"] == pytest.approx(1.0, abs=1e-6)
    assert ratios["standardised"] > 10
    assert shaspec_tf.build_segmenter("tiny", official_parity=True).shaspec_config["fusion_init"] == "standardised"


def test_official_parity_image_pool_branch_gets_no_gradient():
    # Documented property of the official ASPP: instance norm on the 1x1x1 image-pool tensor returns its offset,
    # so the branch's convolution and scale are dead weights. The default configuration removes that norm.
    rng = np.random.default_rng(10)
    model = shaspec_tf.build_segmenter("tiny", official_parity=True)
    x = seg_inputs(rng, batch=1, shape=(32, 64, 64))
    y = (rng.random((1, 32, 64, 64, 3)) > 0.7).astype("float32")
    dead = sorted(path for path, ok in _nonzero_gradients(model, x, y).items() if not ok)
    assert dead and all("aspp/image_pool/" in p and p.endswith(("conv/conv/kernel", "norm/gamma")) for p in dead)


@pytest.mark.parametrize("variant", ["shaspec", "baseline"])
def test_absent_modalities_keep_the_gradient_bounded(variant):
    """An absent modality's zero input gives (near-)constant shared maps, and every instance norm of such a map
    multiplies the gradient by up to 1/sqrt(eps): with the official code's skips the shared stem's gradient reached
    5e5 under TensorFlow and 4e17 under JAX. By default the decoder gets the same values with no gradient back."""
    rng = np.random.default_rng(16)
    x = seg_inputs(rng, batch=2, shape=(32, 64, 64), masks=[[1, 0, 0, 0], [0, 1, 0, 1]])
    y = (rng.random((2, 32, 64, 64, 3)) > 0.7).astype("float32")
    largest, logits = {}, {}
    for absent in ("zeros", "detached", "encoded"):
        keras.utils.set_random_seed(5)
        model = shaspec_tf.build_segmenter("tiny", variant=variant, absent_features=absent)
        grads = gradients(model, x, lambda out: model.loss_terms(x, y, out)["total"])
        largest[absent] = max(float(np.max(np.abs(g))) for g in grads if g is not None)
        for v in model.trainable_variables:  # offsets as training leaves them: at zero, zeros in give zeros out
            if v.path.startswith("shared_encoder/") and v.path.endswith("/beta"):
                v.assign(np.full(v.shape, 0.1, "float32"))
        logits[absent] = to_numpy(model(x)["logits"])
    assert largest["zeros"] < 10 and largest["detached"] < 10, largest
    assert largest["encoded"] > 1e3, largest  # the official route: what the other two avoid
    np.testing.assert_array_equal(logits["detached"], logits["encoded"])  # the same values, only no gradient
    assert np.max(np.abs(logits["zeros"] - logits["encoded"])) > 1e-3


def test_absent_features_default_official_parity_and_older_configs():
    assert shaspec_tf.build_segmenter("tiny").shaspec_config["absent_features"] == "detached"
    assert shaspec_tf.build_segmenter("tiny", official_parity=True).shaspec_config["absent_features"] == "encoded"
    config = json.loads(shaspec_tf.build_segmenter("tiny").config_json())
    del config["absent_features"]  # a model saved before the option: trained on the encoded zeros
    assert build_model(config).shaspec_config["absent_features"] == "encoded"
    with pytest.raises(ValueError, match="unknown absent_features 'nan'.*zeros, detached, encoded"):
        shaspec_tf.build_segmenter("tiny", absent_features="nan")


def test_absent_skips_reach_the_decoder_as_zeros():
    model = shaspec_tf.build_segmenter("tiny", absent_features="zeros")
    x = seg_inputs(np.random.default_rng(17), masks=[[1, 0, 1, 0], [0, 1, 1, 1]])
    skips = probe(model, **{f"s{i}": f"mask_skip{i}" for i in range(4)})(x)
    for i in range(4):
        s = to_numpy(skips[f"s{i}"])  # [B, M, ...]
        for b, mask in enumerate(x["modality_mask"]):
            for m, present in enumerate(mask):
                assert np.all(s[b, m] == 0) != bool(present), (i, b, m)


def test_classifier_gradients_reach_every_trainable_weight():
    rng = np.random.default_rng(11)
    model = shaspec_tf.build_classifier("avmnist-tiny")
    x = cls_inputs(rng, batch=4, masks=[[1, 1], [1, 1], [1, 0], [0, 1]])
    y = np.array([1, 2, 3, 4])
    reached = _nonzero_gradients(model, x, y)
    assert [path for path, ok in reached.items() if not ok] == []


# -- training, compilation, persistence -------------------------------------------------------------------------------
def test_fit_trains_and_reports_each_loss_term():
    rng = np.random.default_rng(12)
    model = shaspec_tf.build_segmenter("tiny")
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True), run_eagerly=True)
    x = seg_inputs(rng, batch=2, masks=[[1, 1, 1, 1], [0, 1, 0, 1]])
    y = (rng.random((2, 32, 32, 32, 3)) > 0.5).astype("float32")
    before = [to_numpy(v).copy() for v in model.trainable_variables]
    history = model.fit(x, y, epochs=2, batch_size=2, verbose=0).history
    for key in ("loss", "task_loss", "alignment_loss", "domain_loss"):
        assert len(history[key]) == 2 and all(np.isfinite(history[key]))
    assert history["loss"][0] == pytest.approx(history["task_loss"][0] + 0.1 * history["alignment_loss"][0]
                                               + 0.02 * history["domain_loss"][0], rel=1e-4)
    # Every weight receives a gradient (tested above); a few norm offsets move by less than float32 resolves
    # in two steps, so check the bulk and the heads.
    changed = {v.path: not np.array_equal(b, to_numpy(v)) for b, v in zip(before, model.trainable_variables)}
    assert sum(changed.values()) >= 0.8 * len(changed)
    assert changed["decoder/head/kernel"] and changed["domain_classifier/dense/kernel"]
    assert changed["fusion/proj/conv/kernel"]


@pytest.mark.slow
def test_one_xla_graph_serves_every_modality_subset():
    model = shaspec_tf.build_segmenter("tiny")
    rng = np.random.default_rng(13)
    x = seg_inputs(rng, batch=2)
    subsets = [[[1, 1, 1, 1], [1, 0, 0, 0]], [[0, 1, 0, 1], [0, 0, 1, 1]], [[0, 0, 0, 1], [1, 1, 1, 0]]]
    traces = []
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def forward(image, mask):
            traces.append(1)
            return model({"image": image, "modality_mask": mask})["logits"]

        run = lambda mask: forward(tf.constant(x["image"]), tf.constant(np.asarray(mask, "float32")))  # noqa: E731
    else:
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward(image, mask):
            traces.append(1)
            out, _ = model.stateless_call(trainable, non_trainable, {"image": image, "modality_mask": mask})
            return out["logits"]

        run = lambda mask: forward(x["image"], np.asarray(mask, "float32"))  # noqa: E731
    for mask in subsets:
        compiled = to_numpy(run(mask))
        eager = to_numpy(model({"image": x["image"], "modality_mask": np.asarray(mask, "float32")})["logits"])
        np.testing.assert_allclose(compiled, eager, rtol=1e-3, atol=1e-3)
    assert len(traces) == 1


def test_configs_saved_before_fusion_init_rebuild_with_the_standardised_projection():
    config = json.loads(shaspec_tf.build_segmenter("tiny").config_json())
    del config["fusion_init"]
    assert build_model(config).shaspec_config["fusion_init"] == "standardised"


def test_weights_round_trip_through_the_saved_config(tmp_path):
    model = shaspec_tf.build_segmenter("tiny", missing_rule="first", fusion_kernel=1)
    x = seg_inputs(np.random.default_rng(14), masks=[[1, 0, 0, 1], [1, 1, 1, 1]])
    model.save_weights(tmp_path / "m.weights.h5")
    rebuilt = build_model(json.loads(model.config_json()))
    assert rebuilt.shaspec_config == model.shaspec_config
    rebuilt.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_allclose(to_numpy(rebuilt(x)["logits"]), to_numpy(model(x)["logits"]), rtol=1e-6)


# -- one-file saving (.keras) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,inputs", [
    (lambda: shaspec_tf.build_segmenter("tiny", missing_rule="first", fusion_kernel=1), seg_inputs),
    (lambda: shaspec_tf.build_classifier("avmnist-tiny"), cls_inputs),
    (lambda: shaspec_tf.build_baseline_classifier("avmnist-tiny"), cls_inputs),
], ids=["tiny-segmenter", "avmnist-tiny", "avmnist-tiny-baseline"])
def test_models_save_and_load_as_one_keras_file(tmp_path, build, inputs):
    model = build()
    x = inputs(np.random.default_rng(15))
    x["modality_mask"][0, 0] = 0.0  # one sample with a missing modality
    # Weights that are not the initial ones, so that a rebuilt-but-not-loaded model cannot pass.
    for variable in model.weights:
        variable.assign(to_numpy(variable) + np.random.default_rng(16).normal(0, 0.01, variable.shape))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: the classes are registered
    assert type(loaded) is type(model) and loaded.name == model.name
    assert loaded.shaspec_config == model.shaspec_config
    expected, got = model(x), loaded(x)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(to_numpy(got[key]), to_numpy(expected[key]), rtol=1e-6, atol=1e-6, err_msg=key)
    assert keras.saving.get_registered_name(type(model)) == f"shaspec_tf>{type(model).__name__}"


def test_save_model_writes_one_file_that_load_model_reads(tmp_path):
    from shaspec_tf.models import KERAS_FILE, load_model, save_model

    model = shaspec_tf.build_classifier("avmnist-tiny")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = cls_inputs(np.random.default_rng(17))
    model.fit(x, np.arange(3), epochs=1, verbose=0)  # optimizer state to save as well
    run = tmp_path / "run"
    path = save_model(model, str(run))  # a folder: model.keras inside it
    assert path == str(run / KERAS_FILE) and sorted(p.name for p in run.iterdir()) == [KERAS_FILE]
    assert save_model(model, str(run / KERAS_FILE)) == path  # replaced in place, nothing left beside it
    assert sorted(p.name for p in run.iterdir()) == [KERAS_FILE]
    loaded = load_model(str(run))
    np.testing.assert_allclose(to_numpy(loaded(x)["logits"]), to_numpy(model(x)["logits"]), rtol=1e-6, atol=1e-6)
    assert loaded.optimizer is not None and loaded.optimizer.iterations.numpy() == 1
    bare = load_model(save_model(model, str(tmp_path / "bare.keras"), include_optimizer=False))
    assert getattr(bare, "optimizer", None) is None and model.optimizer is not None  # the saved model is unchanged
    np.testing.assert_allclose(to_numpy(bare(x)["logits"]), to_numpy(model(x)["logits"]), rtol=1e-6, atol=1e-6)
    assert (tmp_path / "bare.keras").stat().st_size < (run / KERAS_FILE).stat().st_size
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "garbage.keras").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.keras"):
        load_model(str(tmp_path / "garbage.keras"))
    with pytest.raises(TypeError):
        save_model(keras.Sequential([keras.layers.Dense(1)]), str(tmp_path / "other.keras"))
    # A model's own name survives the round trip.
    named = type(model)(model.shaspec_config, name="digits")  # never compiled
    assert load_model(save_model(named, str(tmp_path / "named.keras")), compile=False).name == "digits"
    assert load_model(save_model(named, str(tmp_path / "named.keras"), include_optimizer=False)).name == "digits"
