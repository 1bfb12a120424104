"""The TFRecord contract of shaspec-tf: one ``tf.train.Example`` per MRI case or AV-MNIST sample.

Every record carries the per-sample **modality-presence mask**; an absent modality's tensor is zeros and its bit 0.

BraTS (``task = "brats"``), schema version 1:

| feature | type | meaning |
|---|---|---|
| ``schema_version`` | int64 [1] | ``SCHEMA_VERSION`` |
| ``task`` | bytes [1] | ``"brats"`` |
| ``case_id`` | bytes [1] | e.g. ``"BraTS20_Training_001"`` |
| ``modalities`` | bytes [M] | ``flair, t1, t1ce, t2`` (the channel order of ``image``) |
| ``modality_mask`` | int64 [M] | 1 present, 0 absent |
| ``image`` | bytes [1] | raw little-endian float32, shape ``image_shape`` = ``[D, H, W, M]`` |
| ``image_shape`` | int64 [4] | ``D, H, W, M`` |
| ``label`` | bytes [1] | raw uint8 BraTS labels ``{0, 1, 2, 4}``, shape ``[D, H, W]``; empty when unlabelled |
| ``has_label`` | int64 [1] | 1 when ``label`` is present |
| ``spacing`` | float [3] | voxel size in mm along D, H, W |
| ``affine`` | float [16] | the source NIfTI affine (row-major 4x4) |
| ``original_shape`` | int64 [3] | the volume's D, H, W before cropping |
| ``crop_start`` | int64 [3] | where the stored crop starts in the original volume (D, H, W) |
| ``present_modalities`` | bytes [k] | the names of the present modalities (summary for data validation) |
| ``label_values`` | bytes [n] | the distinct values in ``label`` as text, e.g. ``0, 1, 2, 4`` (none if unlabelled) |

The two summary features repeat what the mask and the label hold in a form TensorFlow Data Validation can check
against a schema (``pipeline``: at least one present modality, known names, label values in ``{0, 1, 2, 4}``);
the readers here ignore them.

Axes: ``D, H, W`` are the NIfTI voxel axes ``k, j, i`` (``array = nifti.transpose(2, 1, 0)``), so D is the axial
slice axis (155 in BraTS), as the official code lays volumes out.

AV-MNIST (``task = "avmnist"``), schema version 1: ``sample_id`` bytes, ``modalities`` (``image, audio``),
``modality_mask`` int64 [2], ``image`` float [28 * 28] (values in [0, 1]), ``audio`` float [20 * 20] (MFCCs),
``label`` int64 [1], ``speaker`` bytes [1], ``present_modalities`` bytes [k] (as for BraTS).

The tasks' constants (modalities, BraTS label values and regions, AV-MNIST shapes, task names) are defined once in
``shaspec_tf.tasks`` and re-exported here; the mask rule is :func:`shaspec_tf.data.masks.check_modality_mask`.

This module needs TensorFlow only to parse records (``parse_*``); writing uses ``tf.train.Example`` protos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from shaspec_tf.data.masks import check_modality_mask
from shaspec_tf.taskspec.constants import AVMNIST_AUDIO_SHAPE, AVMNIST_IMAGE_SHAPE, AVMNIST_MODALITIES
from shaspec_tf.taskspec.constants import AVMNIST_NAME as AVMNIST_TASK
# The tasks' constants, defined once in shaspec_tf.tasks and re-exported here for the data layer.
from shaspec_tf.taskspec.constants import BRATS_LABEL_REGIONS, BRATS_LABEL_VALUES, BRATS_MODALITIES  # noqa: F401
from shaspec_tf.taskspec.constants import BRATS_REGIONS  # noqa: F401
from shaspec_tf.taskspec.constants import BRATS_NAME as BRATS_TASK

SCHEMA_VERSION = 1
_IMAGE_SIZE = int(np.prod(AVMNIST_IMAGE_SHAPE))
_AUDIO_SIZE = int(np.prod(AVMNIST_AUDIO_SHAPE))


@dataclass
class BratsRecord:
    """One MRI case in memory, as written to and read from a TFRecord."""

    case_id: str
    image: np.ndarray                      # float32 [D, H, W, M], zeros for absent modalities
    modality_mask: np.ndarray              # int64 [M]
    label: Optional[np.ndarray] = None     # uint8 [D, H, W] in {0, 1, 2, 4}, or None
    spacing: Sequence[float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    original_shape: Optional[Sequence[int]] = None
    crop_start: Sequence[int] = (0, 0, 0)
    modalities: Sequence[str] = BRATS_MODALITIES

    def validate(self) -> None:
        """One-line ``ValueError`` naming the case when the record breaks the contract."""
        m = len(self.modalities)
        where = f"case {self.case_id!r}"
        if self.image.ndim != 4 or self.image.shape[-1] != m:
            raise ValueError(f"{where}: image must be [D, H, W, {m}], got {self.image.shape}")
        mask = check_modality_mask(self.modality_mask, self.modalities, where)
        if not np.all(np.isfinite(self.image)):
            raise ValueError(f"{where}: image holds NaN or Inf")
        absent = [name for name, bit in zip(self.modalities, mask) if not bit]
        if absent and np.any(self.image[..., mask == 0]):
            raise ValueError(f"{where}: absent modalities {absent} must be zeros")
        if self.label is not None:
            if self.label.shape != self.image.shape[:3]:
                raise ValueError(f"{where}: label shape {self.label.shape} differs from image {self.image.shape[:3]}")
            bad = np.setdiff1d(np.unique(self.label), BRATS_LABEL_VALUES)
            if bad.size:
                raise ValueError(f"{where}: label values {bad.tolist()} outside BraTS labels "
                                 f"{{{', '.join(str(v) for v in BRATS_LABEL_VALUES)}}}")


def _bytes(values):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() if isinstance(v, str) else v
                                                                 for v in values]))


def _ints(values):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    import tensorflow as tf

    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def _present(modalities, mask) -> list:
    return [name for name, bit in zip(modalities, np.asarray(mask).reshape(-1)) if bit]


def brats_example(record: BratsRecord):
    """``BratsRecord`` -> ``tf.train.Example`` (validated first)."""
    import tensorflow as tf

    record.validate()
    image = np.ascontiguousarray(record.image, dtype="<f4")
    label = b"" if record.label is None else np.ascontiguousarray(record.label, dtype=np.uint8).tobytes()
    original = record.original_shape if record.original_shape is not None else image.shape[:3]
    features = {
        "schema_version": _ints([SCHEMA_VERSION]),
        "task": _bytes([BRATS_TASK]),
        "case_id": _bytes([record.case_id]),
        "modalities": _bytes(list(record.modalities)),
        "modality_mask": _ints(np.asarray(record.modality_mask).tolist()),
        "image": _bytes([image.tobytes()]),
        "image_shape": _ints(image.shape),
        "label": _bytes([label]),
        "has_label": _ints([record.label is not None]),
        "spacing": _floats(record.spacing),
        "affine": _floats(np.asarray(record.affine, dtype=np.float64).reshape(16)),
        "original_shape": _ints(original),
        "crop_start": _ints(record.crop_start),
        "present_modalities": _bytes(_present(record.modalities, record.modality_mask)),
        "label_values": _bytes([] if record.label is None else [str(v) for v in np.unique(record.label)]),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


def brats_record_from_example(serialized: bytes) -> BratsRecord:
    """Inverse of :func:`brats_example` in NumPy (exact round trip)."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    version = f["schema_version"].int64_list.value[0]
    if version != SCHEMA_VERSION:
        raise ValueError(f"record schema version {version} is not {SCHEMA_VERSION}")
    shape = tuple(f["image_shape"].int64_list.value)
    image = np.frombuffer(f["image"].bytes_list.value[0], dtype="<f4").reshape(shape).astype(np.float32)
    has_label = bool(f["has_label"].int64_list.value[0])
    label = (np.frombuffer(f["label"].bytes_list.value[0], dtype=np.uint8).reshape(shape[:3]).copy()
             if has_label else None)
    return BratsRecord(
        case_id=f["case_id"].bytes_list.value[0].decode(),
        image=image,
        modality_mask=np.asarray(f["modality_mask"].int64_list.value, dtype=np.int64),
        label=label,
        spacing=tuple(f["spacing"].float_list.value),
        affine=np.asarray(f["affine"].float_list.value, dtype=np.float64).reshape(4, 4),
        original_shape=tuple(f["original_shape"].int64_list.value),
        crop_start=tuple(f["crop_start"].int64_list.value),
        modalities=tuple(v.decode() for v in f["modalities"].bytes_list.value),
    )


def parse_brats_example(serialized, num_modalities: int = len(BRATS_MODALITIES)):
    """TensorFlow parser (for ``tf.data``): a serialized example -> dict of tensors with ``image`` float32
    ``[D, H, W, M]``, ``label`` uint8 ``[D, H, W]`` (zeros when unlabelled), ``modality_mask`` int64 ``[M]``, and the
    metadata."""
    import tensorflow as tf

    spec = {
        "schema_version": tf.io.FixedLenFeature([1], tf.int64),
        "case_id": tf.io.FixedLenFeature([], tf.string),
        "modality_mask": tf.io.FixedLenFeature([num_modalities], tf.int64),
        "image": tf.io.FixedLenFeature([], tf.string),
        "image_shape": tf.io.FixedLenFeature([4], tf.int64),
        "label": tf.io.FixedLenFeature([], tf.string),
        "has_label": tf.io.FixedLenFeature([1], tf.int64),
        "spacing": tf.io.FixedLenFeature([3], tf.float32),
        "affine": tf.io.FixedLenFeature([16], tf.float32),
        "original_shape": tf.io.FixedLenFeature([3], tf.int64),
        "crop_start": tf.io.FixedLenFeature([3], tf.int64),
    }
    f = tf.io.parse_single_example(serialized, spec)
    shape = f["image_shape"]
    image = tf.reshape(tf.io.decode_raw(f["image"], tf.float32, little_endian=True), shape)
    label = tf.cond(f["has_label"][0] > 0,
                    lambda: tf.reshape(tf.io.decode_raw(f["label"], tf.uint8), shape[:3]),
                    lambda: tf.zeros(shape[:3], tf.uint8))
    return {"case_id": f["case_id"], "image": image, "label": label, "modality_mask": f["modality_mask"],
            "has_label": f["has_label"][0], "spacing": f["spacing"], "affine": tf.reshape(f["affine"], (4, 4)),
            "original_shape": f["original_shape"], "crop_start": f["crop_start"]}


def avmnist_example(sample_id: str, image: np.ndarray, audio: np.ndarray, modality_mask, label: int,
                    speaker: str = ""):
    """One AV-MNIST sample -> ``tf.train.Example`` (image ``[28, 28]`` in [0, 1], audio ``[20, 20]`` MFCCs)."""
    import tensorflow as tf

    image = np.asarray(image, np.float32).reshape(-1)
    audio = np.asarray(audio, np.float32).reshape(-1)
    mask = np.asarray(modality_mask, np.int64).reshape(-1)
    where = f"sample {sample_id!r}"
    if image.size != _IMAGE_SIZE or audio.size != _AUDIO_SIZE:
        raise ValueError(f"{where}: image must have {_IMAGE_SIZE} values and audio {_AUDIO_SIZE}, got {image.size} "
                         f"and {audio.size}")
    check_modality_mask(mask, AVMNIST_MODALITIES, where)
    if not (np.all(np.isfinite(image)) and np.all(np.isfinite(audio))):
        raise ValueError(f"{where}: NaN or Inf in the inputs")
    features = {
        "schema_version": _ints([SCHEMA_VERSION]),
        "task": _bytes([AVMNIST_TASK]),
        "sample_id": _bytes([sample_id]),
        "modalities": _bytes(list(AVMNIST_MODALITIES)),
        "modality_mask": _ints(mask),
        "image": _floats(image * mask[0]),
        "audio": _floats(audio * mask[1]),
        "label": _ints([label]),
        "speaker": _bytes([speaker]),
        "present_modalities": _bytes(_present(AVMNIST_MODALITIES, mask)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


def parse_avmnist_example(serialized):
    """TensorFlow parser: -> dict with ``image`` ``[28, 28, 1]``, ``audio`` ``[20, 20, 1]``, ``modality_mask`` int64
    ``[2]``, ``label`` int64 scalar, ``sample_id``, ``speaker``."""
    import tensorflow as tf

    spec = {
        "schema_version": tf.io.FixedLenFeature([1], tf.int64),
        "sample_id": tf.io.FixedLenFeature([], tf.string),
        "modality_mask": tf.io.FixedLenFeature([len(AVMNIST_MODALITIES)], tf.int64),
        "image": tf.io.FixedLenFeature([_IMAGE_SIZE], tf.float32),
        "audio": tf.io.FixedLenFeature([_AUDIO_SIZE], tf.float32),
        "label": tf.io.FixedLenFeature([1], tf.int64),
        "speaker": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    f = tf.io.parse_single_example(serialized, spec)
    return {"sample_id": f["sample_id"], "speaker": f["speaker"], "modality_mask": f["modality_mask"],
            "image": tf.reshape(f["image"], AVMNIST_IMAGE_SHAPE), "audio": tf.reshape(f["audio"], AVMNIST_AUDIO_SHAPE),
            "label": f["label"][0]}


def region_masks_tf(label, axis: int = 0):
    """BraTS label map (a tensor) -> the boolean mask of each region of :data:`BRATS_LABEL_REGIONS` (ET, WT, TC, the
    official channel order), stacked along ``axis``."""
    import tensorflow as tf

    masks = []
    for values in BRATS_LABEL_REGIONS.values():
        mask = label == values[0]
        for value in values[1:]:
            mask = mask | (label == value)
        masks.append(mask)
    return tf.stack(masks, axis=axis)


def brats_model_inputs(features: dict):
    """Parsed BraTS features -> (``{"image", "modality_mask"}``, regions ``[D, H, W, 3]`` ET/WT/TC float32)."""
    import tensorflow as tf

    mask = tf.cast(features["modality_mask"], tf.float32)
    regions = region_masks_tf(features["label"], axis=-1)
    return {"image": features["image"], "modality_mask": mask}, tf.cast(regions, tf.float32)


def avmnist_model_inputs(features: dict):
    """Parsed AV-MNIST features -> (``{"image", "audio", "modality_mask"}``, label)."""
    import tensorflow as tf

    inputs = {m: features[m] for m in AVMNIST_MODALITIES}
    return dict(inputs, modality_mask=tf.cast(features["modality_mask"], tf.float32)), features["label"]


def model_inputs(features: dict, task: str):
    """Parsed features -> ``(inputs, target)`` for the model of ``task`` (a name or kind, see
    :func:`shaspec_tf.tasks.get_task`): BraTS -> (``{"image", "modality_mask"}``, regions ``[D, H, W, 3]``
    ET/WT/TC); AV-MNIST -> (``{"image", "audio", "modality_mask"}``, label)."""
    from shaspec_tf.taskspec.registry import get_task

    return get_task(task).model_inputs(features)
