"""The segmenter's ``remat`` option (issue 16): recomputing the encoders (and the decoder) in the backward pass
changes no value and no gradient, only what the backward pass keeps; it survives the model's config; bad values
are one-line errors. Run under TensorFlow and under ``KERAS_BACKEND=jax``."""
import json

import keras
import numpy as np
import pytest

import shaspec_tf
from conftest import BACKEND, gradients, to_numpy
from shaspec_tf.models import build_model, load_model, save_model
from shaspec_tf.layers import Encoder3D
from shaspec_tf.models.segmenter import RecomputedDecoder3D, RecomputedEncoder3D

SHAPE = (32, 64, 64)  # a 2x2x2 bottleneck for the tiny preset


def _inputs(seed=0, masks=((1, 0, 1, 1),)):
    rng = np.random.default_rng(seed)
    masks = np.asarray(masks, "float32")
    image = rng.normal(size=(len(masks),) + SHAPE + (4,)).astype("float32")
    target = (rng.random((len(masks),) + SHAPE + (3,)) > 0.7).astype("float32")
    return {"image": image, "modality_mask": masks}, target


def _twins(*modes):
    """The tiny segmenter without remat and with each of ``modes``, all with the first one's weights."""
    plain = shaspec_tf.build_segmenter("tiny")
    others = []
    for mode in modes:
        model = shaspec_tf.build_segmenter("tiny", remat=mode)
        model.set_weights(plain.get_weights())
        others.append(model)
    return plain, others


@pytest.fixture(scope="module")
def reference():
    """The plain tiny segmenter, a batch, its training outputs, loss and gradients (eager / ``jax.grad``)."""
    keras.utils.set_random_seed(5)
    plain = shaspec_tf.build_segmenter("tiny")
    # Every modality present: an absent one's zero input reaches the decoder through the shared encoder's skips as
    # near-constant maps, whose instance norms amplify float32 noise in the gradients (the shared stem's norm offsets
    # get 1e5-1e17, differing between runs), which would make any two gradient computations disagree.
    x, y = _inputs(1, masks=((1, 1, 1, 1),))
    out = {k: to_numpy(v) for k, v in plain(x, training=True).items()}
    loss = float(to_numpy(plain.loss_terms(x, y, out)["total"]))
    grads = gradients(plain, x, lambda o: plain.loss_terms(x, y, o)["total"])
    return plain, x, y, out, loss, grads


def _assert_gradients_close(model, grads, expected, atol=0.0):
    """Per weight, within 1% of its largest gradient, plus 1e-6 of the largest gradient of all (weights whose exact
    gradient is zero get float32 noise) plus ``atol``. A recomputed pass rounds in another order: under JAX the
    gradients of the tiny model then differ by up to 0.4% of a weight's largest one; a wrong gradient by O(1)."""
    floor = 1e-6 * max(float(np.max(np.abs(e))) for e in expected if e is not None) + atol
    for v, g, e in zip(model.trainable_variables, grads, expected):
        assert (g is None) == (e is None), v.path
        if e is not None:
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-2 * float(np.max(np.abs(e))) + floor, err_msg=v.path)


def test_recomputing_encoders_and_decoder_changes_no_output_and_no_gradient(reference):
    plain, x, y, expected_out, _, expected = reference
    model = shaspec_tf.build_segmenter("tiny", remat="all")
    model.set_weights(plain.get_weights())
    assert [v.path for v in model.trainable_variables] == [v.path for v in plain.trainable_variables]
    out = model(x, training=True)
    for key, value in expected_out.items():
        np.testing.assert_allclose(to_numpy(out[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
    _assert_gradients_close(model, gradients(model, x, lambda o: model.loss_terms(x, y, o)["total"]), expected)
    # built of the recomputing layers: every encoder and the decoder
    assert sorted(layer.name for layer in model.layers if isinstance(layer, RecomputedEncoder3D)) == [
        "flair_encoder", "shared_encoder", "t1_encoder", "t1ce_encoder", "t2_encoder"]
    assert isinstance(model.get_layer("decoder"), RecomputedDecoder3D)


@pytest.mark.slow
def test_a_training_step_with_recomputed_encoders_is_the_plain_one(reference):
    """Keras' own train step (in a ``tf.function`` under TensorFlow, where keras.RematScope fails: tf.recompute_grad
    refuses the ``training`` keyword in graph mode): the same loss and the same new weights as the plain model's
    step. (Compared step to step: a graph's gradients differ from eager ones by float32 rounding, which the
    near-zero gradients of the biases before instance norms make large in relative terms.)"""
    plain, x, y, _, loss, _ = reference
    steps = []
    for mode in ("none", "encoders"):
        model = shaspec_tf.build_segmenter("tiny", remat=mode)
        model.set_weights(plain.get_weights())
        model.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=False)
        logs = model.train_on_batch(x, y, return_dict=True)
        assert logs["loss"] == pytest.approx(loss, rel=1e-5)
        steps.append([w - to_numpy(v) for w, v in zip(plain.get_weights(), model.trainable_variables)])
    assert not isinstance(model.get_layer("decoder"), RecomputedDecoder3D)
    _assert_gradients_close(model, steps[1], steps[0], atol=5e-7)  # 4 float32 ulps of a weight near 1


def test_the_backward_pass_keeps_less_with_remat(monkeypatch):
    """What remat is for: the encoders' insides are recomputed instead of kept. Under JAX, the residuals that the
    linearised loss keeps (weights apart) shrink; under TensorFlow, each encoder runs again in the backward pass."""
    plain, (remat,) = _twins("encoders")
    x, y = _inputs(2)
    if BACKEND == "jax":
        import jax

        def kept_bytes(model):
            non_trainable = [v.value for v in model.non_trainable_variables]

            def loss(values):
                out, _ = model.stateless_call(values, non_trainable, x, training=True)
                return model.loss_terms(x, y, out)["total"]

            values = [v.value for v in model.trainable_variables]
            jaxpr = jax.make_jaxpr(lambda v: jax.linearize(loss, v)[1])(values).jaxpr
            inputs = set(jaxpr.invars)
            kept = {v for v in jaxpr.outvars if isinstance(v, jax.core.Var) and v not in inputs}
            return sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in kept)

        before, after = kept_bytes(plain), kept_bytes(remat)
        assert after < 0.6 * before, (before, after)
    else:
        calls = {}
        call = Encoder3D.call

        def counting(self, inputs, training=None):
            calls[self.name] = calls.get(self.name, 0) + 1
            return call(self, inputs, training=training)

        monkeypatch.setattr(Encoder3D, "call", counting)
        for model, runs in ((plain, 1), (remat, 2)):  # remat: the forward, then the recomputation in the backward
            calls.clear()
            gradients(model, x, lambda out: model.loss_terms(x, y, out)["total"])
            assert calls == {name: runs for name in ("shared_encoder", "flair_encoder", "t1_encoder", "t1ce_encoder",
                                                     "t2_encoder")}, calls


def test_remat_round_trips_through_the_model_config(tmp_path):
    model = shaspec_tf.build_segmenter("tiny", remat="encoders")
    assert model.shaspec_config["remat"] == "encoders"
    rebuilt = build_model(json.loads(model.config_json()))  # what model_config.json holds
    assert rebuilt.shaspec_config["remat"] == "encoders"
    assert isinstance(rebuilt.get_layer("shared_encoder"), RecomputedEncoder3D)
    # the weights are those of the plain model: a checkpoint trained either way loads into the other
    loaded = load_model(save_model(model, str(tmp_path / "m.keras")))
    assert loaded.shaspec_config == model.shaspec_config
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # configs saved before the option existed rebuild without remat
    legacy = json.loads(shaspec_tf.build_segmenter("tiny").config_json())
    del legacy["remat"]
    assert build_model(legacy).shaspec_config["remat"] == "none"


@pytest.mark.parametrize("overrides, message", [
    (dict(remat="decoder"), "unknown remat 'decoder' for the tiny preset: expected one of none, encoders, all"),
    (dict(remat="encoders", norm="batch"), "remat='encoders' needs a stateless norm"),
])
def test_bad_remat_values_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as error:
        shaspec_tf.build_segmenter("tiny", **overrides)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown option"):
        shaspec_tf.build_classifier("avmnist-tiny", remat="encoders")
