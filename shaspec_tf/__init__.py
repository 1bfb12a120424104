"""shaspec-tf: ShaSpec (CVPR 2023) missing-modality learning in Keras 3, with a TFX pipeline and TF Serving export.

The model library (``shaspec_tf.layers``, ``shaspec_tf.models``, ``shaspec_tf.losses``) is backend-agnostic: it runs
under TensorFlow, JAX or PyTorch Keras backends.
"""
from shaspec_tf.models import (build_baseline_classifier, build_baseline_segmenter, build_classifier, build_model,
                               build_segmenter)

__version__ = "0.1.0"
__all__ = ["build_baseline_classifier", "build_baseline_segmenter", "build_classifier", "build_model",
           "build_segmenter", "__version__"]
