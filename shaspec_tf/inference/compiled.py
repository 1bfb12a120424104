"""The one backend-specific place of the inference code: compile :func:`~shaspec_tf.inference.window.
window_probabilities` together with a model, as one ``jax.jit`` (JAX backend) or one ``tf.function`` graph
(TensorFlow backend), and keep the compiled function per model so that later volumes and masks reuse it.

* JAX: ``jax.jit`` of ``(model state, image, mask, flips) -> probabilities``; the model runs through
  ``stateless_call`` on the variable values passed in at each call (so the compiled function never holds stale
  weights, and the weights are not baked into the program as constants). Shapes are static: one compilation per
  volume size (and per number of flips), cached by ``jax.jit`` itself; the mask is a runtime argument.
* TensorFlow: ``tf.function`` with the input signature ``image [None, None, None, M]``, ``mask [M]``,
  ``flips [None, 3]``: traced once per model and settings, whatever the volume size or mask (the dynamic-shape
  path of the ``segment_volume`` serving signature). The model's variables are captured by reference. The graph
  runs without XLA (``jit_compile`` off), as TF Serving runs the exported signature.

Only the model's ``"logits"`` output is kept inside the compiled function; nothing else comes back to the host.
"""
from __future__ import annotations

import atexit
import functools
import weakref

__all__ = ["logits_of", "logits_spec", "volume_function"]

# model -> {settings: compiled function}. Weak keys: a model that goes away takes its compiled functions with it
# (the functions reference the model weakly for the same reason).
# A model that cannot be weakly referenced (rare: plain functions and objects can) is compiled at each call.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
atexit.register(_CACHE.clear)  # drop tf.functions before interpreter teardown (TF's __del__ fails after it)


def logits_of(outputs):
    """The ``"logits"`` entry of a model's outputs (or the outputs themselves when they are not a dict)."""
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"model outputs must hold 'logits', got keys {sorted(outputs)}")
        return outputs["logits"]
    return outputs


def _call(model, inputs):
    import keras

    return model(inputs, training=False) if isinstance(model, keras.Layer) else model(inputs)


@functools.lru_cache(maxsize=None)
def _traced_layer_class():
    """A Keras layer that calls a plain function: its ``compute_output_spec`` traces the function the way Keras
    traces layers (``jax.eval_shape``, a TF graph). Made on first use, so that importing this module does not
    import Keras."""
    import keras

    class Traced(keras.Layer):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def call(self, inputs):
            return self.fn(inputs)

    return Traced


def logits_spec(model, batch: int, roi: tuple, num_modalities: int):
    """The shape ``[batch, *roi, C]`` of the model's logits for a batch of tiles, found symbolically (no compute);
    a one-line ``ValueError`` when the model gives anything else."""
    import keras

    inputs = {"image": keras.KerasTensor((batch,) + tuple(roi) + (num_modalities,), "float32"),
              "modality_mask": keras.KerasTensor((batch, num_modalities), "float32")}
    if isinstance(model, keras.Layer):
        outputs = model.compute_output_spec(inputs, training=False)
    else:  # any callable: traced by the backend (jax.eval_shape, a TF graph), as Keras does for layers
        outputs = _traced_layer_class()(model).compute_output_spec(inputs)
    shape = tuple(logits_of(outputs).shape)
    if len(shape) != 5 or shape[:4] != (batch,) + tuple(roi) or shape[4] is None:
        raise ValueError(f"model logits must have shape [batch, {roi[0]}, {roi[1]}, {roi[2]}, classes] for input "
                         f"tiles {inputs['image'].shape}, got {shape}")
    return shape


def _compile(model, settings: dict):
    import keras

    from shaspec_tf.inference.window import window_probabilities

    ref = _reference(model)
    backend = keras.backend.backend()
    m = settings.pop("num_modalities")
    if backend == "jax":
        import jax

        def probabilities(state, image, mask, flips):
            model = ref()
            trainable, non_trainable = state

            def logits_fn(tiles, masks):
                inputs = {"image": tiles, "modality_mask": masks}
                if isinstance(model, keras.Layer):
                    outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=False)
                else:
                    outputs = model(inputs)
                return logits_of(outputs)

            return window_probabilities(logits_fn, image, mask, flips, **settings)

        jitted = jax.jit(probabilities)

        def run(image, mask, flips):
            model = ref()
            state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]) \
                if isinstance(model, keras.Layer) else ((), ())
            return jitted(state, image, mask, flips)

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, m], tf.float32),
                                      tf.TensorSpec([m], tf.float32), tf.TensorSpec([None, 3], tf.int32)])
        def run(image, mask, flips):
            model = ref()
            return window_probabilities(lambda tiles, masks: logits_of(_call(model, {"image": tiles,
                                                                                       "modality_mask": masks})),
                                        image, mask, flips, **settings)

        return run
    raise NotImplementedError(f"sliding-window inference runs on the jax and tensorflow backends, not {backend!r}")


def _reference(model):
    try:
        return weakref.ref(model)
    except TypeError:
        return lambda: model


def volume_function(model, *, roi_size, num_modalities, overlap, mode, sigma_scale, sw_batch_size):
    """``run(image float32 [D, H, W, M], mask float32 [M], flips int32 [F, 3]) -> probabilities [D, H, W, C]``
    (a backend tensor): :func:`~shaspec_tf.inference.window.window_probabilities` of ``model``, compiled for the
    active backend, made once per model and settings and then reused. The model's logits are checked
    symbolically (:func:`logits_spec`, a one-line ``ValueError``) when the function is made."""
    import keras

    from shaspec_tf.inference.window import sigma_scales

    settings = {"roi_size": tuple(int(r) for r in roi_size), "num_modalities": int(num_modalities),
                "overlap": float(overlap), "mode": mode, "sigma_scale": sigma_scales(sigma_scale),
                "sw_batch_size": int(sw_batch_size)}
    key = (keras.backend.backend(),) + tuple(sorted(settings.items()))
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weakly referenceable: nothing is kept
        per_model = {}
    if key not in per_model:
        shape = logits_spec(model, settings["sw_batch_size"], settings["roi_size"], settings["num_modalities"])
        per_model[key] = _compile(model, dict(settings, num_classes=shape[-1]))
    return per_model[key]
