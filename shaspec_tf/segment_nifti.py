"""Segmenting NIfTI files with a trained model (``shaspec predict``): read whichever sequences are given, and write
BraTS label maps on the input's grid, never over an input or a file that is not ours."""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np


def nifti_inputs(paths: Dict[str, Optional[str]]) -> dict:
    """The given sequences of ``paths`` (modality -> file or None) as ``{modality: Path}``; one-line errors for none
    or an unknown modality."""
    from pathlib import Path

    from shaspec_tf.data.schema import BRATS_MODALITIES

    given = {m: Path(p) for m, p in paths.items() if p}
    if not given:
        raise ValueError(f"give at least one of {', '.join('--' + m for m in BRATS_MODALITIES)}")
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
                  overlap: Optional[float] = None, tta: bool = False, postprocess: bool = False,
                  overwrite: bool = False) -> dict:
    """Segment one case from whatever sequences are given (any non-empty subset of FLAIR, T1, T1ce, T2) and write
    BraTS label values (0, 1, 2, 4) as NIfTI with the input's affine and grid. An existing ``out_path`` is replaced
    only when it is a label map of ours, or with ``overwrite``. The window (``roi_size``: default the training crop)
    and ``overlap`` default as the task says (:meth:`shaspec_tf.tasks.Task.inference_options`)."""
    from shaspec_tf.inference import predict_case
    from shaspec_tf.taskspec.registry import task_for_model
    from shaspec_tf.trained import load_trained

    given = nifti_inputs(paths)
    check_nifti_output(given, out_path, overwrite)
    model = load_trained(model_dir)
    record = read_nifti_case(given, out_path)
    options = task_for_model(model.shaspec_config).inference_options(model.shaspec_config, roi_size, overlap)
    labels, _ = predict_case(model, record.image, record.modality_mask.astype(np.float32), tta_flips=tta, **options)
    return write_nifti_labels(labels, record, given, out_path, postprocess, overwrite)
