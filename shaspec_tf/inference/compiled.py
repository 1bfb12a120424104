"""The one backend-specific place of the inference code: compile :func:`~shaspec_tf.inference.window.
window_probabilities` together with a model, as one ``jax.jit`` (JAX backend) or one ``tf.function`` graph
(TensorFlow backend), and keep the compiled function per model so that later volumes and masks reuse it.

* JAX: ``jax.jit`` of ``(model state, image, mask, size, flips) -> probabilities``; the model runs through
  ``stateless_call`` on the variable values passed in at each call (so the compiled function never holds stale
  weights, and the weights are not baked into the program as constants). The volume goes to the device as it is,
  is zero-padded there to :func:`compile_extent` (each axis rounded up to half a window) and its true size is a
  runtime input, so one compilation serves every volume of that extent, every mask and every set of weights
  (``jax.jit``'s own cache, keyed by the extent and whether there are flips); the probabilities are cropped on
  the device and only they come back. The windows run ``sw_batch_size`` at a time in one XLA while loop.
* TensorFlow: ``tf.function`` with the input signature ``image [None, None, None, M]``, ``mask [M]`` (and
  ``flips [None, 3]`` for test-time flips): traced once per model and settings, whatever the volume size or mask
  (the dynamic-shape path of the ``segment_volume`` serving signature). The model's variables are captured by
  reference. The graph runs without XLA (``jit_compile`` off), as TF Serving runs the exported signature.

Only the model's ``"logits"`` output is kept inside the compiled function; nothing else comes back to the host.

``precision="bf16"`` runs the model's layers in bfloat16 (Keras' ``mixed_bfloat16``: float32 weights, bfloat16
compute, float32 logits), as nnU-Net and MONAI users run inference under autocast on GPUs: a twin of the model is
built once under that policy and called with the model's own weights (under JAX its weight values are passed in at
each call, as for float32; under TensorFlow they are copied into the twin on the device inside the graph), so the
twin never holds stale weights. The sigmoid, the blending and the probabilities stay float32.
"""
from __future__ import annotations

import atexit
import functools
import weakref

import numpy as np

__all__ = ["PRECISIONS", "logits_of", "logits_spec", "volume_function", "compile_extent"]

# precision -> the Keras dtype policy the model's layers compute in (None: the model as built)
PRECISIONS = {"fp32": None, "bf16": "mixed_bfloat16"}

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


def compile_extent(shape, roi_size) -> tuple:
    """The extent ``(D, H, W)`` a volume of spatial ``shape`` is zero-padded to before the JAX-compiled window:
    each axis rounded up to a multiple of half the window (and to at least the window), so that volumes of nearby
    sizes (BraTS cases cropped to the brain) share one compilation. The windows are still those of ``shape``
    (its size is a runtime input), so the padding changes no result: 155 x 240 x 240 with 80 x 160 x 160 windows
    runs in a 160 x 240 x 240 extent, 12 windows as before."""
    return tuple(max(int(r), -(-int(s) // max(1, int(r) // 2)) * max(1, int(r) // 2))
                 for s, r in zip(shape, roi_size))


def _jax_state(model):
    import keras

    if isinstance(model, keras.Layer):
        return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
    return (), ()


def compute_twin(model, precision: str):
    """The model itself for ``"fp32"``; for another precision, the same graph built anew with its layers computing
    in that precision's policy (:data:`PRECISIONS`), its variables float32 and in the model's order (the caller
    passes or copies the model's values: the twin's own are only initial values)."""
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] is None:
        return model
    if not (isinstance(model, keras.Model) and hasattr(model, "shaspec_config")):
        raise ValueError(f"precision {precision!r} needs a shaspec_tf model (it is rebuilt under "
                         f"{PRECISIONS[precision]}), got {type(model).__name__}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        twin = type(model).from_config(model.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    mine = model.trainable_variables + model.non_trainable_variables
    theirs = twin.trainable_variables + twin.non_trainable_variables
    if [tuple(v.shape) for v in mine] != [tuple(v.shape) for v in theirs]:  # pragma: no cover - same config
        raise ValueError(f"the {precision} twin of {model.name} does not have the model's variables")
    return twin


def _compile(model, settings: dict):
    import keras

    from shaspec_tf.inference.window import window_probabilities

    ref = _reference(model)
    backend = keras.backend.backend()
    m = settings.pop("num_modalities")
    roi = settings["roi_size"]
    twin = compute_twin(model, settings.pop("precision"))
    twin_ref = ref if twin is model else (lambda: twin)  # held by the compiled function (it holds no model)
    if backend == "jax":
        import jax

        def probabilities(state, image, mask, size, flips):
            model = twin_ref()  # the graph; the values are the model's own (state)
            trainable, non_trainable = state

            def logits_fn(tiles, masks):
                inputs = {"image": tiles, "modality_mask": masks}
                if isinstance(model, keras.Layer):
                    outputs, _ = model.stateless_call(trainable, non_trainable, inputs, training=False)
                else:
                    outputs = model(inputs)
                return logits_of(outputs)

            return window_probabilities(logits_fn, image, mask, flips, size=size, **settings)

        jitted = jax.jit(probabilities)  # one compilation per extent (and flips: none, or an [F, 3] table)

        def run(image, mask, flips=None):
            shape = tuple(int(s) for s in image.shape[:3])
            extent = compile_extent(shape, roi)
            volume = jax.numpy.asarray(image, dtype="float32")  # to the device; padded there
            if extent != shape:
                volume = jax.numpy.pad(volume, [(0, e - s) for e, s in zip(extent, shape)] + [(0, 0)])
            prob = jitted(_jax_state(ref()), volume, jax.numpy.asarray(mask, dtype="float32"),
                          np.asarray(shape, np.int32), None if flips is None else np.asarray(flips, np.int32))
            return prob if extent == shape else prob[:shape[0], :shape[1], :shape[2]]  # cropped on the device

        return run
    if backend == "tensorflow":
        import tensorflow as tf

        image_spec, mask_spec = tf.TensorSpec([None, None, None, m], tf.float32), tf.TensorSpec([m], tf.float32)

        def logits_fn(tiles, masks):
            if twin_ref is not ref:  # the model's current weights into the twin, on the device, at each call
                source, target = ref(), twin_ref()
                for mine, theirs in zip(source.trainable_variables + source.non_trainable_variables,
                                        target.trainable_variables + target.non_trainable_variables):
                    theirs.assign(mine)
            return logits_of(_call(twin_ref(), {"image": tiles, "modality_mask": masks}))

        @tf.function(input_signature=[image_spec, mask_spec])
        def plain(image, mask):
            return window_probabilities(logits_fn, image, mask, None, **settings)

        @tf.function(input_signature=[image_spec, mask_spec, tf.TensorSpec([None, 3], tf.int32)])
        def flipped(image, mask, flips):
            return window_probabilities(logits_fn, image, mask, flips, **settings)

        def run(image, mask, flips=None):
            return plain(image, mask) if flips is None else flipped(image, mask, np.asarray(flips, np.int32))

        return run
    raise NotImplementedError(f"sliding-window inference runs on the jax and tensorflow backends, not {backend!r}")


def _reference(model):
    try:
        return weakref.ref(model)
    except TypeError:
        return lambda: model


def volume_function(model, *, roi_size, num_modalities, overlap, mode, sigma_scale, sw_batch_size,
                    precision: str = "fp32"):
    """``run(image float32 [D, H, W, M], mask float32 [M], flips=None) -> probabilities [D, H, W, C]`` (a backend
    tensor, on the device; ``flips``: ``None`` or int32 ``[F, 3]`` of test-time flips):
    :func:`~shaspec_tf.inference.window.window_probabilities` of ``model``, compiled for the active backend, made
    once per model and settings and then reused. The model's logits are checked symbolically (:func:`logits_spec`,
    a one-line ``ValueError``) when the function is made. ``precision``: one of :data:`PRECISIONS` (the module's
    docstring)."""
    import keras

    from shaspec_tf.inference.window import sigma_scales

    settings = {"roi_size": tuple(int(r) for r in roi_size), "num_modalities": int(num_modalities),
                "overlap": float(overlap), "mode": mode, "sigma_scale": sigma_scales(sigma_scale),
                "sw_batch_size": int(sw_batch_size), "precision": precision}
    key = (keras.backend.backend(),) + tuple(sorted(settings.items()))
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weakly referenceable: nothing is kept
        per_model = {}
    if key not in per_model:
        shape = logits_spec(model, settings["sw_batch_size"], settings["roi_size"], settings["num_modalities"])
        per_model[key] = _compile(model, dict(settings, num_classes=shape[-1]))
    return per_model[key]
