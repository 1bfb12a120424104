"""Segmenting NIfTI files with a trained model (``shaspec predict``): read whichever sequences are given, and write
BraTS label maps on the input's grid, never over an input or a file that is not ours.

Inputs, the output and the model may be URIs (``gs://...``): inputs are downloaded once for the whole prediction
(nibabel reads local files), the label map is written locally and uploaded whole, and an existing output object's
NIfTI header is read through the file layer to tell whether it is a label map of ours."""
from __future__ import annotations

import contextlib
import io
import os
import zlib
from typing import Dict, Iterator, Optional

import numpy as np

from shaspec_tf import fileio


def nifti_inputs(paths: Dict[str, Optional[str]]) -> dict:
    """The given sequences of ``paths`` (modality -> file or None) as ``{modality: path}`` (strings; local paths or
    URIs); one-line errors for none or an unknown modality."""
    from shaspec_tf.data.schema import BRATS_MODALITIES

    given = {m: os.fspath(p) for m, p in paths.items() if p}
    if not given:
        raise ValueError(f"give at least one of {', '.join('--' + m for m in BRATS_MODALITIES)}")
    unknown = sorted(set(given) - set(BRATS_MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}")
    return given


@contextlib.contextmanager
def local_inputs(given: dict) -> Iterator[dict]:
    """``{modality: local file}`` for the inputs ``given``: local paths as they are, URIs downloaded to temporary
    files for the duration of the block. An error raised inside that names a temporary file names its URI instead."""
    with contextlib.ExitStack() as stack:
        local = {m: stack.enter_context(fileio.local_copy(p)) for m, p in given.items()}
        renamed = {tmp: given[m] for m, tmp in local.items() if tmp != given[m]}
        try:
            yield local
        except (OSError, ValueError) as error:
            text = str(error)
            if not any(tmp in text for tmp in renamed):
                raise
            for tmp, uri in renamed.items():
                text = text.replace(tmp, uri)
            try:
                replacement = type(error)(text)
            except Exception:  # noqa: BLE001  an exception type that takes other arguments
                replacement = ValueError(text)
            raise replacement from error


LABELS_DESCRIP = b"shaspec-tf labels"  # the NIfTI header's descrip of every label map we write
_HEADER_READ = 1 << 16  # bytes read to find a (compressed) NIfTI header: a compressed header takes far fewer


def _nifti_header(path: str):
    """The NIfTI-1 or NIfTI-2 header at the start of ``path`` (plain or gzip-compressed), read through the file
    layer without reading the voxels. It reads no more bytes than the file holds (tensorflow-io's ``gs://``
    reader can crash the process on reads far past an object's end)."""
    import nibabel as nib

    with fileio.open_file(path, "rb") as f:
        head = f.read(min(fileio.size(path), _HEADER_READ))
    if head[:2] == b"\x1f\x8b":
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 540)
    size = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
    if size not in (348, 540):
        size = int.from_bytes(head[:4], "big") if len(head) >= 4 else 0
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    return header_class.from_fileobj(io.BytesIO(head[:540]))


def is_our_label_map(path: str) -> bool:
    """Whether ``path`` (a local file or a URI) is a NIfTI label map written by shaspec (its header's ``descrip``
    says so)."""
    try:
        return bytes(_nifti_header(str(path))["descrip"]).rstrip(b"\0") == LABELS_DESCRIP
    except Exception:  # noqa: BLE001  anything unreadable is simply not ours
        return False


def check_nifti_output(given: dict, out_path: str, overwrite: bool = False) -> None:
    """One-line errors, before any work, for an ``out_path`` that would destroy something: one of the input files
    ``given`` (by any spelling, symbolic or hard link), an existing folder, or an existing file that is not a label
    map of ours (unless ``overwrite``)."""
    out_path = str(out_path)
    if not out_path:
        raise ValueError("--out is empty; give the output file's name, e.g. seg.nii.gz")
    if out_path.endswith(("/", os.sep)) or fileio.isdir(out_path):
        raise IsADirectoryError(f"--out {out_path} is a folder; give the output file's name, e.g. seg.nii.gz")
    for modality, path in given.items():
        if fileio.same_file(out_path, str(path)):
            raise ValueError(f"--out {out_path} is the --{modality} input {path}; refusing to overwrite an input "
                             f"(choose another output file)")
    if fileio.lexists(out_path) and not overwrite and not is_our_label_map(out_path):
        raise FileExistsError(f"--out {out_path} exists and is not a shaspec label map; refusing to overwrite it "
                              f"(choose another file, or give --overwrite)")


def read_nifti_case(given: dict, out_path: str):
    """Load and preprocess (brain crop, z-score) the sequences of :func:`nifti_inputs` (local files, see
    :func:`local_inputs`) as one ``BratsRecord``."""
    from shaspec_tf.data.brats import BratsCaseFiles, load_case, preprocess
    from shaspec_tf.data.schema import BRATS_MODALITIES

    files = BratsCaseFiles(case_id=fileio.basename(str(out_path)).split(".")[0],
                           paths={m: given.get(m) for m in BRATS_MODALITIES}, seg=None)
    return preprocess(load_case(files))


def write_nifti_labels(labels, record, given: dict, out_path: str, postprocess: bool = False,
                       overwrite: bool = False, reference: Optional[str] = None) -> dict:
    """Labels on ``record``'s crop -> BraTS label values on the input's grid and affine, written atomically (never a
    half-written file under the final name, nor a partial file left behind; partial files of killed runs are
    removed; a URI is written locally and uploaded whole); returns ``{"out", "modalities", "label_voxels"}``.
    Refuses an ``out_path`` that is an input or a folder (:func:`check_nifti_output`). ``reference``: a local copy
    of the first input, when the caller holds one (default: the first of ``given``, downloaded when a URI)."""
    import nibabel as nib

    from shaspec_tf.data.brats import uncrop
    from shaspec_tf.inference import postprocess as postprocess_labels

    check_nifti_output(given, out_path, overwrite)
    if postprocess:
        labels = postprocess_labels(labels)
    full = uncrop(labels, record.original_shape, record.crop_start)
    with contextlib.ExitStack() as stack:
        if reference is None:
            reference = stack.enter_context(fileio.local_copy(str(next(iter(given.values())))))
        grid = nib.load(str(reference))  # the header only: nibabel reads voxels on demand
        shape, affine, header = tuple(grid.shape), grid.affine, grid.header.copy()
    if tuple(shape[:3]) != tuple(full.shape[::-1]):
        raise ValueError(f"internal error: prediction grid {full.shape[::-1]} differs from the input {shape}")
    image = nib.Nifti1Image(np.transpose(full, (2, 1, 0)).astype(np.uint8), affine, header)
    image.set_data_dtype(np.uint8)
    image.header["descrip"] = LABELS_DESCRIP
    suffix = ".nii.gz" if str(out_path).endswith(".gz") else ".nii"  # nibabel compresses by the file name
    with fileio.atomic_path(out_path, suffix) as tmp:
        nib.save(image, tmp)
    counts = {int(v): int(c) for v, c in zip(*np.unique(full, return_counts=True))}
    return {"out": out_path, "modalities": sorted(given), "label_voxels": counts}


def predict_nifti(model_dir: str, paths: Dict[str, Optional[str]], out_path: str, roi_size=None,
                  overlap: Optional[float] = None, tta: bool = False, postprocess: bool = False,
                  overwrite: bool = False, precision: Optional[str] = None) -> dict:
    """Segment one case from whatever sequences are given (any non-empty subset of FLAIR, T1, T1ce, T2) and write
    BraTS label values (0, 1, 2, 4) as NIfTI with the input's affine and grid. An existing ``out_path`` is replaced
    only when it is a label map of ours, or with ``overwrite``. The window (``roi_size``: default the training crop)
    and ``overlap`` default as the task says (:meth:`shaspec_tf.tasks.Task.inference_options`); ``precision``:
    ``"fp32"`` (default) or ``"bf16"``. The model folder, the inputs and ``out_path`` may be URIs."""
    from shaspec_tf.inference import predict_case
    from shaspec_tf.taskspec.registry import task_for_model
    from shaspec_tf.trained import load_trained

    given = nifti_inputs(paths)
    check_nifti_output(given, out_path, overwrite)
    model = load_trained(model_dir)
    with local_inputs(given) as local:
        record = read_nifti_case(local, out_path)
        options = task_for_model(model.shaspec_config).inference_options(model.shaspec_config, roi_size, overlap,
                                                                         precision)
        labels, _ = predict_case(model, record.image, record.modality_mask.astype(np.float32), tta_flips=tta,
                                 **options)
        return write_nifti_labels(labels, record, given, out_path, postprocess, overwrite,
                                  reference=next(iter(local.values())))
