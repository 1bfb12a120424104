"""shaspec-tf: ShaSpec (CVPR 2023) missing-modality learning in Keras 3, with a TFX pipeline and TF Serving export.

The model library (``shaspec_tf.layers``, ``shaspec_tf.models``, ``shaspec_tf.losses``) is backend-agnostic: it runs
under the TensorFlow or JAX Keras backends. Builders are imported lazily so that ``import shaspec_tf`` stays cheap
and command-line tools can configure logging before Keras loads.

The models and layers are registered Keras classes (package ``shaspec_tf``), so ``keras.saving.load_model`` reads
a saved ``.keras`` file without ``custom_objects`` once they are registered: when Keras is already imported,
``import shaspec_tf`` registers them at once; otherwise the first use of a builder (or ``import shaspec_tf.models``)
does.

This package is the library: it never imports the applications built on it (``serving``, ``components``,
``pipeline``); they import it.
"""
import sys as _sys

__version__ = "0.1.0"  # the one place the version is written; setup.py reads it from here
__all__ = ["build_baseline_classifier", "build_baseline_segmenter", "build_classifier", "build_model",
           "build_segmenter", "load_model", "save_model", "__version__"]


def __getattr__(name):
    if name in __all__ and name != "__version__":
        from shaspec_tf import models

        return getattr(models, name)
    raise AttributeError(f"module 'shaspec_tf' has no attribute {name!r}")


# The built-in tasks register themselves in shaspec_tf.taskspec.registry, which the generic modules look them up in;
# importing them is cheap (NumPy and dataclasses: every heavy import of a task is lazy).
from shaspec_tf import tasks as _tasks  # noqa: E402,F401

if "keras" in _sys.modules:  # Keras is loaded already, so registering the model classes costs little
    from shaspec_tf import models as _models  # noqa: E402,F401
