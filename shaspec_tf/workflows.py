"""End-to-end workflows behind ``shaspec evaluate`` and ``shaspec predict``: load a trained model folder, score it
on every modality subset, segment NIfTI files."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np


def load_trained(model_dir: str):
    """The model saved by ``shaspec train`` in ``model_dir`` (``model_config.json`` + ``model.weights.h5``)."""
    from shaspec_tf.models import build_model

    config_path = os.path.join(model_dir, "model_config.json")
    weights_path = os.path.join(model_dir, "model.weights.h5")
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: --model must be a folder written by 'shaspec train'")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON ({error})") from error
    model = build_model(config)
    try:
        model.load_weights(weights_path)
    except Exception as error:
        raise ValueError(f"{weights_path} cannot be loaded into a {config.get('preset')!r} model: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    return model


def _brats_cases(data_dir: str, split: str):
    from shaspec_tf.data.files import record_dataset, split_files
    from shaspec_tf.data.schema import brats_record_from_example

    for raw in record_dataset(split_files(data_dir, split, "brats")):
        yield brats_record_from_example(raw.numpy())


def evaluate_trained(model_dir: str, data_dir: str, split: Optional[str] = None, roi_size=None,
                     overlap: float = 1 / 3, tta: bool = False, postprocess: bool = False, subsets=None,
                     batch_size: int = 256) -> dict:
    """Score a trained model on every modality subset of a prepared split (BraTS: ``eval``; AV-MNIST: ``test``).

    BraTS: sliding-window inference over each whole (cropped) case, labels in BraTS values, Dice and HD95 per region
    in mm; only cases with every modality enter the subset matrix (others are listed under ``"skipped"``).
    AV-MNIST: accuracy per subset.
    """
    from shaspec_tf.evaluation import evaluate_subsets
    from shaspec_tf.inference import postprocess as postprocess_labels
    from shaspec_tf.inference import probabilities_to_labels, sliding_window_predict

    model = load_trained(model_dir)
    config = model.shaspec_config
    modalities = model.modalities
    if config["task"] == "segmentation":
        roi = tuple(roi_size or config["crop_size"])
        skipped = []

        def cases():
            for record in _brats_cases(data_dir, split or "eval"):
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

    from shaspec_tf.data.files import split_files
    from shaspec_tf.data.input import avmnist_dataset

    files = split_files(data_dir, split or "test", "avmnist")
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


def read_nifti_case(given: dict, out_path: str):
    """Load and preprocess (brain crop, z-score) the sequences of :func:`nifti_inputs` as one ``BratsRecord``."""
    from pathlib import Path

    from shaspec_tf.data.brats import BratsCaseFiles, load_case, preprocess
    from shaspec_tf.data.schema import BRATS_MODALITIES

    files = BratsCaseFiles(case_id=Path(out_path).name.split(".")[0],
                           paths={m: given.get(m) for m in BRATS_MODALITIES}, seg=None)
    return preprocess(load_case(files))


def write_nifti_labels(labels, record, given: dict, out_path: str, postprocess: bool = False) -> dict:
    """Labels on ``record``'s crop -> BraTS label values on the input's grid and affine, written atomically (never a
    half-written file under the final name); returns ``{"out", "modalities", "label_voxels"}``."""
    import nibabel as nib

    from shaspec_tf.data.brats import uncrop
    from shaspec_tf.inference import postprocess as postprocess_labels

    if postprocess:
        labels = postprocess_labels(labels)
    full = uncrop(labels, record.original_shape, record.crop_start)
    reference = nib.load(str(next(iter(given.values()))))
    if tuple(reference.shape[:3]) != tuple(full.shape[::-1]):
        raise ValueError(f"internal error: prediction grid {full.shape[::-1]} differs from the input {reference.shape}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    image = nib.Nifti1Image(np.transpose(full, (2, 1, 0)).astype(np.uint8), reference.affine, reference.header)
    image.set_data_dtype(np.uint8)
    suffix = ".nii.gz" if out_path.endswith(".gz") else ".nii"
    tmp = os.path.join(out_dir, f".{os.path.basename(out_path)}.partial{suffix}")
    nib.save(image, tmp)
    os.replace(tmp, out_path)
    counts = {int(v): int(c) for v, c in zip(*np.unique(full, return_counts=True))}
    return {"out": out_path, "modalities": sorted(given), "label_voxels": counts}


def predict_nifti(model_dir: str, paths: Dict[str, Optional[str]], out_path: str, roi_size=None,
                  overlap: float = 1 / 3, tta: bool = False, postprocess: bool = False) -> dict:
    """Segment one case from whatever sequences are given (any non-empty subset of FLAIR, T1, T1ce, T2) and write
    BraTS label values (0, 1, 2, 4) as NIfTI with the input's affine and grid."""
    from shaspec_tf.inference import predict_case

    given = nifti_inputs(paths)
    model = load_trained(model_dir)
    record = read_nifti_case(given, out_path)
    roi = tuple(roi_size or model.shaspec_config["crop_size"])
    labels, _ = predict_case(model, record.image, record.modality_mask.astype(np.float32), roi_size=roi,
                             overlap=overlap, tta_flips=tta)
    return write_nifti_labels(labels, record, given, out_path, postprocess)
