"""Whole-volume inference for the ShaSpec segmenter: sliding windows, BraTS label maps and "ShaSpec*" post-processing.

Arrays follow the package conventions: an image is ``[D, H, W, M]`` (M modalities, BraTS order FLAIR, T1, T1ce,
T2), probabilities are ``[D, H, W, 3]`` for the region channels ET, WT, TC (independent sigmoids), and label maps
hold BraTS values {0, 1 NCR/NET, 2 oedema, 4 enhancing}.

Defaults reproduce the official evaluation (``eval.py``): 80x160x160 tiles with overlap 1/3 (strides 54 and 107,
12 tiles on a 155x240x240 volume), a sigmoid per tile, a 0.5 threshold per channel and the label precedence
WT -> 2, TC -> 1, ET -> 4. The official code averages overlapping tiles with equal weights (``mode="constant"``);
the default here is the Gaussian blending of nnU-Net and MONAI (``mode="gaussian"``), which down-weights tile
borders.

Modules:

* :mod:`~shaspec_tf.inference.window`: the window-start rule, the Gaussian weights and the sliding window itself
  (``window_probabilities``), once, in ``keras.ops``; the ``segment_volume`` serving signature uses it too.
* :mod:`~shaspec_tf.inference.compiled`: compiles it with a model (``jax.jit`` / ``tf.function``) and caches that.
* :mod:`~shaspec_tf.inference.predict`: the Python API, :func:`sliding_window_predict` and :func:`predict_case`.
* :mod:`~shaspec_tf.inference.postprocess`: label maps and the "ShaSpec*" post-processing (NumPy, SciPy).

Typical use::

    model = shaspec_tf.build_segmenter("paper")
    labels, prob = predict_case(model, image, [1, 1, 0, 1])          # T1ce missing
    labels = postprocess(labels, t1ce=raw_t1ce)                       # the paper's "ShaSpec*" row
"""
from shaspec_tf.inference.postprocess import postprocess, probabilities_to_labels
from shaspec_tf.inference.predict import validate_roi, predict_case, sliding_window_predict
from shaspec_tf.inference.window import (FLIPS, ROI_DIVISOR, gaussian_importance_map, window_probabilities,
                                         window_starts)

__all__ = ["window_starts", "gaussian_importance_map", "sliding_window_predict", "probabilities_to_labels",
           "postprocess", "predict_case", "window_probabilities", "FLIPS", "ROI_DIVISOR"]
