"""End-to-end workflows behind ``shaspec evaluate`` and ``shaspec predict``: load a trained model folder, score it
on every modality subset, segment NIfTI files."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_trained(model_dir: str):
    """The model saved by ``shaspec train`` in ``model_dir`` (``model_config.json`` + ``model.weights.h5``).

    A missing, unreadable or garbage file is a one-line error naming it (``FileNotFoundError`` or ``ValueError``)."""
    from shaspec_tf.models import build_model

    config_path = os.path.join(model_dir, "model_config.json")
    weights_path = os.path.join(model_dir, "model.weights.h5")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: --model must be a folder written by 'shaspec train'")
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file: --model must be a folder written by 'shaspec train'")
    try:
        with open(config_path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({_first_line(error)})") from error
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
        model.load_weights(weights_path)
    except Exception as error:  # noqa: BLE001  Keras and h5py raise assorted types for a bad or mismatched file
        raise ValueError(f"{weights_path} cannot be loaded into a {config.get('preset')!r} model: "
                         f"{_first_line(error)}") from error
    return model


def _brats_cases(files):
    from shaspec_tf.data.files import record_dataset
    from shaspec_tf.data.schema import brats_record_from_example

    for raw in record_dataset(files):
        yield brats_record_from_example(raw.numpy())


def _corrupt_records(files, error: BaseException) -> ValueError:
    """The one-line error for a ``DataLossError`` met while reading ``files``: the file and record that
    :func:`shaspec_tf.data.files.check_records` finds corrupt (it raises that), else a line naming the files."""
    from shaspec_tf.data.files import check_records

    check_records(files)
    shown = ", ".join(str(f) for f in list(files)[:3]) + (", ..." if len(files) > 3 else "")
    return ValueError(f"corrupt TFRecord data in {shown}: {_first_line(error)}")


def evaluate_trained(model_dir: str, data_dir: str, split: Optional[str] = None, roi_size=None,
                     overlap: float = 1 / 3, tta: bool = False, postprocess: bool = False, subsets=None,
                     batch_size: int = 256) -> dict:
    """Score a trained model on every modality subset of a prepared split (BraTS: ``eval``; AV-MNIST: ``test``).

    BraTS: sliding-window inference over each whole (cropped) case, labels in BraTS values, Dice and HD95 per region
    in mm; only cases with every modality enter the subset matrix (others are listed under ``"skipped"``).
    AV-MNIST: accuracy per subset.

    A corrupt or truncated TFRecord file is a one-line ``ValueError`` naming the file and record.
    """
    import tensorflow as tf

    from shaspec_tf.data.files import split_files

    model = load_trained(model_dir)
    task = "brats" if model.shaspec_config["task"] == "segmentation" else "avmnist"
    files = split_files(data_dir, split or ("eval" if task == "brats" else "test"), task)
    try:
        return _evaluate_model(model, files, roi_size, overlap, tta, postprocess, subsets, batch_size)
    except tf.errors.DataLossError as error:
        raise _corrupt_records(files, error) from error


def _evaluate_model(model, files, roi_size, overlap, tta, postprocess, subsets, batch_size) -> dict:
    from shaspec_tf.evaluation import evaluate_subsets
    from shaspec_tf.inference import postprocess as postprocess_labels
    from shaspec_tf.inference import probabilities_to_labels, sliding_window_predict

    config = model.shaspec_config
    modalities = model.modalities
    if config["task"] == "segmentation":
        roi = tuple(roi_size or config["crop_size"])
        skipped = []

        def cases():
            for record in _brats_cases(files):
                if record.label is None or not np.all(record.modality_mask == 1):
                    skipped.append(record.case_id)
                    continue
                yield {"case_id": record.case_id, "image": record.image, "labels": record.label,
                       "spacing": tuple(record.spacing)}

        def predict(case, mask):
            prob = sliding_window_predict(model, case["image"], mask, roi_size=roi, overlap=overlap,
                                          tta_flips=tta)
            labels = probabilities_to_labels(prob)
            return postprocess_labels(labels) if postprocess else labels

        results = evaluate_subsets(predict, cases(), modalities, subsets=subsets, task="segmentation")
        results["skipped"] = skipped
        return results

    from shaspec_tf.data.input import avmnist_dataset

    batches = []
    for inputs, labels in avmnist_dataset(files, batch_size=batch_size, training=False):
        batches.append({"image": inputs["image"].numpy(), "audio": inputs["audio"].numpy(),
                        "label": labels.numpy()})

    def predict(batch, mask):
        masks = np.tile(mask, (len(batch["label"]), 1))
        logits = model.predict_on_batch({"image": batch["image"], "audio": batch["audio"], "modality_mask": masks})
        return np.asarray(logits["logits"]).argmax(-1)

    return evaluate_subsets(predict, batches, modalities, subsets=subsets, task="classification", progress=False)


def nifti_inputs(paths: Dict[str, Optional[str]]) -> dict:
    """The given sequences of ``paths`` (modality -> file or None) as ``{modality: Path}``; one-line errors for none
    or an unknown modality."""
    from pathlib import Path

    from shaspec_tf.data.schema import BRATS_MODALITIES

    given = {m: Path(p) for m, p in paths.items() if p}
    if not given:
        raise ValueError("give at least one of --flair, --t1, --t1ce, --t2")
    unknown = sorted(set(given) - set(BRATS_MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}")
    return given


LABELS_DESCRIP = b"shaspec-tf labels"  # the NIfTI header's descrip of every label map we write


def is_our_label_map(path: str) -> bool:
    """Whether ``path`` is a NIfTI label map written by shaspec (its header's ``descrip`` says so)."""
    import nibabel as nib

    try:
        return bytes(nib.load(str(path)).header["descrip"]).rstrip(b"\0") == LABELS_DESCRIP
    except Exception:  # noqa: BLE001  anything unreadable is simply not ours
        return False


def check_nifti_output(given: dict, out_path: str, overwrite: bool = False) -> None:
    """One-line errors, before any work, for an ``out_path`` that would destroy something: one of the input files
    ``given`` (by any spelling, symbolic or hard link), an existing folder, or an existing file that is not a label
    map of ours (unless ``overwrite``)."""
    from shaspec_tf.fileio import same_file

    out_path = str(out_path)
    if not out_path:
        raise ValueError("--out is empty; give the output file's name, e.g. seg.nii.gz")
    if out_path.endswith(("/", os.sep)) or os.path.isdir(out_path):
        raise IsADirectoryError(f"--out {out_path} is a folder; give the output file's name, e.g. seg.nii.gz")
    for modality, path in given.items():
        if same_file(out_path, str(path)):
            raise ValueError(f"--out {out_path} is the --{modality} input {path}; refusing to overwrite an input "
                             f"(choose another output file)")
    if os.path.lexists(out_path) and not overwrite and not is_our_label_map(out_path):
        raise FileExistsError(f"--out {out_path} exists and is not a shaspec label map; refusing to overwrite it "
                              f"(choose another file, or give --overwrite)")


def read_nifti_case(given: dict, out_path: str):
    """Load and preprocess (brain crop, z-score) the sequences of :func:`nifti_inputs` as one ``BratsRecord``."""
    from pathlib import Path

    from shaspec_tf.data.brats import BratsCaseFiles, load_case, preprocess
    from shaspec_tf.data.schema import BRATS_MODALITIES

    files = BratsCaseFiles(case_id=Path(out_path).name.split(".")[0],
                           paths={m: given.get(m) for m in BRATS_MODALITIES}, seg=None)
    return preprocess(load_case(files))


def write_nifti_labels(labels, record, given: dict, out_path: str, postprocess: bool = False,
                       overwrite: bool = False) -> dict:
    """Labels on ``record``'s crop -> BraTS label values on the input's grid and affine, written atomically (never a
    half-written file under the final name, nor a partial file left behind; partial files of killed runs are
    removed); returns ``{"out", "modalities", "label_voxels"}``. Refuses an ``out_path`` that is an input or a
    folder (:func:`check_nifti_output`)."""
    import nibabel as nib

    from shaspec_tf.data.brats import uncrop
    from shaspec_tf.fileio import atomic_path
    from shaspec_tf.inference import postprocess as postprocess_labels

    check_nifti_output(given, out_path, overwrite)
    if postprocess:
        labels = postprocess_labels(labels)
    full = uncrop(labels, record.original_shape, record.crop_start)
    reference = nib.load(str(next(iter(given.values()))))
    if tuple(reference.shape[:3]) != tuple(full.shape[::-1]):
        raise ValueError(f"internal error: prediction grid {full.shape[::-1]} differs from the input {reference.shape}")
    image = nib.Nifti1Image(np.transpose(full, (2, 1, 0)).astype(np.uint8), reference.affine, reference.header)
    image.set_data_dtype(np.uint8)
    image.header["descrip"] = LABELS_DESCRIP
    suffix = ".nii.gz" if str(out_path).endswith(".gz") else ".nii"  # nibabel compresses by the file name
    with atomic_path(out_path, suffix) as tmp:
        nib.save(image, tmp)
    counts = {int(v): int(c) for v, c in zip(*np.unique(full, return_counts=True))}
    return {"out": out_path, "modalities": sorted(given), "label_voxels": counts}


def predict_nifti(model_dir: str, paths: Dict[str, Optional[str]], out_path: str, roi_size=None,
                  overlap: float = 1 / 3, tta: bool = False, postprocess: bool = False,
                  overwrite: bool = False) -> dict:
    """Segment one case from whatever sequences are given (any non-empty subset of FLAIR, T1, T1ce, T2) and write
    BraTS label values (0, 1, 2, 4) as NIfTI with the input's affine and grid. An existing ``out_path`` is replaced
    only when it is a label map of ours, or with ``overwrite``."""
    from shaspec_tf.inference import predict_case

    given = nifti_inputs(paths)
    check_nifti_output(given, out_path, overwrite)
    model = load_trained(model_dir)
    record = read_nifti_case(given, out_path)
    roi = tuple(roi_size or model.shaspec_config["crop_size"])
    labels, _ = predict_case(model, record.image, record.modality_mask.astype(np.float32), roi_size=roi,
                             overlap=overlap, tta_flips=tta)
    return write_nifti_labels(labels, record, given, out_path, postprocess, overwrite)
