"""The local TF-Serving-compatible server (``shaspec serve``) and the gRPC / REST clients, on a tiny export."""
import inspect
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import keras
import nibabel as nib
import numpy as np
import pytest
from scipy import special

import shaspec_tf
from shaspec_serving.cli import main  # the installed 'shaspec' program: the library's commands and 'serve'
from shaspec_serving.server import LocalServer
from shaspec_tf.cli import main as library_main  # python -m shaspec_tf.cli: no 'serve', but 'predict --server'
from shaspec_tf.serving_client import GrpcClient, RestClient, ServingError, segment_volume
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


@pytest.fixture(scope="module")
def limited(served, tmp_path_factory):
    """A second server with tiny limits (1 MiB requests, 2 s read timeout, 2 workers / REST connections) that serves
    the models ``served`` already loaded (no second load)."""
    server = LocalServer(str(tmp_path_factory.mktemp("limited")), grpc_port=0, rest_port=0, host="127.0.0.1",
                         poll_seconds=0, max_workers=2, max_request_bytes="1MiB", read_timeout_s=2.0)
    server.registry = served["server"].registry
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")  # raw bytes, for what the client cannot send
    client = GrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=120)
    try:
        yield {"server": server, "channel": channel, "grpc": client, "rest_port": server.rest_port}
    finally:
        client.close()
        channel.close()
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
    grpc_source = ["--server", f"127.0.0.1:{served['server'].grpc_port}", "--model-name", "seg"]
    for how, program, source in (
            ("model", main, ["--model", str(served["root"] / "trained")]),
            ("grpc", main, grpc_source),
            ("rest", main, ["--server", f"127.0.0.1:{served['server'].rest_port}", "--model-name", "seg",
                            "--protocol", "rest"]),
            ("library", library_main, grpc_source)):  # the client is the library's: no serving app needed
        out = tmp_path / how / "seg.nii.gz"
        assert program(["predict"] + source + args + ["--out", str(out)]) == 0
        seg = nib.load(str(out))
        assert seg.shape == (44, 48, 40) and np.allclose(seg.affine, affine)
        outputs[how] = np.asanyarray(seg.dataobj)
        assert os.listdir(out.parent) == ["seg.nii.gz"]
    assert set(np.unique(outputs["model"])) <= {0, 1, 2, 4} and len(np.unique(outputs["model"])) > 1
    np.testing.assert_array_equal(outputs["grpc"], outputs["model"])
    np.testing.assert_array_equal(outputs["rest"], outputs["model"])
    np.testing.assert_array_equal(outputs["library"], outputs["model"])
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
    # The library's command line alone has no 'serve': one line saying where it is, nothing started.
    assert library_main(["serve", "--model-base", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shaspec serve: error: 'serve' is the serving app's command"), err


# --------------------------------------------------------------------------------------------------------------
# Exposure, limits and malformed input
# --------------------------------------------------------------------------------------------------------------
def test_serve_defaults_to_loopback_and_safe_limits(tmp_path, monkeypatch, capsys):
    import shaspec_serving.server as server_module

    for function in (server_module.LocalServer.__init__, server_module.serve):
        parameters = inspect.signature(function).parameters
        assert parameters["host"].default == "127.0.0.1"
        assert parameters["max_request_bytes"].default == 1 << 30
        assert parameters["read_timeout_s"].default == 30.0
    calls = []
    monkeypatch.setattr(server_module, "serve", lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
    base = str(tmp_path)
    assert server_module.main(["--model-base", base]) == 0  # python -m shaspec_serving.server
    assert main(["serve", "--model-base", base]) == 0  # shaspec serve
    for args, kwargs in calls:
        assert args[3] == "127.0.0.1"
        assert server_module.parse_size(kwargs.get("max_request_bytes", 1 << 30)) == 1 << 30
        assert kwargs.get("read_timeout_s", 30.0) == 30.0
    calls.clear()
    assert main(["serve", "--model-base", base, "--host", "0.0.0.0", "--max-request-bytes", "512MiB",
                 "--read-timeout", "5"]) == 0
    assert server_module.main(["--model-base", base, "--max-request-bytes", "512M", "--read-timeout", "5"]) == 0
    assert calls[0][0][3] == "0.0.0.0"
    for args, kwargs in calls:
        assert server_module.parse_size(kwargs["max_request_bytes"]) == 512 << 20 and kwargs["read_timeout_s"] == 5
    monkeypatch.undo()

    # Bad limits: one line, exit 2, nothing started.
    monkeypatch.setattr(server_module.LocalServer, "start", lambda self: pytest.fail("started despite bad limits"))
    for argv in (["--max-request-bytes", "lots"], ["--max-request-bytes", "0"], ["--read-timeout", "0"]):
        capsys.readouterr()
        assert main(["serve", "--model-base", base] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "shaspec serve: error:" in err[0], err
        assert server_module.main(["--model-base", base] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], err
    assert server_module.parse_size("1GiB") == server_module.parse_size("1g") == 1 << 30
    assert server_module.parse_size(1000) == 1000 and server_module.parse_size("64k") == 64 << 10


def test_an_exposed_host_logs_what_is_exposed(tmp_path, monkeypatch, caplog):
    from shaspec_serving.server import exposure_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, 8500, 8501) is None, host
    for host in ("0.0.0.0", "", "::", "192.0.2.7"):
        text = exposure_warning(host, 8500, 8501)
        assert "8500" in text and "8501" in text and "no authentication" in text and "no TLS" in text, text
        assert "network policy" in text and "\n" not in text

    # LocalServer.start logs it with the bound ports (forced here: tests listen on 127.0.0.1 only).
    caplog.set_level(logging.INFO, logger="shaspec.serving")
    server = LocalServer(str(tmp_path), grpc_port=0, rest_port=0, poll_seconds=0).start()
    try:
        assert server.host == "127.0.0.1" and server._http.server_address[0] == "127.0.0.1"
        assert not [r for r in caplog.records if r.name == "shaspec.serving" and r.levelno >= logging.WARNING]
    finally:
        server.stop()
    monkeypatch.setattr("shaspec_serving.server._is_loopback", lambda host: False)
    server = LocalServer(str(tmp_path), grpc_port=0, rest_port=0, host="127.0.0.1", poll_seconds=0).start()
    try:
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "shaspec.serving" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"gRPC port {server.grpc_port}" in warnings[0]
        assert f"REST port {server.rest_port}" in warnings[0] and "no TLS" in warnings[0]
    finally:
        server.stop()


def _tensor(request, key, shape, values=(), content=None, dtype=None):
    from tensorflow.core.framework import types_pb2

    proto = request.inputs[key]
    proto.dtype = types_pb2.DT_FLOAT if dtype is None else dtype
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    if content is not None:
        proto.tensor_content = content
    proto.float_val.extend(values)


def _predict_request(**inputs):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "seg"
    for key, (shape, kwargs) in inputs.items():
        _tensor(request, key, shape, **kwargs)
    return request


def _grpc_code(channel, method, request):
    """(status code name, details) of one raw gRPC call; ``request`` is a message or bytes."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        channel.unary_unary(method)(data, timeout=60)
        return "OK", ""
    except grpc.RpcError as error:
        return error.code().name, error.details()


def test_grpc_tensor_protos_are_checked_before_they_are_decoded(served, limited):
    channel, mask = limited["channel"], ([1, 4], {"values": [1.0]})
    predict = "/tensorflow.serving.PredictionService/Predict"
    cases = [  # (inputs, code, text); the server allows 1 MiB per request
        # one value declared to fill 2 MiB: tf.make_ndarray would expand it
        ({"image": ([1, 32, 64, 64, 4], {"values": [0.5]}), "modality_mask": mask}, "INVALID_ARGUMENT",
         "limit of 1048576 bytes"),
        ({"image": ([1, 10 ** 6, 10 ** 6, 10 ** 6, 4], {"values": [0.5]}), "modality_mask": mask},
         "INVALID_ARGUMENT", "limit of 1048576 bytes"),
        # checked against the signature (rank, fixed dims) before any size
        ({"image": ([1, 10 ** 6, 10 ** 6, 10 ** 6, 3], {"values": [0.5]}), "modality_mask": mask},
         "INVALID_ARGUMENT", "must have shape [?, ?, ?, ?, 4]"),
        ({"image": ([10 ** 6, 10 ** 6, 10 ** 6], {"values": [0.5]}), "modality_mask": mask}, "INVALID_ARGUMENT",
         "(rank 5), got [1000000, 1000000, 1000000]"),
        # unknown inputs are refused by name, never decoded
        ({"image": ([1, 16, 32, 32, 4], {"values": [0.5]}), "modality_mask": mask,
          "extra": ([10 ** 6, 10 ** 6, 10 ** 6], {"values": [0.5]})}, "INVALID_ARGUMENT", "unknown input 'extra'"),
        # what is carried must fit the declared shape
        ({"image": ([1, 16, 32, 32, 4], {"content": b"\0" * 12}), "modality_mask": mask}, "INVALID_ARGUMENT",
         "carries 12 bytes of tensor_content"),
        ({"image": ([1, 1, 1, 1, 4], {"values": [0.5] * 5}), "modality_mask": mask}, "INVALID_ARGUMENT",
         "carries 5 values"),
        ({"image": ([1, -1, 32, 32, 4], {"values": [0.5]}), "modality_mask": mask}, "INVALID_ARGUMENT",
         "negative dimension"),
        ({"image": ([1, 16, 32, 32, 4], {"values": [0.5], "dtype": 999}), "modality_mask": mask},
         "INVALID_ARGUMENT", "must be float32, got an unknown dtype"),
    ]
    for inputs, code, text in cases:
        request = _predict_request(**inputs)
        assert len(request.SerializeToString()) < 200
        got, details = _grpc_code(channel, predict, request)
        assert got == code and text in details and "\n" not in details, (list(inputs), got, details)

    # gRPC's own receive limit is the same 1 MiB
    image, mask_array = _patch(6, (1, 32, 64, 64, 4))
    with pytest.raises(ServingError, match="RESOURCE_EXHAUSTED"):
        limited["grpc"].predict("seg", {"image": image, "modality_mask": mask_array})

    # One value broadcast within the limit is still TF Serving's "repeat the last value", and the server works.
    request = _predict_request(image=([1, 16, 32, 32, 4], {"values": [0.5]}), modality_mask=mask)
    response = limited["grpc"]._predict.Predict(request, timeout=120)
    full = served["grpc"].predict("seg", {"image": np.full((1, 16, 32, 32, 4), 0.5, np.float32),
                                          "modality_mask": np.ones((1, 4), np.float32)})
    import tensorflow as tf

    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), full["probabilities"], atol=1e-6)


def _http_exchange(port, data, wait=10.0):
    """(status, JSON body or None, seconds until the server answered and closed) of raw bytes sent to the REST port;
    reads until the server closes the connection or ``wait`` seconds pass."""
    start = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if data:
            sock.sendall(data)
        received = b""
        try:
            while time.time() - start < wait:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (socket.timeout, ConnectionError):
            pass
    elapsed = time.time() - start
    if not received:
        return None, None, elapsed
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body), elapsed
    except ValueError:
        return status, body, elapsed


def _post_head(length=None, extra=""):
    head = "POST /v1/models/seg:predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode()


def test_rest_body_size_is_checked_before_the_body_is_read(limited):
    port = limited["rest_port"]
    cases = [  # nothing but the headers is sent: each is answered at once, and the connection closed
        (_post_head(2 << 20), 413, "more than this server's limit of 1048576 bytes"),
        (_post_head(2 << 20, "Expect: 100-continue\r\n"), 413, "limit of 1048576 bytes"),
        (_post_head(), 411, "needs a Content-Length"),
        (_post_head("lots"), 400, "invalid Content-Length"),
        (_post_head(None, "Transfer-Encoding: chunked\r\n"), 411, "chunked request bodies are not supported"),
    ]
    for data, status, text in cases:
        got, body, elapsed = _http_exchange(port, data, wait=8)
        assert got == status and text in body["error"] and elapsed < 5, (data, got, body, elapsed)

    # A small enough body is served as ever.
    image, mask = _patch(7, (1, 16, 32, 32, 4))
    image = np.round(image.astype(np.float64), 1)  # short numbers: ~0.4 MB of JSON
    status, payload = _raw(f"http://127.0.0.1:{port}/v1/models/seg:predict",
                           {"inputs": {"image": image.tolist(), "modality_mask": mask.tolist()}})
    assert status == 200 and np.asarray(payload["outputs"]["labels"]).shape == (1, 16, 32, 32)


def test_rest_stalled_clients_are_dropped_and_connections_bounded(limited):
    port = limited["rest_port"]
    # A client that stalls mid-body is dropped after the read timeout (2 s here), with a 408.
    got, body, elapsed = _http_exchange(port, _post_head(100) + b'{"inputs"', wait=15)
    assert got == 408 and "nothing received for 2 s" in body["error"] and 1.5 < elapsed < 10, (got, body, elapsed)

    # At most 2 connections at once: a third is refused with 503 at once, and served again once they are gone.
    time.sleep(0.5)  # the connections above have given their slots back
    holders = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)
        got, body, elapsed = _http_exchange(port, b"", wait=5)
        assert got == 503 and "server busy" in body["error"] and elapsed < 3, (got, body)
    finally:
        for sock in holders:
            sock.close()
    deadline, got = time.time() + 20, None
    while time.time() < deadline and got != 200:
        got, body, _ = _http_exchange(port, b"GET /v1/models/seg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.2)
    assert got == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"


def test_malformed_rest_bodies_get_400_with_one_line(served):
    url, port = served["rest_url"], served["server"].rest_port
    predict = url + "/v1/models/seg:predict"
    deep = b"[" * 100000 + b"]" * 100000
    cases = [
        (deep, "nested too deeply"),
        (b'{"inputs": ' + deep + b"}", "nested too deeply"),
        (b'{"inputs": ' + b"7" * 5000 + b"}", "JSON parse error"),  # int() digit limit: a ValueError
        (b'{"inputs": {"image": ' + b"[" * 500 + b"1" + b"]" * 500 + b', "modality_mask": [[1, 1, 1, 1]]}}',
         "cannot be read as float32"),
        (b"\xff\xfe{", "JSON parse error"),
    ]
    for body, text in cases:
        status, payload = _raw(predict, body)
        assert status == 400 and text in payload["error"] and "\n" not in payload["error"], (body[:40], payload)
    # http.server's own refusals are JSON too, and non-ASCII digits are no version number
    got, body, _ = _http_exchange(port, b"PUT /v1/models/seg HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert got == 501 and "PUT" in body["error"]
    got, body, _ = _http_exchange(port, "GET /v1/models/seg/versions/\u00b2 HTTP/1.1\r\nHost: x\r\n"
                                        "Connection: close\r\n\r\n".encode("latin-1"))
    assert got == 404 and "unknown path" in body["error"]
    assert served["rest"].status("seg")[0]["state"] == "AVAILABLE"


def test_bytes_that_are_not_the_grpc_message_get_invalid_argument(served):
    # INVALID_ARGUMENT, not INTERNAL (gRPC's answer when the generated deserializer raises)
    channel = grpc.insecure_channel(f"127.0.0.1:{served['server'].grpc_port}")
    try:
        for method in ("/tensorflow.serving.PredictionService/Predict",
                       "/tensorflow.serving.PredictionService/GetModelMetadata",
                       "/tensorflow.serving.ModelService/GetModelStatus"):
            code, details = _grpc_code(channel, method, b"\xff\xff\xff\xff")
            assert code == "INVALID_ARGUMENT" and "is not a valid tensorflow.serving." in details, (method, details)
    finally:
        channel.close()
    assert served["grpc"].status("seg")[0]["state"] == "AVAILABLE"


def _versions(client, name="seg"):
    """``[(version, state)]`` of a model; ``[]`` while the server knows nothing of it."""
    try:
        return [(s["version"], s["state"]) for s in client.status(name)]
    except ServingError as error:
        if error.code == "NOT_FOUND":
            return []
        raise


def _save_mini_model(path):
    """A SavedModel with one variable (``y = 3 x``, x float32 [None, 2]): loads in a fraction of a second."""
    import tensorflow as tf

    class Mini(tf.Module):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(3.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"y": x * self.scale}

    mini = Mini()
    tf.saved_model.save(mini, str(path), signatures={"serving_default": mini.serve})


def test_a_version_copied_in_file_by_file_is_served_once_complete(served, tmp_path):
    _save_mini_model(tmp_path / "mini")
    folder, client = served["root"] / "base" / "mini", served["grpc"]
    os.makedirs(folder / "1")
    try:
        shutil.copy2(tmp_path / "mini" / "saved_model.pb", folder / "1")  # the variables come later
        assert _wait_for(lambda: _versions(client, "mini") == [(1, "END")])
        with pytest.raises(ServingError, match="FAILED_PRECONDITION"):
            client.predict("mini", {"x": np.ones((1, 2), np.float32)})
        shutil.copytree(tmp_path / "mini", folder / "1", dirs_exist_ok=True)
        assert _wait_for(lambda: _versions(client, "mini") == [(1, "AVAILABLE")])
        out = client.predict("mini", {"x": np.array([[1.0, 2.0]], np.float32)})
        np.testing.assert_allclose(out["y"], [[3.0, 6.0]])
    finally:
        shutil.rmtree(folder)
    assert _wait_for(lambda: _versions(client, "mini") == [])


def test_a_garbage_saved_model_is_logged_once_and_refused_clearly(served, caplog):
    folder, client = served["root"] / "base" / "seg", served["grpc"]
    caplog.set_level(logging.INFO, logger="shaspec.serving")
    try:
        for version, data in ((7, b"\xff\x00 not a saved model"), (8, b"")):
            os.makedirs(folder / f".{version}")
            (folder / f".{version}" / "saved_model.pb").write_bytes(data)
            os.rename(folder / f".{version}", folder / str(version))  # whole: one failed load, one log line
        assert _wait_for(lambda: _versions(client) == [(1, "AVAILABLE"), (7, "END"), (8, "END")])
        image, mask = _patch(9, (1, 16, 32, 32, 4))
        with pytest.raises(ServingError, match="FAILED_PRECONDITION: version 7 of model 'seg' failed to load"):
            client.predict("seg", {"image": image, "modality_mask": mask}, version=7)
        status, payload = _raw(served["rest_url"] + "/v1/models/seg/versions/8/metadata")
        assert status == 400 and "version 8 of model 'seg' failed to load" in payload["error"]
        # the others keep serving, and a request without a version gets the highest one that loaded
        assert client.metadata("seg")["version"] == 1
        assert sorted(client.predict("seg", {"image": image, "modality_mask": mask})) == ["labels", "probabilities"]
        time.sleep(1.5)  # three more scans: an unchanged broken version is not tried (nor logged) again
        errors = [r.getMessage() for r in caplog.records if r.name == "shaspec.serving" and r.levelno >= logging.ERROR]
        for version, text in ((7, "is not a SavedModel protobuf"), (8, "holds no MetaGraph")):
            lines = [e for e in errors if f"seg version {version} " in e]
            assert len(lines) == 1 and text in lines[0] and "\n" not in lines[0], errors
            assert text in client.status("seg", version=version)[0]["error_message"]
    finally:
        for version in (7, 8):
            shutil.rmtree(folder / str(version), ignore_errors=True)
            shutil.rmtree(folder / f".{version}", ignore_errors=True)
    assert _wait_for(lambda: _versions(client) == [(1, "AVAILABLE")])
