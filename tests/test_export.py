"""``shaspec export``: TF Serving SavedModels that load and run without shaspec_tf (checked in a fresh process)."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from scipy import special

import shaspec_tf
from shaspec_tf.cli import main
from shaspec_tf.export import (MANIFEST_PATH, export_model, list_versions, make_serving_functions, next_version,
                               read_manifest)
from shaspec_tf.inference import probabilities_to_labels, sliding_window_predict

pytestmark = pytest.mark.tensorflow

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")

# Runs in a fresh interpreter that imports TensorFlow only: predictions and graph errors of both exports.
LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["shaspec_tf"] = None  # any attempt to import the package now fails
    import numpy as np
    import tensorflow as tf

    seg_dir, cls_dir, inputs_path, out_path = sys.argv[1:5]
    x = dict(np.load(inputs_path))
    seg = tf.saved_model.load(seg_dir).signatures
    cls = tf.saved_model.load(cls_dir).signatures
    out = {}
    r = seg["serving_default"](image=tf.constant(x["patch"]), modality_mask=tf.constant(x["patch_mask"]))
    out["patch_probabilities"], out["patch_labels"] = r["probabilities"].numpy(), r["labels"].numpy()
    for key in ("volume", "small_volume"):
        r = seg["segment_volume"](image=tf.constant(x[key][None]), modality_mask=tf.constant(x[key + "_mask"][None]))
        out[key + "_labels"] = r["labels"].numpy()[0]
    r = cls["serving_default"](image=tf.constant(x["digits"]), audio=tf.constant(x["audio"]),
                               modality_mask=tf.constant(x["digit_mask"]))
    out["class_probabilities"], out["class"] = r["probabilities"].numpy(), r["class"].numpy()

    errors = {}
    def attempt(name, fn, **kwargs):
        try:
            fn(**{k: tf.constant(v) for k, v in kwargs.items()})
            errors[name] = ["none", ""]
        except Exception as error:
            errors[name] = [type(error).__name__, " ".join(str(error).split())[:600]]
    zero = x["patch_mask"].copy(); zero[1] = 0
    attempt("zero_mask_patch", seg["serving_default"], image=x["patch"], modality_mask=zero)
    attempt("zero_mask_volume", seg["segment_volume"], image=x["small_volume"][None],
            modality_mask=np.zeros((1, 4), np.float32))
    attempt("zero_mask_class", cls["serving_default"], image=x["digits"], audio=x["audio"],
            modality_mask=np.zeros_like(x["digit_mask"]))
    attempt("not_divisible", seg["serving_default"], image=x["patch"][:, :24], modality_mask=x["patch_mask"])
    attempt("three_channels", seg["serving_default"], image=x["patch"][..., :3], modality_mask=x["patch_mask"])
    attempt("rank_four", seg["segment_volume"], image=x["small_volume"], modality_mask=x["small_volume_mask"][None])
    attempt("mask_length", cls["serving_default"], image=x["digits"], audio=x["audio"],
            modality_mask=np.ones((3, 4), np.float32))
    attempt("batch_mismatch", seg["serving_default"], image=x["patch"], modality_mask=x["patch_mask"][:1])
    out["errors"] = np.array(json.dumps(errors))
    out["modules"] = np.array(json.dumps(sorted(m for m in sys.modules
                                             if m.split(".")[0] == "shaspec_tf" and sys.modules[m])))
    np.savez(out_path, **out)
""")


def _save_trained(model, folder):
    os.makedirs(folder)
    model.save_weights(os.path.join(folder, "model.weights.h5"))
    with open(os.path.join(folder, "model_config.json"), "w") as f:
        f.write(model.config_json())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    keras.utils.set_random_seed(3)
    segmenter = shaspec_tf.build_segmenter("tiny")
    classifier = shaspec_tf.build_classifier("avmnist-tiny")
    _save_trained(segmenter, str(root / "trained"))
    assert main(["export", "--model", str(root / "trained"), "--out", str(root / "base"), "--name", "seg"]) == 0
    cls_dir = export_model(classifier, str(root / "base"), "digits", version=7)

    rng = np.random.default_rng(0)
    inputs = {
        "patch": rng.normal(size=(2, 32, 64, 64, 4)).astype(np.float32),
        "patch_mask": np.array([[1, 1, 1, 1], [1, 0, 1, 0]], np.float32),
        "volume": rng.normal(size=(40, 70, 70, 4)).astype(np.float32),   # 2 x 2 x 2 windows of 32 x 64 x 64
        "volume_mask": np.array([0, 1, 1, 1], np.float32),
        "small_volume": rng.normal(size=(20, 50, 70, 4)).astype(np.float32),  # padded along D and H
        "small_volume_mask": np.array([1, 0, 0, 0], np.float32),
        "digits": rng.uniform(size=(3, 28, 28, 1)).astype(np.float32),
        "audio": rng.uniform(size=(3, 20, 20, 1)).astype(np.float32),
        "digit_mask": np.array([[1, 1], [1, 0], [0, 1]], np.float32),
    }
    np.savez(root / "inputs.npz", **inputs)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", LOADER, str(root / "base" / "seg" / "1"), cls_dir,
                             str(root / "inputs.npz"), str(root / "out.npz")], cwd=str(root), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = dict(np.load(root / "out.npz"))
    return {"root": root, "segmenter": segmenter, "classifier": classifier, "inputs": inputs, "outputs": outputs,
            "seg_dir": str(root / "base" / "seg" / "1"), "cls_dir": cls_dir,
            "errors": json.loads(str(outputs["errors"]))}


def test_export_writes_tf_serving_layout_with_manifest(exported):
    base = exported["root"] / "base"
    assert sorted(os.listdir(base / "seg")) == ["1"]  # no temporary folder left beside the version
    assert sorted(os.listdir(base / "digits")) == ["7"]
    for folder in (exported["seg_dir"], exported["cls_dir"]):
        assert os.path.isfile(os.path.join(folder, "saved_model.pb"))
        assert os.path.isdir(os.path.join(folder, "variables"))
    manifest = read_manifest(exported["seg_dir"])
    assert manifest["task"] == "segmentation" and manifest["version"] == 1 and manifest["model_name"] == "seg"
    assert manifest["signatures"] == ["segment_volume", "serving_default"]
    assert manifest["roi_size"] == [32, 64, 64] and manifest["regions"] == ["ET", "WT", "TC"]
    assert manifest["source"] == os.path.abspath(exported["root"] / "trained")
    assert read_manifest(exported["cls_dir"])["signatures"] == ["serving_default"]
    assert os.path.isfile(os.path.join(exported["cls_dir"], MANIFEST_PATH))


def test_loads_without_shaspec_tf(exported):
    assert json.loads(str(exported["outputs"]["modules"])) == []


def test_serving_default_matches_the_keras_model(exported):
    x, out = exported["inputs"], exported["outputs"]
    logits = np.asarray(exported["segmenter"].predict_on_batch({"image": x["patch"],
                                                                "modality_mask": x["patch_mask"]})["logits"])
    prob = special.expit(logits)
    np.testing.assert_allclose(out["patch_probabilities"], prob, atol=1e-5)
    assert out["patch_labels"].dtype == np.uint8 and out["patch_labels"].shape == (2, 32, 64, 64)
    for i in range(2):
        # The graph's label rule is exactly probabilities_to_labels on the graph's own probabilities ...
        np.testing.assert_array_equal(out["patch_labels"][i], probabilities_to_labels(out["patch_probabilities"][i]))
        # ... and agrees with the Keras model's labels wherever the probability is not within 1e-5 of the threshold.
        clear = np.all(np.abs(prob[i] - 0.5) > 1e-5, axis=-1)
        np.testing.assert_array_equal(out["patch_labels"][i][clear], probabilities_to_labels(prob[i])[clear])
    assert len(np.unique(out["patch_labels"])) > 1  # not a degenerate all-background check


@pytest.mark.parametrize("key", ["volume", "small_volume"])
def test_segment_volume_is_the_python_sliding_window(exported, key):
    """The exported signature runs the code of sliding_window_predict (window_probabilities, one window per model
    call): its labels are those of the Python API's probabilities on every voxel (allowing only voxels whose
    probability is within 1e-6 of the 0.5 threshold, for float round-off between the loaded and the in-process
    graph)."""
    x, out = exported["inputs"], exported["outputs"]
    prob = sliding_window_predict(exported["segmenter"], x[key], x[key + "_mask"], roi_size=(32, 64, 64),
                                  overlap=1 / 3, sw_batch_size=1)
    labels = out[key + "_labels"]
    assert labels.dtype == np.uint8 and labels.shape == x[key].shape[:3]
    clear = np.all(np.abs(prob - 0.5) > 1e-6, axis=-1)
    assert clear.mean() > 0.999
    np.testing.assert_array_equal(labels[clear], probabilities_to_labels(prob)[clear])
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and len(np.unique(labels)) > 1


def test_segment_volume_probabilities_are_the_python_apis(exported):
    """The probabilities inside segment_volume (the graph make_serving_functions builds: window_probabilities on
    [None, None, None, M] volumes, the model called on one window at a time) equal the Python API's to 1e-6, and
    the signature's labels are exactly the label rule on them."""
    import tensorflow as tf

    from shaspec_tf.export import _labels_from_probabilities
    from shaspec_tf.inference import window_probabilities
    from shaspec_tf.tasks.brats import BRATS_LABEL_PRECEDENCE

    model, x = exported["segmenter"], exported["inputs"]
    seg = make_serving_functions(model)["segment_volume"]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32), tf.TensorSpec([4], tf.float32)])
    def probabilities(volume, mask):
        return window_probabilities(lambda t, m: model({"image": t, "modality_mask": m}, training=False)["logits"],
                                    volume, mask, tf.zeros([1, 3], tf.int32), roi_size=(32, 64, 64), num_classes=3,
                                    sw_batch_size=1)

    for key in ("volume", "small_volume"):
        graph = probabilities(x[key], x[key + "_mask"]).numpy()
        for sw in (1, 4):
            api = sliding_window_predict(model, x[key], x[key + "_mask"], roi_size=(32, 64, 64), sw_batch_size=sw)
            np.testing.assert_allclose(graph, api, rtol=0, atol=1e-6)
        labels = seg(image=x[key][None], modality_mask=x[key + "_mask"][None])["labels"].numpy()[0]
        rule = _labels_from_probabilities(tf, tf.constant(graph), BRATS_LABEL_PRECEDENCE)
        np.testing.assert_array_equal(labels, rule.numpy())


def test_segment_volume_holds_no_xla_ops(exported):
    """A stock TF Serving binary cannot run XLA ops (XlaDynamicUpdateSlice is what keras.ops.slice_update becomes
    under TensorFlow): the exported graphs hold core TensorFlow ops only."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(exported["seg_dir"], "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    graph = saved.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node} | {node.op for fn in graph.library.function for node in fn.node_def}
    assert "While" in ops and "Conv3D" in ops
    assert not [op for op in ops if op.startswith("Xla") or op.startswith("_Xla")], sorted(ops)


def test_classification_export_matches_the_keras_model(exported):
    x, out = exported["inputs"], exported["outputs"]
    logits = np.asarray(exported["classifier"].predict_on_batch(
        {"image": x["digits"], "audio": x["audio"], "modality_mask": x["digit_mask"]})["logits"])
    np.testing.assert_allclose(out["class_probabilities"], special.softmax(logits, axis=-1), atol=1e-5)
    assert out["class"].dtype == np.int64
    np.testing.assert_array_equal(out["class"], logits.argmax(-1))


def test_graph_rejects_all_zero_masks_and_bad_shapes(exported):
    errors = exported["errors"]
    for key in ("zero_mask_patch", "zero_mask_volume", "zero_mask_class"):
        kind, message = errors[key]
        assert kind == "InvalidArgumentError" and "modality_mask is all zero" in message, (key, errors[key])
    kind, message = errors["not_divisible"]
    assert kind == "InvalidArgumentError" and "divisible by (16, 32, 32)" in message
    kind, message = errors["batch_mismatch"]
    assert kind == "InvalidArgumentError" and "same batch size" in message
    kind, message = errors["three_channels"]  # loaded signatures do not check shapes: the graph does
    assert kind == "InvalidArgumentError" and "image must have shape [?, ?, ?, ?, 4]" in message
    kind, message = errors["rank_four"]
    assert kind == "InvalidArgumentError" and "image must have shape [?, ?, ?, ?, 4] (rank 5)" in message
    kind, message = errors["mask_length"]
    assert kind == "InvalidArgumentError" and "modality_mask must have shape [?, 2]" in message


def test_saved_model_cli_lists_the_signatures(exported):
    result = subprocess.run([SAVED_MODEL_CLI, "show", "--all", "--dir", exported["seg_dir"]], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    for name in ("serving_default", "segment_volume"):
        assert f"signature_def['{name}']" in text
    assert "inputs['image'] tensor_info" in text and "inputs['modality_mask'] tensor_info" in text
    assert "outputs['probabilities'] tensor_info" in text and "DT_UINT8" in text
    assert "(-1, -1, -1, -1, 4)" in text


def test_versions_and_atomic_export(exported, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    assert list_versions(str(base), "m") == [] and next_version(str(base), "m") == 1
    for entry in ("2", "10", "notaversion", ".export-11-tmp"):
        (base / "m" / entry).mkdir(parents=True)
    assert list_versions(str(base), "m") == [2, 10] and next_version(str(base), "m") == 11

    # An export that fails half-way leaves neither a version folder nor its temporary folder behind.
    def broken_write_out(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(keras.export.ExportArchive, "write_out", broken_write_out)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(exported["classifier"], str(base), "m")
    assert sorted(os.listdir(base / "m")) == [".export-11-tmp", "10", "2", "notaversion"]

    # An existing version is never overwritten: one-line CLI error, exit code 2.
    trained = str(exported["root"] / "trained")
    assert main(["export", "--model", trained, "--out", str(base), "--name", "m", "--version", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    with pytest.raises(ValueError, match="plain folder name"):
        export_model(exported["classifier"], str(base), "../escape")


def test_make_serving_functions_signatures(exported):
    functions = make_serving_functions(exported["segmenter"])
    assert sorted(functions) == ["segment_volume", "serving_default"]
    names = [spec.name for spec in functions["serving_default"].input_signature]
    assert names == ["image", "modality_mask"]
    functions = make_serving_functions(exported["classifier"])
    assert [spec.name for spec in functions["serving_default"].input_signature] == ["image", "audio",
                                                                                     "modality_mask"]


def test_read_manifest_names_a_missing_or_garbage_file(tmp_path):
    version = tmp_path / "seg" / "1"
    with pytest.raises(FileNotFoundError, match="shaspec_export.json"):
        read_manifest(str(version))
    (version / "assets.extra").mkdir(parents=True)
    path = version / MANIFEST_PATH
    for content in (b"{\"task\": ", b"\xff\xfe garbage", b"[1, 2]", b"{\"format\": 1}"):
        path.write_bytes(content)
        with pytest.raises(ValueError) as info:
            read_manifest(str(version))
        assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1, content


def test_export_stages_under_a_name_clean_stale_knows(exported, tmp_path, monkeypatch):
    from shaspec_tf import fileio

    model_dir = tmp_path / "base" / "m"
    host = fileio.host_name()
    dead = f".3.partial-{host}-99999999-deadbeef"     # a killed export of this host: removed
    live = f".4.partial-{host}-{os.getpid()}-cafecafe"  # a running export: kept
    remote = ".5.partial-otherhost-12-cafecafe"       # another host's: kept
    for entry in (dead, live, remote, "2"):
        (model_dir / entry).mkdir(parents=True)
    staged = []

    def broken_write_out(self, filepath, *args, **kwargs):
        staged.append(os.path.basename(filepath))
        os.makedirs(os.path.join(filepath, "variables"), exist_ok=True)  # half-written, then killed
        raise RuntimeError("disk full")

    monkeypatch.setattr(keras.export.ExportArchive, "write_out", broken_write_out)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(exported["classifier"], str(tmp_path / "base"), "m")
    # Staged as a hidden non-integer folder that names this process, so a killed run's leftover can be cleaned.
    assert len(staged) == 1 and staged[0].startswith(f".3.partial-{host}-{os.getpid()}-"), staged
    assert sorted(os.listdir(model_dir)) == sorted([live, remote, "2"])
    assert list_versions(str(tmp_path / "base"), "m") == [2]
