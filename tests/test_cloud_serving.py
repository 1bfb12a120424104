"""Evaluation, export, prediction and serving with every path on Cloud Storage (the emulator): a model trained here
is exported to ``gs://``, evaluated on records in the bucket, segments NIfTI cases read from the bucket into the
bucket, is served by ``shaspec serve --model-base gs://...``, and is pushed by the Pipeline's Pusher to ``gs://``.
What touches ``gs://`` runs in child processes (TensorFlow picks its ``gs://`` filesystem at import)."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from conftest import run_with_gcs
from gcs_emulator import free_port

from shaspec_tf.cli import main
from shaspec_tf.data.toy import toy_case

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow]

BUCKET = "cloud-serving"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def local(tmp_path_factory, brats_data):
    """A tiny segmenter trained here (one step on conftest's toy records), two NIfTI sequences of a toy case, and
    the label map ``shaspec predict`` writes from them locally."""
    root = tmp_path_factory.mktemp("cloud-serving")
    assert main(["train", "--task", "brats", "--data", brats_data, "--out", str(root / "model"), "--preset", "tiny",
                 "--steps", "1", "--checkpoint-every", "1", "--batch-size", "1", "--crop", "32,32,32", "--eager"]) == 0
    image, _ = toy_case(np.random.default_rng(5), (40, 48, 44))
    os.makedirs(root / "cases")
    for index, name in ((0, "flair"), (2, "t1ce")):
        volume = np.transpose(image[..., index] * 100 + 300 * (image[..., index] != 0), (2, 1, 0))
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([1.5, 1.0, 2.0, 1.0])),
                 str(root / "cases" / f"case_{name}.nii.gz"))
    assert main(["predict", "--model", str(root / "model"), "--flair", str(root / "cases" / "case_flair.nii.gz"),
                 "--t1ce", str(root / "cases" / "case_t1ce.nii.gz"), "--out", str(root / "local_seg.nii.gz"),
                 "--roi", "32,32,32"]) == 0
    return root


@pytest.fixture(scope="module")
def on_bucket(gcs, local, brats_data):
    """``shaspec export``, ``evaluate`` and ``predict`` (and their refusals), a ``.keras`` archive, and the
    Pipeline's Pusher, with gs:// paths, in one child process; returns what it saw, with the bucket's object
    names."""
    bucket = gcs.create_bucket(BUCKET)
    out = run_with_gcs(gcs, f"""
        import json, sys
        import numpy as np
        from shaspec_tf import fileio as F
        from shaspec_tf.models.saving import save_model
        from shaspec_tf.segment_nifti import is_our_label_map
        from shaspec_tf.trained import load_trained
        from shaspec_serving.cli import main

        b, local = "{bucket}", {str(local)!r}
        F.upload_tree(local + "/model", b + "/runs/tiny")
        F.upload_tree({brats_data!r}, b + "/data")
        F.upload_tree(local + "/cases", b + "/cases")
        res, errors = {{}}, {{}}

        def run(key, *args):
            res[key] = main(list(args))

        run("export", "export", "--model", b + "/runs/tiny", "--out", b + "/models", "--name", "seg")
        run("export_again", "export", "--model", b + "/runs/tiny", "--out", b + "/models", "--name", "seg",
            "--version", "1")
        run("evaluate", "evaluate", "--model", b + "/runs/tiny", "--data", b + "/data", "--split", "train",
            "--out", b + "/reports/tiny", "--roi", "32,32,32")
        F.atomic_write(b + "/reports/theirs/notes.txt", "a user's notes")
        run("evaluate_theirs", "evaluate", "--model", b + "/runs/tiny", "--data", b + "/data", "--split", "train",
            "--out", b + "/reports/theirs", "--roi", "32,32,32")
        cases = ["--flair", b + "/cases/case_flair.nii.gz", "--t1ce", b + "/cases/case_t1ce.nii.gz"]
        run("predict", "predict", "--model", b + "/runs/tiny", *cases, "--out", b + "/pred/seg.nii.gz",
            "--roi", "32,32,32")
        run("predict_onto_input", "predict", "--model", b + "/runs/tiny", *cases, "--out", cases[1])
        F.copy(b + "/cases/case_flair.nii.gz", b + "/pred/mine.nii.gz")  # a user's file where a label map could go
        run("predict_onto_theirs", "predict", "--model", b + "/runs/tiny", *cases, "--out", b + "/pred/mine.nii.gz")
        res["ours"] = [is_our_label_map(b + "/pred/seg.nii.gz"), is_our_label_map(b + "/pred/mine.nii.gz")]
        F.atomic_write(local + "/bucket_seg.nii.gz", F.read_bytes(b + "/pred/seg.nii.gz"))
        res["metrics"] = F.read_json(b + "/reports/tiny/metrics.json")
        res["report_files"] = sorted(F.list_files(b + "/reports/tiny"))
        res["report_kind"] = F.read_marker(b + "/reports/tiny")["kind"]
        res["manifest"] = F.read_json(b + "/models/seg/1/assets.extra/shaspec_export.json")
        # the folder format and a .keras archive on the bucket load alike
        model = load_trained(b + "/runs/tiny")
        save_model(model, b + "/runs/tiny.keras", include_optimizer=False)
        again = load_trained(b + "/runs/tiny.keras")
        res["keras_same"] = all(np.array_equal(x, y) for x, y in zip(model.get_weights(), again.get_weights()))

        # the Pipeline's Pusher with a Trainer's Model and the destination on the bucket, twice: pushed once
        from google.protobuf import json_format
        from tfx import v1 as tfx
        from tfx.types import standard_artifacts
        from components.pusher import IdempotentPusherExecutor

        F.upload_tree(b + "/models/seg/1", b + "/artifacts/model/Format-Serving")
        model, blessing = standard_artifacts.Model(), standard_artifacts.ModelBlessing()
        model.uri, blessing.uri = b + "/artifacts/model", b + "/artifacts/blessing"
        blessing.set_int_custom_property("blessed", 1)
        destination = json_format.MessageToJson(tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=b + "/serving/seg")))
        res["pushed"] = []
        for run in range(2):
            push = standard_artifacts.PushedModel()
            push.uri = b + f"/artifacts/pushed/{{run}}"
            IdempotentPusherExecutor().Do({{"model": [model], "model_blessing": [blessing]}},
                                          {{"pushed_model": [push]}}, {{"push_destination": destination}})
            res["pushed"].append([push.get_int_custom_property("pushed"),
                                  push.get_string_custom_property("pushed_version"),
                                  push.get_string_custom_property("pushed_destination")])
        res["push_versions"] = F.listdir(b + "/serving/seg")
        print(json.dumps(res))
    """, timeout=400)
    out["objects"] = gcs.list_objects(BUCKET)
    return {"bucket": bucket, **out}


def test_export_evaluate_and_predict_write_to_the_bucket(on_bucket, local, capfd):
    assert on_bucket["export"] == 0 and on_bucket["evaluate"] == 0 and on_bucket["predict"] == 0, on_bucket
    objects = on_bucket["objects"]
    for name in ("models/seg/1/saved_model.pb", "models/seg/1/variables/variables.index",
                 "models/seg/1/assets.extra/shaspec_export.json", "reports/tiny/metrics.json",
                 "reports/tiny/metrics.csv", "reports/tiny/metrics.md", "reports/tiny/heatmap.png",
                 "reports/tiny/.shaspec-output.json", "pred/seg.nii.gz", "runs/tiny.keras"):
        assert name in objects, (name, objects)
    assert not [n for n in objects if ".partial-" in n or ".old-" in n], objects
    assert on_bucket["manifest"]["model_name"] == "seg" and on_bucket["manifest"]["version"] == 1
    assert on_bucket["manifest"]["source"] == f"{on_bucket['bucket']}/runs/tiny"
    assert on_bucket["report_kind"] == "evaluation-report"
    assert {"metrics.json", "metrics.csv", "metrics.md", "heatmap.png"} <= set(on_bucket["report_files"])
    metrics = on_bucket["metrics"]
    assert len(metrics) == 16 and 0.0 <= metrics["mean"]["WT"]["dice"] <= 1.0
    # the label map written to the bucket from the bucket's inputs is the one written here from local inputs
    ours, theirs = nib.load(str(local / "bucket_seg.nii.gz")), nib.load(str(local / "local_seg.nii.gz"))
    assert ours.shape == theirs.shape == (44, 48, 40) and np.allclose(ours.affine, theirs.affine)
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    assert on_bucket["keras_same"]


def test_the_safety_rules_hold_on_the_bucket(on_bucket):
    assert on_bucket["export_again"] == 2, "an existing version is never overwritten"
    assert on_bucket["evaluate_theirs"] == 2, "a folder we did not write is never replaced"
    assert on_bucket["predict_onto_input"] == 2 and on_bucket["predict_onto_theirs"] == 2
    assert on_bucket["ours"] == [True, False]
    objects = on_bucket["objects"]
    assert [n for n in objects if n.startswith("reports/theirs/")] == ["reports/theirs/notes.txt"]
    assert [n for n in objects if n.startswith("models/seg/") and n.count("/") == 3 and
            n.endswith("saved_model.pb")] == ["models/seg/1/saved_model.pb"]


def _get_json(url: str, body=None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_serve_reads_its_models_from_the_bucket(gcs, on_bucket, local):
    from shaspec_tf.trained import load_trained

    grpc_port, rest_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "shaspec_serving.cli", "serve",
                               "--model-base", f"{on_bucket['bucket']}/models", "--grpc-port", str(grpc_port),
                               "--rest-port", str(rest_port), "--poll-seconds", "30"], cwd=ROOT,
                              env={**os.environ, **gcs.env()}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{rest_port}/v1/models/seg"
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and server.poll() is None:
            try:
                status = _get_json(url)
                break
            except OSError:
                time.sleep(0.5)
        assert status is not None, server.stdout.read()[-3000:] if server.poll() is not None else "no answer in 120 s"
        assert status["model_version_status"][0]["version"] == "1"
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        rng = np.random.default_rng(3)
        image = rng.normal(size=(1, 32, 32, 32, 4)).astype(np.float32)
        mask = np.array([[1, 0, 1, 1]], np.float32)
        outputs = _get_json(url + ":predict", {"signature_name": "serving_default",
                                               "inputs": {"image": image.tolist(), "modality_mask": mask.tolist()}})
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    model = load_trained(str(local / "model"))
    logits = np.asarray(model.predict_on_batch({"image": image, "modality_mask": mask})["logits"])
    np.testing.assert_allclose(np.asarray(outputs["outputs"]["probabilities"]), 1 / (1 + np.exp(-logits)),
                               atol=1e-5)


def test_the_pusher_pushes_to_the_bucket_once(on_bucket):
    (first, version, where), second = on_bucket["pushed"]
    assert first == 1 and second == [1, version, where], on_bucket["pushed"]
    assert on_bucket["push_versions"] == [version] and where == f"{on_bucket['bucket']}/serving/seg/{version}"
    objects = on_bucket["objects"]
    for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index"):
        assert f"serving/seg/{version}/{name}" in objects
