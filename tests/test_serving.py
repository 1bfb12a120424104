"""The local TF-Serving-compatible server (``shaspec serve``) and the gRPC / REST clients, on a tiny export."""
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import keras
import nibabel as nib
import numpy as np
import pytest
from scipy import special

import shaspec_tf
from serving.client import GrpcClient, RestClient, ServingError, segment_volume
from serving.server import LocalServer
from shaspec_tf.cli import main
from shaspec_tf.data.toy import toy_case
from shaspec_tf.export import export_model

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    keras.utils.set_random_seed(7)
    model = shaspec_tf.build_segmenter("tiny")
    os.makedirs(root / "trained")
    model.save_weights(str(root / "trained" / "model.weights.h5"))
    (root / "trained" / "model_config.json").write_text(model.config_json())
    export_model(model, str(root / "base"), "seg")
    server = LocalServer(str(root / "base"), grpc_port=0, rest_port=0, host="127.0.0.1", poll_seconds=0.5).start()
    grpc_client = GrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=120)
    rest_client = RestClient(f"127.0.0.1:{server.rest_port}", timeout=120)
    try:
        yield {"root": root, "model": model, "server": server, "grpc": grpc_client, "rest": rest_client,
               "rest_url": f"http://127.0.0.1:{server.rest_port}"}
    finally:
        grpc_client.close()
        server.stop()


def _patch(seed, shape=(1, 32, 32, 32, 4)):
    rng = np.random.default_rng(seed)
    mask = np.ones((shape[0], 4), np.float32)
    mask[:, rng.integers(0, 4)] = 0.0  # one missing modality, a different one per seed
    return rng.normal(size=shape).astype(np.float32), mask


def _expected(model, image, mask):
    return special.expit(np.asarray(model.predict_on_batch({"image": image, "modality_mask": mask})["logits"]))


def _raw(url, body=None, method=None):
    """(HTTP status, decoded JSON) of one REST call; ``body`` is sent as given (bytes) or JSON-encoded."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_predict_round_trip_matches_the_model(served, protocol):
    image, mask = _patch(1, (2, 32, 64, 64, 4))
    out = served[protocol].predict("seg", {"image": image, "modality_mask": mask})
    assert sorted(out) == ["labels", "probabilities"]
    assert out["probabilities"].dtype == np.float32 and out["labels"].dtype == np.uint8
    np.testing.assert_allclose(out["probabilities"], _expected(served["model"], image, mask), atol=1e-5)
    assert out["labels"].shape == (2, 32, 64, 64) and set(np.unique(out["labels"])) <= {0, 1, 2, 4}


def test_segment_volume_is_the_same_over_both_protocols(served):
    volume = np.random.default_rng(2).normal(size=(20, 50, 70, 4)).astype(np.float32)
    by_grpc = segment_volume(served["grpc"], "seg", volume, [1, 0, 1, 1])
    by_rest = segment_volume(served["rest"], "seg", volume, [1, 0, 1, 1])
    assert by_grpc.shape == (20, 50, 70) and by_grpc.dtype == np.uint8
    np.testing.assert_array_equal(by_grpc, by_rest)


def test_metadata_and_status(served):
    for client in (served["grpc"], served["rest"]):
        meta = client.metadata("seg")
        assert meta["version"] == 1 and sorted(meta["signature_def"]) == ["segment_volume", "serving_default"]
        default = meta["signature_def"]["serving_default"]
        assert sorted(default["inputs"]) == ["image", "modality_mask"]
        assert default["outputs"]["labels"]["dtype"] == "DT_UINT8"
        assert default["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"
        assert meta["signature_def"]["segment_volume"]["outputs"]["labels"]["dtype"] == "DT_UINT8"
        assert client.status("seg") == [{"version": 1, "state": "AVAILABLE", "error_message": ""}]
        assert client.status("seg", version=1)[0]["state"] == "AVAILABLE"
    status, body = _raw(served["rest_url"] + "/v1/models/seg")
    assert status == 200 and body["model_version_status"][0]["status"]["error_code"] == "OK"


def _bad_requests():
    image, mask = _patch(3)
    return [
        ("missing input", "seg", {"image": image}, {}, "INVALID_ARGUMENT", 400, "missing input 'modality_mask'"),
        ("wrong rank", "seg", {"image": image[0], "modality_mask": mask}, {}, "INVALID_ARGUMENT", 400, "rank 5"),
        ("wrong channels", "seg", {"image": image[..., :3], "modality_mask": mask}, {}, "INVALID_ARGUMENT", 400,
         "[?, ?, ?, ?, 4]"),
        ("all-zero mask", "seg", {"image": image, "modality_mask": mask * 0}, {}, "INVALID_ARGUMENT", 400,
         "all zero"),
        ("not divisible", "seg", {"image": image[:, :20], "modality_mask": mask}, {}, "INVALID_ARGUMENT", 400,
         "divisible by (16, 32, 32)"),
        ("unknown input", "seg", {"image": image, "modality_mask": mask, "extra": mask}, {}, "INVALID_ARGUMENT",
         400, "unknown input 'extra'"),
        ("unknown signature", "seg", {"image": image, "modality_mask": mask}, {"signature_name": "nope"},
         "INVALID_ARGUMENT", 400, "'nope' not found"),
        ("unknown model", "nope", {"image": image, "modality_mask": mask}, {}, "NOT_FOUND", 404, "'nope'"),
        ("unknown version", "seg", {"image": image, "modality_mask": mask}, {"version": 42}, "NOT_FOUND", 404,
         "version 42"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_malformed_requests_get_the_matching_status(served, case):
    _, name, inputs, kwargs, grpc_code, http_status, text = case
    for client, code in ((served["grpc"], grpc_code), (served["rest"], http_status)):
        with pytest.raises(ServingError) as info:
            client.predict(name, inputs, **kwargs)
        assert info.value.code == code and text in str(info.value), str(info.value)
        assert "\n" not in str(info.value)


def test_malformed_grpc_and_rest_specifics_leave_the_server_working(served):
    image, mask = _patch(4)
    grpc_client, url = served["grpc"], served["rest_url"]
    with pytest.raises(ServingError, match="INVALID_ARGUMENT: input 'image' must be float32, got float64"):
        grpc_client.predict("seg", {"image": image.astype(np.float64), "modality_mask": mask})
    with pytest.raises(ServingError, match="output_filter names unknown output 'nope'"):
        grpc_client.predict("seg", {"image": image, "modality_mask": mask}, output_filter=["nope"])
    assert sorted(grpc_client.predict("seg", {"image": image, "modality_mask": mask},
                                      output_filter=["labels"])) == ["labels"]

    predict = url + "/v1/models/seg:predict"
    cases = [
        (predict, b"{not json", 400, "JSON parse error"),
        (predict, b"[1, 2]", 400, "JSON object"),
        (predict, {"inputs": {"image": image.tolist()}, "instances": []}, 400, "exactly one of"),
        (predict, {"inputs": {"image": [[1.0, 2.0], [3.0]], "modality_mask": mask.tolist()}}, 400,
         "cannot be read as float32"),
        (predict, {"inputs": {"image": "abc", "modality_mask": mask.tolist()}}, 400, "cannot be read as float32"),
        (url + "/v1/models/seg/versions/9:predict", {"inputs": {"image": image.tolist(),
                                                                "modality_mask": mask.tolist()}}, 404, "version 9"),
        (url + "/v2/whatever", {"inputs": {}}, 404, "unknown path"),
        (url + "/v1/models/seg:classify", {"inputs": {}}, 404, "unsupported method"),
    ]
    for target, body, status, text in cases:
        got, payload = _raw(target, body)
        assert got == status and text in payload["error"], (target, got, payload)
    got, payload = _raw(predict)  # GET on :predict
    assert got == 404 and "needs a POST" in payload["error"]
    got, payload = _raw(url + "/v1/models/nope/metadata")
    assert got == 404 and "'nope'" in payload["error"]

    # Row format (instances) works as in TF Serving and agrees with the columnar answer.
    got, rows = _raw(predict, {"instances": [{"image": image[0].tolist(), "modality_mask": mask[0].tolist()}]})
    assert got == 200 and sorted(rows["predictions"][0]) == ["labels", "probabilities"]
    columnar = served["rest"].predict("seg", {"image": image, "modality_mask": mask})
    np.testing.assert_allclose(np.asarray(rows["predictions"][0]["probabilities"]), columnar["probabilities"][0],
                               atol=1e-6)
    assert served["grpc"].status("seg")[0]["state"] == "AVAILABLE"


def test_twenty_concurrent_requests(served):
    requests = [_patch(100 + i) for i in range(20)]
    expected = [_expected(served["model"], image, mask) for image, mask in requests]

    def call(i):
        client = served["grpc"] if i % 2 else served["rest"]
        image, mask = requests[i]
        return client.predict("seg", {"image": image, "modality_mask": mask})

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(call, range(20)))
    for result, want in zip(results, expected):
        np.testing.assert_allclose(result["probabilities"], want, atol=1e-5)
    # Different inputs gave different answers: the server did not mix up concurrent requests.
    assert not np.allclose(results[0]["probabilities"], results[1]["probabilities"])


def _wait_for(condition, timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_new_versions_are_picked_up_and_removed_without_restart(served):
    folder = served["root"] / "base" / "seg"
    client = served["grpc"]
    shutil.copytree(folder / "1", folder / ".incoming")
    os.rename(folder / ".incoming", folder / "2")  # how 'shaspec export' publishes a version
    assert _wait_for(lambda: [s["version"] for s in client.status("seg")] == [1, 2])
    assert client.metadata("seg")["version"] == 2 and served["rest"].metadata("seg")["version"] == 2
    image, mask = _patch(5)
    by_two = client.predict("seg", {"image": image, "modality_mask": mask}, version=2)
    by_one = client.predict("seg", {"image": image, "modality_mask": mask}, version=1)
    np.testing.assert_allclose(by_two["probabilities"], by_one["probabilities"], atol=1e-6)

    # A broken version is reported, not served, and does not disturb the others.
    os.makedirs(folder / "9")
    (folder / "9" / "saved_model.pb").write_bytes(b"not a saved model")
    assert _wait_for(lambda: [s["version"] for s in client.status("seg")] == [1, 2, 9])
    broken = client.status("seg", version=9)[0]
    assert broken["state"] == "END" and broken["error_message"]
    assert client.metadata("seg")["version"] == 2

    shutil.rmtree(folder / "9")
    shutil.rmtree(folder / "2")
    assert _wait_for(lambda: [s["version"] for s in client.status("seg")] == [1])
    with pytest.raises(ServingError, match="NOT_FOUND"):
        client.predict("seg", {"image": image, "modality_mask": mask}, version=2)


def test_predict_server_writes_the_same_nifti_as_predict_model(served, tmp_path, capsys):
    image, _ = toy_case(np.random.default_rng(11), (40, 48, 44))
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    args = []
    for index, name in ((0, "flair"), (2, "t1ce"), (3, "t2")):
        volume = np.transpose(image[..., index] * 100 + 300 * (image[..., index] != 0), (2, 1, 0))
        path = tmp_path / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
        args += [f"--{name}", str(path)]
    outputs = {}
    for how, source in (("model", ["--model", str(served["root"] / "trained")]),
                        ("grpc", ["--server", f"127.0.0.1:{served['server'].grpc_port}", "--model-name", "seg"]),
                        ("rest", ["--server", f"127.0.0.1:{served['server'].rest_port}", "--model-name", "seg",
                                  "--protocol", "rest"])):
        out = tmp_path / how / "seg.nii.gz"
        assert main(["predict"] + source + args + ["--out", str(out)]) == 0
        seg = nib.load(str(out))
        assert seg.shape == (44, 48, 40) and np.allclose(seg.affine, affine)
        outputs[how] = np.asanyarray(seg.dataobj)
        assert os.listdir(out.parent) == ["seg.nii.gz"]
    assert set(np.unique(outputs["model"])) <= {0, 1, 2, 4} and len(np.unique(outputs["model"])) > 1
    np.testing.assert_array_equal(outputs["grpc"], outputs["model"])
    np.testing.assert_array_equal(outputs["rest"], outputs["model"])
    assert "segmented from flair+t1ce+t2" in capsys.readouterr().out


def test_cli_errors_are_one_line(served, tmp_path, capsys):
    flair = ["--flair", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o.nii.gz")]
    server = ["--server", f"127.0.0.1:{served['server'].grpc_port}"]
    with pytest.raises(SystemExit) as info:  # --model and --server are mutually exclusive
        main(["predict", "--model", str(served["root"] / "trained")] + server + flair)
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["predict"] + server + flair) == 2
    assert "--server needs --model-name" in capsys.readouterr().err
    assert main(["predict"] + server + ["--model-name", "seg", "--tta"] + flair) == 2
    assert "fixed in the exported graph" in capsys.readouterr().err
    assert main(["serve", "--model-base", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]
