"""shaspec-tf: ShaSpec (CVPR 2023) missing-modality learning in Keras 3, with a TFX pipeline and TF Serving export.

The model library (``shaspec_tf.layers``, ``shaspec_tf.models``, ``shaspec_tf.losses``) is backend-agnostic: it runs
under the TensorFlow or JAX Keras backends. Builders are imported lazily so that ``import shaspec_tf`` stays cheap
and command-line tools can configure logging before Keras loads.
"""
__version__ = "0.1.0"
__all__ = ["build_baseline_classifier", "build_baseline_segmenter", "build_classifier", "build_model",
           "build_segmenter", "__version__"]


def __getattr__(name):
    if name in __all__ and name != "__version__":
        from shaspec_tf import models

        return getattr(models, name)
    raise AttributeError(f"module 'shaspec_tf' has no attribute {name!r}")
