"""Whole-volume prediction from Python: :func:`sliding_window_predict` and :func:`predict_case`.

Both validate on the host, then run :func:`shaspec_tf.inference.window.window_probabilities` compiled with the model
(:mod:`shaspec_tf.inference.compiled`): padding, tiles, model calls, sigmoids, blending and test-time flips all run
where the model runs, and only the probabilities come back.
"""
from __future__ import annotations

import math

import numpy as np

from shaspec_tf.inference.compiled import PRECISIONS, compile_extent, volume_function
from shaspec_tf.inference.postprocess import postprocess, probabilities_to_labels
from shaspec_tf.inference.window import FLIPS, ROI_DIVISOR, flip_rows, sigma_scales, window_starts

__all__ = ["sliding_window_predict", "predict_case"]


def _num_modalities(model) -> int:
    modalities = getattr(model, "modalities", None)
    try:
        return len(modalities) if modalities else 4
    except TypeError:
        return 4


def validate_roi(roi_size) -> tuple:
    try:
        roi = tuple(int(r) for r in roi_size)
    except TypeError:
        raise ValueError(f"roi_size must be three integers (D, H, W), got {roi_size!r}") from None
    if len(roi) != 3 or any(r < 1 for r in roi) or any(int(r) != r for r in roi_size):
        raise ValueError(f"roi_size must be three positive integers (D, H, W), got {tuple(roi_size)}")
    if any(r % d for r, d in zip(roi, ROI_DIVISOR)):
        raise ValueError(f"roi_size {roi} must be divisible by {ROI_DIVISOR} (the segmenter's total stride)")
    if all(r == d for r, d in zip(roi, ROI_DIVISOR)):
        raise ValueError(f"roi_size {roi} gives a 1x1x1 bottleneck; use at least "
                         f"{(2 * ROI_DIVISOR[0],) + ROI_DIVISOR[1:]}")
    return roi


def _validate_inputs(image, modality_mask, num_modalities: int):
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[-1] != num_modalities:
        raise ValueError(f"image must be one volume [D, H, W, {num_modalities}] (modalities last, no batch axis), "
                         f"got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"image must hold real numbers, got dtype {image.dtype}")
    if min(image.shape[:3]) < 1:
        raise ValueError(f"image must have at least one voxel, got shape {image.shape}")
    mask = np.asarray(modality_mask)
    if mask.shape != (num_modalities,):
        raise ValueError(f"modality_mask must have shape [{num_modalities}] (one volume), got {mask.shape}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"modality_mask must hold only 0 and 1, got {mask.tolist()}")
    if not np.any(mask):
        raise ValueError("modality_mask is all zero: at least one modality must be present")
    return np.ascontiguousarray(image, dtype=np.float32), mask.astype(np.float32)


def _progress_bar(progress, total: int):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - tqdm ships with the project's environment
        raise ImportError("progress=True needs the 'tqdm' package") from err
    return tqdm(total=total, desc="sliding window", unit="flip")


def sliding_window_predict(model, image, modality_mask, roi_size=(80, 160, 160), overlap: float = 1 / 3,
                           mode: str = "gaussian", sigma_scale: float = 0.125, sw_batch_size: int = 4,
                           tta_flips: bool = False, progress: bool = False, precision: str = "fp32") -> np.ndarray:
    """Region probabilities ``float32 [D, H, W, C]`` (C = 3: ET, WT, TC) of ONE volume of any size.

    The whole window runs on the device, compiled with the model (one ``jax.jit`` under JAX, one ``tf.function``
    under TensorFlow; see :mod:`shaspec_tf.inference.compiled`): padding, tile gathering, the model's logits in
    batches of ``sw_batch_size`` tiles, sigmoids, blending and cropping. It is made on the first call for a model
    and these settings and reused afterwards: under JAX compiled once more per new extent (the volume size rounded
    up to half a window per axis, :func:`~shaspec_tf.inference.compiled.compile_extent`), under TensorFlow never;
    the mask and the weights never cause a new compilation. Only the probabilities come back to the host.

    Args:
        model: a segmenter, called (traced) as ``model({"image": [b, *roi_size, M], "modality_mask": [b, M]},
            training=False)`` and returning ``{"logits": [b, *roi_size, C], ...}`` (only the logits are kept) or the
            logits themselves. A Keras model, or any callable built from ``keras.ops``.
        image: ``[D, H, W, M]`` float (no batch axis; M = ``len(model.modalities)``, 4 when the model does not say).
        modality_mask: ``[M]`` of 0/1, at least one 1. Absent modalities are zeroed by the model itself.
        roi_size: the window ``(D, H, W)``, divisible by (16, 32, 32) with more than one bottleneck voxel. An axis
            shorter than the window is padded with zeros after its end and cropped back.
        overlap: fraction of a window shared with the next one along each axis (see
            :func:`~shaspec_tf.inference.window.window_starts`).
        mode: ``"gaussian"`` weights each tile by :func:`~shaspec_tf.inference.window.gaussian_importance_map`;
            ``"constant"`` averages tiles with equal weights (the official ``predict_sliding``). Sigmoids are taken
            per tile, before blending.
        sigma_scale: Gaussian sigma as a fraction of the window size (nnU-Net and MONAI: 1/8).
        sw_batch_size: how many windows go through the model per call (the last call of a volume is filled up by
            repeating its last window with weight 0; never more than the volume's number of windows).
        tta_flips: average over the 8 combinations of flipping the D, H and W axes (flip the input, predict, flip
            the prediction back); 8 times the work.
        progress: show a tqdm bar over the flips (1 step, or 8 with ``tta_flips``). The windows run inside one
            compiled loop, so there is no per-window progress; with a bar, each flip is one call of the compiled
            function and its probabilities are summed on the host.
        precision: ``"fp32"``, or ``"bf16"`` to run the model's layers in bfloat16 (float32 weights and
            probabilities; for GPUs with bfloat16 units, like autocast in nnU-Net and MONAI; see
            :mod:`shaspec_tf.inference.compiled`).
    """
    m = _num_modalities(model)
    image, mask = _validate_inputs(image, modality_mask, m)
    roi = validate_roi(roi_size)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if isinstance(sw_batch_size, bool) or int(sw_batch_size) != sw_batch_size or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
    scales = sigma_scales(sigma_scale)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    import keras

    # Never more windows per model call than there are windows (in the extent the compiled function runs on, so
    # that volumes sharing an extent share a compilation).
    extent = compile_extent(image.shape[:3], roi) if keras.backend.backend() == "jax" else image.shape[:3]
    tiles = math.prod(len(window_starts(s, r, overlap)) for s, r in zip(extent, roi))
    run = volume_function(model, roi_size=roi, num_modalities=m, overlap=overlap, mode=mode, sigma_scale=scales,
                          sw_batch_size=min(int(sw_batch_size), tiles), precision=precision)

    flips = flip_rows(FLIPS) if tta_flips else None
    bar = _progress_bar(progress, 1 if flips is None else len(flips))
    if bar is None:
        return np.asarray(keras.ops.convert_to_numpy(run(image, mask, flips)), dtype=np.float32)
    try:
        result = None
        for row in ([None] if flips is None else flips):
            prob = np.asarray(keras.ops.convert_to_numpy(run(image, mask, None if row is None else row[None])),
                              dtype=np.float32)
            result = prob if result is None else result + prob
            bar.update(1)
    finally:
        bar.close()
    return result / np.float32(len(flips)) if flips is not None else result


def predict_case(model, image, modality_mask, *, threshold: float = 0.5, postprocess_options: dict | None = None,
                 **kwargs):
    """``(labels uint8 [D, H, W], probabilities float32 [D, H, W, 3])`` for one volume.

    ``kwargs`` go to :func:`sliding_window_predict` (``roi_size``, ``overlap``, ``mode``, ``tta_flips``, ...). The
    labels come from :func:`~shaspec_tf.inference.postprocess.probabilities_to_labels`; with
    ``postprocess_options`` (a dict, ``{}`` for the defaults, possibly holding ``t1ce``) they then go through
    :func:`~shaspec_tf.inference.postprocess.postprocess`.
    """
    prob = sliding_window_predict(model, image, modality_mask, **kwargs)
    labels = probabilities_to_labels(prob, threshold)
    if postprocess_options is not None:
        labels = postprocess(labels, **postprocess_options)
    return labels, prob
