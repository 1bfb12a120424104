"""Export trained ShaSpec models as TensorFlow Serving SavedModels (``BASE/NAME/VERSION/``).

The SavedModels hold TF-core ops only: they load with ``tf.saved_model.load`` (or TF Serving) without this package.

Segmentation signatures:

* ``serving_default``: ``image`` float32 ``[B, D, H, W, M]`` (D, H, W divisible by 16, 32, 32) and ``modality_mask``
  float32 ``[B, M]`` -> ``probabilities`` float32 ``[B, D, H, W, 3]`` (sigmoids, ET/WT/TC) and ``labels`` uint8
  ``[B, D, H, W]`` (BraTS values 0, 1, 2, 4).
* ``segment_volume``: whole volumes of any size, ``image`` float32 ``[B, D, H, W, M]`` (usually B = 1; a batch holds
  volumes of one size) and ``modality_mask`` float32 ``[B, M]`` -> ``labels`` uint8 ``[B, D, H, W]``. Sliding
  windows of the model's ``crop_size`` with the given overlap (default 1/3) and Gaussian blending run inside the
  graph: the same ``keras.ops`` code as :func:`shaspec_tf.inference.sliding_window_predict`
  (:func:`shaspec_tf.inference.window_probabilities`), on dynamic sizes; axes shorter than the window are padded
  with zeros and cropped back.

Classification ``serving_default``: ``image`` ``[B, 28, 28, 1]``, ``audio`` ``[B, 20, 20, 1]``, ``modality_mask``
``[B, 2]`` -> ``probabilities`` float32 ``[B, 10]`` (softmax) and ``class`` int64 ``[B]``.

Every signature checks its inputs in the graph (loaded signatures do not check shapes themselves): the fixed sizes
(channels, mask length; a wrong rank shows up as a wrong size), that each mask holds only 0 and 1 with at least one
1 (an all-zero mask fails with ``InvalidArgumentError``), and that all inputs agree on the batch size.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Optional

from shaspec_tf import fileio

MANIFEST_PATH = os.path.join("assets.extra", "shaspec_export.json")  # TF Serving ignores files beside the model
SEGMENTATION_SIGNATURES = ("serving_default", "segment_volume")
CLASSIFICATION_SIGNATURES = ("serving_default",)

__all__ = ["export_model", "export_trained", "next_version", "list_versions", "read_manifest",
           "make_serving_functions", "classification_functions", "segmentation_functions", "clean_stale_exports",
           "MANIFEST_PATH"]


def list_versions(base: str, name: str) -> list:
    """The integer version folders under ``base/name``, ascending (missing folder: ``[]``); ``base`` may be a URI."""
    folder = fileio.join(base, name)
    if not fileio.isdir(folder):
        return []
    return sorted(int(entry) for entry in fileio.listdir(folder)
                  if entry.isascii() and entry.isdigit() and fileio.isdir(fileio.join(folder, entry)))


def next_version(base: str, name: str) -> int:
    """One more than the highest existing version under ``base/name`` (1 when there is none)."""
    versions = list_versions(base, name)
    return versions[-1] + 1 if versions else 1


def read_manifest(version_dir: str) -> dict:
    """The export manifest written beside a SavedModel by :func:`export_model`; a missing file is a
    ``FileNotFoundError``, a garbage one a one-line ``ValueError``, each naming the file."""
    path = fileio.join(version_dir, *MANIFEST_PATH.split(os.sep))
    if not fileio.isfile(path):
        raise FileNotFoundError(f"{path} not found: {version_dir} is not a version folder written by 'shaspec export'")
    manifest = fileio.read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("task"), str):
        raise ValueError(f"{path} is not a shaspec export manifest (a JSON object with a 'task')")
    return manifest


def clean_stale_exports(model_dir: str) -> list:
    """Remove the staging folders that killed exports left under ``model_dir`` (those of dead processes on this
    host, see :func:`shaspec_tf.fileio.clean_stale`); returns what was removed."""
    return fileio.clean_stale_in(model_dir)


def _mask_checks(tf, mask, batch):
    """Graph assertions on ``mask`` [B, M] and that its batch size is ``batch``."""
    return [
        tf.debugging.assert_equal(tf.shape(mask)[0], batch, message="modality_mask and image must have the same "
                                  "batch size (one mask row per sample)"),
        tf.debugging.assert_equal(tf.reduce_all((mask == 0.0) | (mask == 1.0)), True,
                                  message="modality_mask must hold only 0 and 1"),
        tf.debugging.assert_equal(tf.reduce_all(tf.reduce_max(mask, axis=-1) > 0.0), True,
                                  message="modality_mask is all zero for a sample: at least one modality must be "
                                          "available (set its entry to 1)"),
    ]


def _shape_checks(tf, name, tensor, expected):
    """Graph assertion that ``tensor`` has the fixed sizes of ``expected`` (None: any size). Loaded signatures
    check neither rank nor shape, and the traced rank is static, so a tensor of another rank is caught here by
    its sizes: the shape is padded with zeros, which never match a fixed size."""
    text = "[" + ", ".join("?" if d is None else str(d) for d in expected) + "]"
    fixed = [(i, d) for i, d in enumerate(expected) if d is not None]
    shape = tf.concat([tf.shape(tensor), tf.zeros([len(expected)], tf.int32)], axis=0)
    same = tf.reduce_all(tf.stack([tf.equal(shape[i], d) for i, d in fixed]))
    return [tf.debugging.assert_equal(same, True, message=f"{name} must have shape {text} (rank {len(expected)})")]


def _labels_from_probabilities(tf, prob, precedence, threshold: float = 0.5):
    """Label values uint8 [..., D, H, W] from region probabilities [..., C], writing ``precedence``'s
    ``(channel, value)`` pairs in order, later ones winning (the rule of
    :func:`shaspec_tf.inference.probabilities_to_labels`; strict threshold)."""
    on = prob > threshold
    labels = tf.zeros(tf.shape(prob)[:-1], tf.uint8)
    for channel, value in precedence:
        labels = tf.where(on[..., channel], tf.constant(value, tf.uint8), labels)
    return labels


def make_serving_functions(model, overlap: Optional[float] = None, sigma_scale: Optional[float] = None,
                           sw_batch_size: int = 1) -> dict:
    """``{signature name: tf.function with an input signature}`` for ``model`` (a ShaSpec segmenter or
    classifier), as its task exports it; the functions call the model in inference mode. ``overlap`` and
    ``sigma_scale`` default to the task's inference settings."""
    from shaspec_tf.taskspec.registry import task_for_model

    return task_for_model(model.shaspec_config).serving_functions(model, overlap=overlap, sigma_scale=sigma_scale,
                                                                  sw_batch_size=sw_batch_size)


def _logits_of(model):
    def logits(inputs):
        out = model(inputs, training=False)
        return out["logits"] if isinstance(out, dict) else out

    return logits


def classification_functions(model) -> dict:
    """``serving_default`` of a classifier: one input per modality plus ``modality_mask`` -> softmax
    ``probabilities`` and the ``class``."""
    import tensorflow as tf

    config = model.shaspec_config
    logits = _logits_of(model)
    mask_spec = tf.TensorSpec([None, len(config["modalities"])], tf.float32, name="modality_mask")
    shapes = config["input_shapes"]
    names = list(config["modalities"])
    specs = [tf.TensorSpec([None] + list(shapes[n]), tf.float32, name=n) for n in names] + [mask_spec]

    def classify(*args):
        inputs = dict(zip(names + ["modality_mask"], args))
        first = []
        for spec, arg in zip(specs, args):
            first += _shape_checks(tf, spec.name, arg, spec.shape.as_list())
        with tf.control_dependencies(first):
            checks = _mask_checks(tf, inputs["modality_mask"], tf.shape(args[0])[0])
        checks += [tf.debugging.assert_equal(tf.shape(a)[0], tf.shape(args[0])[0],
                                             message=f"{n} and {names[0]} must have the same batch size")
                   for n, a in zip(names[1:], args[1:len(names)])]
        with tf.control_dependencies(checks):
            prob = tf.nn.softmax(tf.cast(logits(inputs), tf.float32), axis=-1)
        return {"probabilities": prob, "class": tf.argmax(prob, axis=-1, output_type=tf.int64)}

    # The signature takes its input names from the TensorSpec names.
    return {"serving_default": tf.function(classify, input_signature=specs)}


def segmentation_functions(model, overlap: float, sigma_scale: float, precedence, mode: str = "gaussian",
                           sw_batch_size: int = 1) -> dict:
    """``serving_default`` (patches) and ``segment_volume`` (whole volumes: the sliding window of
    :func:`shaspec_tf.inference.window_probabilities`, the code of :func:`~shaspec_tf.inference.sliding_window_predict`,
    with ``sw_batch_size`` windows per model call) of a segmenter; label values by ``precedence``."""
    import tensorflow as tf

    config = model.shaspec_config
    m = len(config["modalities"])
    mask_spec = tf.TensorSpec([None, m], tf.float32, name="modality_mask")
    logits = _logits_of(model)
    from shaspec_tf.inference import ROI_DIVISOR, validate_roi, window_probabilities
    from shaspec_tf.inference.compiled import logits_spec

    roi = validate_roi(config["crop_size"])
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    image_spec = tf.TensorSpec([None, None, None, None, m], tf.float32, name="image")

    @tf.function(input_signature=[image_spec, mask_spec])
    def serving_default(image, modality_mask):
        with tf.control_dependencies(_shape_checks(tf, "image", image, [None, None, None, None, m])
                                     + _shape_checks(tf, "modality_mask", modality_mask, [None, m])):
            shape = tf.shape(image)
            checks = _mask_checks(tf, modality_mask, shape[0])
            checks.append(tf.debugging.assert_equal(
                tf.reduce_all(tf.math.floormod(shape[1:4], ROI_DIVISOR) == 0), True,
                message=f"image spatial size (D, H, W) must be divisible by {ROI_DIVISOR} for serving_default "
                        f"(use segment_volume for volumes of any size)"))
        with tf.control_dependencies(checks):
            prob = tf.sigmoid(tf.cast(logits({"image": image, "modality_mask": modality_mask}), tf.float32))
        return {"probabilities": prob, "labels": _labels_from_probabilities(tf, prob, precedence)}

    num_classes = logits_spec(model, sw_batch_size, roi, m)[-1]

    def one_volume(args):
        volume, mask = args  # [D, H, W, M], [M]: the sliding window of the Python API, on dynamic sizes
        prob = window_probabilities(lambda tiles, masks: logits({"image": tiles, "modality_mask": masks}), volume,
                                    mask, None, roi_size=roi, num_classes=num_classes, overlap=overlap,
                                    mode=mode, sigma_scale=sigma_scale, sw_batch_size=sw_batch_size)
        return _labels_from_probabilities(tf, prob, precedence)

    @tf.function(input_signature=[image_spec, mask_spec])
    def segment_volume(image, modality_mask):
        with tf.control_dependencies(_shape_checks(tf, "image", image, [None, None, None, None, m])
                                     + _shape_checks(tf, "modality_mask", modality_mask, [None, m])):
            shape = tf.shape(image)
            checks = _mask_checks(tf, modality_mask, shape[0])
            checks.append(tf.debugging.assert_positive(tf.reduce_prod(shape[1:4]),
                                                       message="image must have at least one voxel"))
        with tf.control_dependencies(checks):
            labels = tf.map_fn(one_volume, (image, modality_mask),
                               fn_output_signature=tf.TensorSpec([None, None, None], tf.uint8))
        return {"labels": labels}

    return {"serving_default": serving_default, "segment_volume": segment_volume}


def _write_version(model, functions: dict, folder: str, name: str, version: int, overlap, sigma_scale,
                   source) -> None:
    """The SavedModel of ``functions`` and its manifest, written into the local ``folder`` (absent or empty)."""
    import keras

    from shaspec_tf.taskspec.registry import task_for_model

    archive = keras.export.ExportArchive()
    archive.track(model)
    for signature, fn in functions.items():
        archive.add_endpoint(signature, fn)
    archive.write_out(folder, verbose=False)
    config = model.shaspec_config
    manifest = {
        "format": "shaspec-tf export 1",
        "model_name": name,
        "version": version,
        "task": config["task"],
        "preset": config.get("preset"),
        "modalities": list(config["modalities"]),
        "signatures": sorted(functions),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "shaspec_config": config,
    }
    manifest.update(task_for_model(config).export_manifest(config, overlap=overlap, sigma_scale=sigma_scale))
    os.makedirs(os.path.join(folder, "assets.extra"), exist_ok=True)
    with open(os.path.join(folder, MANIFEST_PATH), "w") as f:
        json.dump(manifest, f, indent=2, default=list)


def _upload_version(local: str, target: str) -> None:
    """Copy the local SavedModel folder ``local`` to ``target`` on an object store, ``saved_model.pb`` last: a server
    loads a version once that file is there, so it never loads a half-copied one. A failed copy removes what it
    copied."""
    graph = os.path.join(local, "saved_model.pb")
    held = local.rstrip(os.sep) + "-saved_model.pb"
    os.replace(graph, held)
    if fileio.exists(target):  # an object store has no atomic rename: the last check before copying
        raise FileExistsError(f"{target} appeared while exporting: versions are never overwritten; pick another "
                              f"--version")
    try:
        fileio.upload_tree(local, target)
        fileio.copy(held, fileio.join(target, "saved_model.pb"))
    except BaseException:
        fileio.remove_tree(target)
        raise


def export_model(model, base: str, name: str, version: Optional[int] = None, *, overlap: Optional[float] = None,
                 sigma_scale: Optional[float] = None, source: Optional[str] = None) -> str:
    """Write ``model`` as the SavedModel ``base/name/version/`` (version: next free integer by default) and return
    that folder. ``base`` may be a URI (``gs://bucket/models``).

    The SavedModel is written to a hidden staging folder beside the version folder (``.V.partial-HOST-PID-RANDOM``:
    not an integer, so TF Serving ignores it, and hidden, so ``shaspec serve`` does too) and renamed into place, so a
    half-written export never appears as a version. A failed export removes its staging folder; the ones of killed
    exports are removed by the next export into the same model folder. An existing version is never overwritten.

    On an object store (no atomic rename) the SavedModel is built in a local temporary folder and uploaded into the
    version folder with ``saved_model.pb`` last, so that a server (TF Serving, ``shaspec serve``) sees a loadable
    version only once it is complete; a failed upload removes what it uploaded. Two exports racing for the same
    version of the same bucket are not detected.
    """
    if not name or os.sep in name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"model name must be a plain folder name, got {name!r}")
    if version is None:
        version = next_version(base, name)
    if isinstance(version, bool) or int(version) != version or int(version) < 0:
        raise ValueError(f"version must be a non-negative integer, got {version!r}")
    version = int(version)
    model_dir = fileio.join(base, name)
    target = fileio.join(model_dir, str(version))
    if fileio.exists(target):
        raise FileExistsError(f"{target} already exists: versions are never overwritten; pick another --version")
    functions = make_serving_functions(model, overlap=overlap, sigma_scale=sigma_scale)
    if fileio.is_uri(target):
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix="shaspec-export-")
        local = os.path.join(tmp, "version")
        try:
            _write_version(model, functions, local, name, version, overlap, sigma_scale, source)
            _upload_version(local, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    os.makedirs(model_dir, exist_ok=True)
    clean_stale_exports(model_dir)
    tmp = fileio.staging_dir(target)
    try:
        _write_version(model, functions, tmp, name, version, overlap, sigma_scale, source)
        if os.path.lexists(target):  # rename would replace an empty folder: never touch a version
            raise FileExistsError(f"{target} appeared while exporting: versions are never overwritten; pick "
                                  f"another --version")
        os.rename(tmp, target)
    except BaseException:
        fileio.remove_tree(tmp)
        raise
    return target


def export_trained(model_dir: str, base: str, name: str, version: Optional[int] = None, **kwargs) -> str:
    """:func:`export_model` of the model saved by ``shaspec train`` in ``model_dir``, under the TensorFlow backend
    (the signatures are TensorFlow code; from a process of another backend use
    :func:`shaspec_tf.backends.export_under_tensorflow`)."""
    from shaspec_tf.trained import load_trained

    return export_model(load_trained(model_dir), base, name, version,
                        source=fileio.absolute(model_dir), **kwargs)
