"""A trained model folder (``shaspec train``'s output): load it, and score it on every modality subset of a prepared
data set (``shaspec evaluate``, the TFX evaluator)."""
from __future__ import annotations

from typing import Optional

from shaspec_tf import fileio


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_trained(model_dir: str):
    """The model saved by ``shaspec train`` in ``model_dir`` (``model_config.json`` + ``model.weights.h5``), or in
    the ``.keras`` file ``model_dir`` (:func:`shaspec_tf.models.saving.save_model`); either may be a URI
    (``gs://...``).

    A missing, unreadable or garbage file is a one-line error naming it (``FileNotFoundError`` or ``ValueError``)."""
    from shaspec_tf.models import build_model

    if str(model_dir).endswith(".keras"):
        from shaspec_tf.models.saving import load_model

        return load_model(model_dir, compile=False)
    config_path = fileio.join(model_dir, "model_config.json")
    weights_path = fileio.join(model_dir, "model.weights.h5")
    for path in (config_path, weights_path):
        if not fileio.exists(path):
            raise FileNotFoundError(f"{path} not found: --model must be a folder written by 'shaspec train'")
        if not fileio.isfile(path):
            raise ValueError(f"{path} is not a file: --model must be a folder written by 'shaspec train'")
    config = fileio.read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("preset"), str):
        raise ValueError(f"{config_path} is not a shaspec model configuration (a JSON object with a 'preset'; "
                         f"got {type(config).__name__})")
    try:
        model = build_model(config)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        # Everything build_model reads comes from the file: a wrong key, type or value there is bad input.
        detail = f"missing key {error.args[0]!r}" if isinstance(error, KeyError) and error.args else \
            _first_line(error)
        raise ValueError(f"{config_path} is not a valid shaspec model configuration: {detail}") from error
    try:
        with fileio.local_copy(weights_path, suffix=".weights.h5") as local:  # Keras reads local files only
            model.load_weights(local)
    except Exception as error:  # noqa: BLE001  Keras and h5py raise assorted types for a bad or mismatched file
        raise ValueError(f"{weights_path} cannot be loaded into a {config.get('preset')!r} model: "
                         f"{_first_line(error)}") from error
    return model


def _corrupt_records(files, error: BaseException) -> ValueError:
    """The one-line error for a ``DataLossError`` met while reading ``files``: the file and record that
    :func:`shaspec_tf.data.files.check_records` finds corrupt (it raises that), else a line naming the files."""
    from shaspec_tf.data.files import check_records

    check_records(files)
    shown = ", ".join(str(f) for f in list(files)[:3]) + (", ..." if len(files) > 3 else "")
    return ValueError(f"corrupt TFRecord data in {shown}: {_first_line(error)}")


def evaluate_trained(model_dir: str, data_dir: str, split: Optional[str] = None, roi_size=None,
                     overlap: Optional[float] = None, tta: bool = False, postprocess: bool = False, subsets=None,
                     batch_size: int = 256, overlay_cases: Optional[int] = None,
                     precision: Optional[str] = None) -> dict:
    """Score a trained model on every modality subset of a prepared split (default: its task's evaluation split,
    BraTS ``eval``, AV-MNIST ``test``), the way its task evaluates (:meth:`shaspec_tf.tasks.Task.evaluate_model`).

    BraTS: sliding-window inference over each whole (cropped) case (window: ``roi_size``, default the training crop;
    ``overlap``: default the inference module's), labels in BraTS values, Dice and HD95 per region in mm; only cases
    with every modality enter the subset matrix (others are listed under ``"skipped"``). AV-MNIST: accuracy per
    subset, ``batch_size`` samples per forward pass. ``overlay_cases``: segmentation, how many cases' predictions to
    keep for the overlay pictures of :func:`shaspec_tf.evaluation.write_reports` (``None``: its default, 0: none).
    ``precision``: the sliding window's (``"fp32"`` by default, ``"bf16"``; see
    :func:`shaspec_tf.inference.sliding_window_predict`).

    A corrupt or truncated TFRecord file is a one-line ``ValueError`` naming the file and record.
    """
    import tensorflow as tf

    from shaspec_tf.data.files import split_files
    from shaspec_tf.taskspec.registry import task_for_model

    model = load_trained(model_dir)
    task = task_for_model(model.shaspec_config)
    files = split_files(data_dir, split, task.name)
    try:
        return task.evaluate_model(model, files, roi_size=roi_size, overlap=overlap, tta=tta,
                                   postprocess=postprocess, subsets=subsets, batch_size=batch_size,
                                   overlay_cases=overlay_cases, precision=precision)
    except tf.errors.DataLossError as error:
        raise _corrupt_records(files, error) from error
