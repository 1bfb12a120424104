"""A local, pure-TensorFlow stand-in for TensorFlow Serving: the same gRPC and REST APIs, from the same folders.

    python -m serving.server --model-base BASE [--grpc-port 8500] [--rest-port 8501] [--poll-seconds 2]
    shaspec serve --model-base BASE ...                                   (the same)

Every sub-folder of BASE is a model; its integer sub-folders holding a ``saved_model.pb`` are its versions (loaded
with ``tf.saved_model.load``); requests without a version get the highest one. BASE is re-scanned every
``poll_seconds``: a version dropped in (renamed into place, as ``shaspec export`` does) is loaded and served
without a restart, a removed one is unloaded.

gRPC: ``tensorflow.serving.PredictionService/Predict`` and ``GetModelMetadata`` (``signature_def``),
``tensorflow.serving.ModelService/GetModelStatus``. REST: ``POST /v1/models/NAME[/versions/V]:predict`` (row
``instances`` or columnar ``inputs``), ``GET /v1/models/NAME[/versions/V]`` (status) and ``.../metadata``. Errors
carry TF Serving's codes: INVALID_ARGUMENT (REST 400) for malformed requests and failed graph checks, NOT_FOUND
(REST 404) for unknown models, versions and paths; REST error bodies are ``{"error": "..."}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional

import numpy as np

log = logging.getLogger("shaspec.serving")

MAX_MESSAGE_BYTES = 1 << 30  # whole volumes are ~60 MB as float32; leave room
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
                "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "INTERNAL": 500, "UNKNOWN": 500}


class ServingError(Exception):
    """A request that cannot be served; ``code`` is a gRPC status code name (``"NOT_FOUND"``, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ServedVersion:
    """One loaded SavedModel version: its callable signatures and their ``SignatureDef`` protos."""

    def __init__(self, name: str, version: int, path: str):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.name, self.version, self.path = name, version, path
        self.mtime = os.path.getmtime(os.path.join(path, "saved_model.pb"))
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        self.signature_defs = {k: v for k, v in proto.meta_graphs[0].signature_def.items() if not k.startswith("__")}
        self.loaded = tf.saved_model.load(path)
        self.signatures = {k: self.loaded.signatures[k] for k in self.signature_defs if k in self.loaded.signatures}

    def signature(self, signature_name: str):
        signature_name = signature_name or "serving_default"
        if signature_name not in self.signatures:
            raise ServingError("INVALID_ARGUMENT", f"serving signature key {signature_name!r} not found in model "
                                                   f"{self.name!r} version {self.version} (has "
                                                   f"{', '.join(sorted(self.signatures))})")
        return signature_name, self.signatures[signature_name]

    def input_specs(self, signature_name: str) -> dict:
        return dict(self.signature(signature_name)[1].structured_input_signature[1])

    def predict(self, signature_name: str, inputs: Dict[str, np.ndarray], output_filter=()) -> Dict[str, np.ndarray]:
        """Validate ``inputs`` (numpy arrays, already of the signature's dtypes) against the signature and run it."""
        import tensorflow as tf

        signature_name, fn = self.signature(signature_name)
        specs = fn.structured_input_signature[1]
        expected = ", ".join(sorted(specs))
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise ServingError("INVALID_ARGUMENT", f"missing input {missing[0]!r} for signature {signature_name!r} "
                                                   f"(expects {expected})")
        extra = sorted(set(inputs) - set(specs))
        if extra:
            raise ServingError("INVALID_ARGUMENT", f"unknown input {extra[0]!r} for signature {signature_name!r} "
                                                   f"(expects {expected})")
        tensors = {}
        for key, spec in specs.items():
            value = inputs[key]
            if value.dtype != spec.dtype.as_numpy_dtype:
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} must be {spec.dtype.name}, got {value.dtype}")
            if value.ndim != spec.shape.rank or not spec.shape.is_compatible_with(value.shape):
                want = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape.as_list()) + "]"
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} must have shape {want} (rank "
                                                       f"{spec.shape.rank}), got {list(value.shape)}")
            tensors[key] = tf.constant(value)
        outputs = list(fn.structured_outputs)
        unknown = sorted(set(output_filter) - set(outputs))
        if unknown:
            raise ServingError("INVALID_ARGUMENT", f"output_filter names unknown output {unknown[0]!r} (outputs: "
                                                   f"{', '.join(sorted(outputs))})")
        try:
            result = fn(**tensors)
        except tf.errors.OpError as error:  # graph checks fail with InvalidArgumentError
            code = {tf.errors.INVALID_ARGUMENT: "INVALID_ARGUMENT", tf.errors.OUT_OF_RANGE: "OUT_OF_RANGE",
                    tf.errors.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED"}.get(error.error_code, "INTERNAL")
            raise ServingError(code, _clean_tf_message(error.message)) from None
        wanted = list(output_filter) or outputs
        return {k: result[k].numpy() for k in wanted}


def _clean_tf_message(message: str) -> str:
    """A graph assertion's own message, without TF's tensor dumps and graph context."""
    text = _one_line(message)
    own = re.search(r"assertion failed: \[(.*?)\] \[Condition", text)
    if own:
        return own.group(1)
    return re.split(r" \[\[\{\{|\s\[\[node ", text)[0]


class ModelRegistry:
    """The models under ``base``: ``{name: {version: ServedVersion}}``, refreshed by :meth:`refresh`."""

    def __init__(self, base: str):
        if not os.path.isdir(base):
            raise FileNotFoundError(f"model base {base} is not a folder")
        self.base = base
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._models: Dict[str, Dict[int, ServedVersion]] = {}
        self._failed: Dict[tuple, tuple] = {}  # (name, version) -> (mtime, message)

    def _scan(self) -> dict:
        found = {}
        for name in sorted(os.listdir(self.base)):
            folder = os.path.join(self.base, name)
            if name.startswith(".") or not os.path.isdir(folder):
                continue
            found[name] = {int(v): os.path.join(folder, v) for v in os.listdir(folder)
                           if v.isdigit() and os.path.isfile(os.path.join(folder, v, "saved_model.pb"))}
        return found

    def refresh(self) -> None:
        """Load versions that appeared (or changed) under ``base`` and drop those that went away."""
        with self._refresh_lock:
            found = self._scan()
            with self._lock:
                current = {n: dict(v) for n, v in self._models.items()}
            for name, versions in found.items():
                for version, path in sorted(versions.items()):
                    mtime = os.path.getmtime(os.path.join(path, "saved_model.pb"))
                    served = current.get(name, {}).get(version)
                    if served is not None and served.mtime == mtime:
                        continue
                    if self._failed.get((name, version), (None,))[0] == mtime:
                        continue
                    try:
                        loaded = ServedVersion(name, version, path)
                    except Exception as error:  # a broken export must not stop the others
                        self._failed[(name, version)] = (mtime, _one_line(error))
                        log.error("cannot load %s version %s from %s: %s", name, version, path, _one_line(error))
                        continue
                    self._failed.pop((name, version), None)
                    with self._lock:
                        self._models.setdefault(name, {})[version] = loaded
                    log.info("serving %s version %d from %s", name, version, path)
            with self._lock:
                for name in list(self._models):
                    for version in list(self._models[name]):
                        if version not in found.get(name, {}):
                            del self._models[name][version]
                            log.info("unloaded %s version %d (folder removed)", name, version)
                    if not self._models[name] and name not in found:
                        del self._models[name]
            self._failed = {k: v for k, v in self._failed.items() if k[1] in found.get(k[0], {})}

    def get(self, name: str, version: Optional[int] = None) -> ServedVersion:
        """The served version (the highest one when ``version`` is None); NOT_FOUND otherwise."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                known = ", ".join(sorted(n for n, v in self._models.items() if v)) or "none"
                raise ServingError("NOT_FOUND", f"model {name!r} is not being served (models: {known})")
            if version is None:
                return versions[max(versions)]
            if version not in versions:
                raise ServingError("NOT_FOUND", f"version {version} of model {name!r} is not being served "
                                                f"(versions: {', '.join(str(v) for v in sorted(versions))})")
            return versions[version]

    def status(self, name: str, version: Optional[int] = None) -> list:
        """``[(version, state, error_message)]``: AVAILABLE versions, and END for those that failed to load."""
        with self._lock:
            rows = [(v, "AVAILABLE", "") for v in sorted(self._models.get(name, {}))]
        rows += [(v, "END", msg) for (n, v), (_, msg) in sorted(self._failed.items()) if n == name]
        if version is not None:
            rows = [r for r in rows if r[0] == version]
        if not rows:
            what = f"version {version} of model {name!r}" if version is not None else f"model {name!r}"
            raise ServingError("NOT_FOUND", f"{what} is not being served")
        return sorted(rows)

    def names(self) -> list:
        with self._lock:
            return sorted(n for n, v in self._models.items() if v)


# --------------------------------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------------------------------
def _make_grpc_servicers(registry: ModelRegistry):
    import grpc
    import tensorflow as tf
    from google.protobuf import any_pb2
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         predict_pb2, prediction_service_pb2_grpc)

    def abort(context, error: ServingError):
        context.abort(getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), error.message)

    def requested_version(spec):
        if spec.version_label:
            raise ServingError("INVALID_ARGUMENT", "version labels are not supported by the local server; "
                                                   "give a version number")
        if not spec.name:
            raise ServingError("INVALID_ARGUMENT", "model_spec.name is empty")
        return spec.version.value if spec.HasField("version") else None

    def guarded(method):
        def wrapper(self, request, context):
            try:
                return method(self, request, context)
            except ServingError as error:
                abort(context, error)
            except Exception as error:  # never take the server down
                log.exception("gRPC %s failed", method.__name__)
                abort(context, ServingError("INTERNAL", _one_line(f"{type(error).__name__}: {error}")))
        wrapper.__name__ = method.__name__
        return wrapper

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        @guarded
        def Predict(self, request, context):
            served = registry.get(request.model_spec.name, requested_version(request.model_spec))
            specs = served.input_specs(request.model_spec.signature_name)
            inputs = {}
            for key, proto in request.inputs.items():
                spec = specs.get(key)
                if spec is not None and proto.dtype != spec.dtype.as_datatype_enum:
                    got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "an unset dtype"
                    raise ServingError("INVALID_ARGUMENT", f"input {key!r} must be {spec.dtype.name}, got {got}")
                try:
                    inputs[key] = tf.make_ndarray(proto)
                except Exception as error:
                    raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not a valid TensorProto: "
                                                           f"{_one_line(error)}") from None
            signature_name = request.model_spec.signature_name or "serving_default"
            outputs = served.predict(signature_name, inputs, tuple(request.output_filter))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = served.name
            response.model_spec.version.value = served.version
            response.model_spec.signature_name = signature_name
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
            return response

        @guarded
        def GetModelMetadata(self, request, context):
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise ServingError("INVALID_ARGUMENT", f"metadata_field must be ['signature_def'], got {fields}")
            served = registry.get(request.model_spec.name, requested_version(request.model_spec))
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = served.name
            response.model_spec.version.value = served.version
            response.metadata["signature_def"].CopyFrom(_pack(any_pb2, _signature_def_map(served)))
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        @guarded
        def GetModelStatus(self, request, context):
            return _status_response(get_model_status_pb2, registry.status(
                request.model_spec.name, requested_version(request.model_spec)))

    return PredictionService(), ModelService()


def _signature_def_map(served: ServedVersion):
    from tensorflow_serving.apis import get_model_metadata_pb2

    result = get_model_metadata_pb2.SignatureDefMap()
    for key, value in served.signature_defs.items():
        result.signature_def[key].CopyFrom(value)
    return result


def _pack(any_pb2, message):
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status_response(get_model_status_pb2, rows):
    from tensorflow.core.protobuf import error_codes_pb2

    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state, message in rows:
        entry = response.model_version_status.add()
        entry.version = version
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        entry.status.error_code = error_codes_pb2.OK if not message else error_codes_pb2.UNKNOWN
        entry.status.error_message = message
    return response


def _message_to_dict(message) -> dict:
    from google.protobuf import json_format

    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         including_default_value_fields=True)
    except TypeError:  # protobuf >= 5.26 renamed the option
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)


# --------------------------------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------------------------------
def _parse_path(path: str):
    """``(name, version or None, action)`` for ``/v1/models/NAME[/versions/V][:predict|/metadata]``."""
    path = path.split("?", 1)[0].rstrip("/")
    if not path.startswith("/v1/models/"):
        raise ServingError("NOT_FOUND", f"unknown path {path!r}: expected /v1/models/NAME[/versions/V]"
                                        "[:predict|/metadata]")
    rest = path[len("/v1/models/"):]
    action = "status"
    if rest.endswith(":predict"):
        rest, action = rest[:-len(":predict")], "predict"
    elif ":" in rest.rsplit("/", 1)[-1]:
        raise ServingError("NOT_FOUND", f"unsupported method {rest.rsplit(':', 1)[-1]!r} (only :predict)")
    elif rest.endswith("/metadata"):
        rest, action = rest[:-len("/metadata")], "metadata"
    parts = rest.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None, action
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2].isdigit():
        return parts[0], int(parts[2]), action
    if len(parts) == 3 and parts[1] == "labels":
        raise ServingError("INVALID_ARGUMENT", "version labels are not supported by the local server")
    raise ServingError("NOT_FOUND", f"unknown path {path!r}: expected /v1/models/NAME[/versions/V]"
                                    "[:predict|/metadata]")


def _json_inputs(body: dict, specs: dict) -> Dict[str, np.ndarray]:
    """Numpy inputs from a TF Serving REST body (columnar ``inputs`` or row ``instances``)."""
    has_inputs, has_instances = "inputs" in body, "instances" in body
    if has_inputs == has_instances:
        raise ServingError("INVALID_ARGUMENT", "the request body must hold exactly one of 'inputs' (columnar) or "
                                               "'instances' (row format)")
    if has_inputs:
        raw = body["inputs"]
        if not isinstance(raw, dict):
            if len(specs) != 1:
                raise ServingError("INVALID_ARGUMENT", f"'inputs' must be an object naming each input "
                                                       f"({', '.join(sorted(specs))})")
            raw = {next(iter(specs)): raw}
    else:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise ServingError("INVALID_ARGUMENT", "'instances' must be a non-empty list")
        if all(isinstance(r, dict) for r in rows):
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise ServingError("INVALID_ARGUMENT", "every instance must name the same inputs")
            raw = {k: [r[k] for r in rows] for k in keys}
        elif len(specs) == 1:
            raw = {next(iter(specs)): rows}
        else:
            raise ServingError("INVALID_ARGUMENT", f"each instance must be an object naming the inputs "
                                                   f"({', '.join(sorted(specs))})")
    arrays = {}
    for key, value in raw.items():
        spec = specs.get(key)
        if spec is None:
            arrays[key] = np.zeros(0)  # reported as an unknown input by ServedVersion.predict
            continue
        dtype = spec.dtype.as_numpy_dtype
        try:
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind in "USV":
                raise ValueError("not a rectangular array of numbers")
            if array.dtype.kind == "b" and dtype != np.bool_:
                raise ValueError("booleans given for a numeric input")
            if array.dtype.kind == "f" and np.dtype(dtype).kind in "iu":
                if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                    raise ValueError(f"non-integer values for a {spec.dtype.name} input")
            arrays[key] = array.astype(dtype)
        except (ValueError, TypeError, OverflowError) as error:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} cannot be read as {spec.dtype.name}: "
                                                   f"{_one_line(error)}") from None
    return arrays


def _json_outputs(outputs: Dict[str, np.ndarray], row_format: bool) -> dict:
    if row_format:
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values())).tolist()}
        batch = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(batch)]}
    if len(outputs) == 1:
        return {"outputs": next(iter(outputs.values())).tolist()}
    return {"outputs": {k: v.tolist() for k, v in outputs.items()}}


def _make_http_handler(registry: ModelRegistry):
    from tensorflow_serving.apis import get_model_status_pb2

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "shaspec-local-serving"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            log.debug("%s - %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str):
            try:
                name, version, action = _parse_path(self.path)
                if method == "POST":
                    body = self._read_body()  # read it in any case, to keep the connection usable
                    if action != "predict":
                        raise ServingError("NOT_FOUND", f"POST {self.path}: only :predict takes a POST")
                    self._send(200, self._predict(name, version, body))
                elif action == "predict":
                    raise ServingError("NOT_FOUND", f"GET {self.path}: :predict needs a POST")
                elif action == "metadata":
                    served = registry.get(name, version)
                    self._send(200, {"model_spec": {"name": served.name, "signature_name": "",
                                                    "version": str(served.version)},
                                     "metadata": {"signature_def": _message_to_dict(_signature_def_map(served))}})
                else:
                    self._send(200, _message_to_dict(_status_response(get_model_status_pb2,
                                                                      registry.status(name, version))))
            except ServingError as error:
                self._send(_HTTP_STATUS.get(error.code, 500), {"error": error.message})
            except Exception as error:  # never take the server down
                log.exception("REST %s %s failed", method, self.path)
                self._send(500, {"error": _one_line(f"{type(error).__name__}: {error}")})

        def _read_body(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise ServingError("INVALID_ARGUMENT", "the request needs a Content-Length header")
            raw = self.rfile.read(int(length))
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ServingError("INVALID_ARGUMENT", f"JSON parse error: {error}") from None

        def _predict(self, name, version, body):
            if not isinstance(body, dict):
                raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
            served = registry.get(name, version)
            signature_name = body.get("signature_name") or "serving_default"
            if not isinstance(signature_name, str):
                raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
            inputs = _json_inputs(body, served.input_specs(signature_name))
            outputs = served.predict(signature_name, inputs)
            return _json_outputs(outputs, row_format="instances" in body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

    return Handler


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------
class LocalServer:
    """gRPC + REST serving of every SavedModel under ``model_base``; :meth:`start` returns once they are loaded.

    Port 0 picks a free port (see ``grpc_port`` / ``rest_port`` after :meth:`start`); ``None`` disables that
    protocol. ``poll_seconds`` <= 0 disables re-scanning the base folder.
    """

    def __init__(self, model_base: str, grpc_port: Optional[int] = 8500, rest_port: Optional[int] = 8501,
                 host: str = "0.0.0.0", poll_seconds: float = 2.0, max_workers: int = 16):
        self.registry = ModelRegistry(model_base)
        self.host, self.poll_seconds, self.max_workers = host, poll_seconds, max_workers
        self.grpc_port, self.rest_port = grpc_port, rest_port
        self._grpc = self._http = None
        self._stop = threading.Event()
        self._threads = []

    def start(self) -> "LocalServer":
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.registry.refresh()
        if self.grpc_port is not None:
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers),
                                     options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                              ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
            prediction, models = _make_grpc_servicers(self.registry)
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, self._grpc)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(models, self._grpc)
            port = self._grpc.add_insecure_port(f"{self.host}:{self.grpc_port}")
            if not port:
                raise OSError(f"cannot bind the gRPC port {self.host}:{self.grpc_port}")
            self.grpc_port = port
            self._grpc.start()
        if self.rest_port is not None:
            self._http = ThreadingHTTPServer((self.host, self.rest_port), _make_http_handler(self.registry))
            self._http.daemon_threads = True
            self.rest_port = self._http.server_address[1]
            self._spawn(self._http.serve_forever, "rest")
        if self.poll_seconds and self.poll_seconds > 0:
            self._spawn(self._poll, "poll")
        return self

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, name=f"shaspec-serving-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.registry.refresh()
            except Exception:  # a vanished folder mid-scan and the like: try again next time
                log.exception("re-scanning %s failed", self.registry.base)

    def stop(self) -> None:
        self._stop.set()
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C)."""
        try:
            while not self._stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass


def serve(model_base: str, grpc_port: Optional[int] = 8500, rest_port: Optional[int] = 8501,
          host: str = "0.0.0.0", poll_seconds: float = 2.0) -> int:
    """Run :class:`LocalServer` in the foreground until Ctrl-C."""
    server = LocalServer(model_base, grpc_port, rest_port, host, poll_seconds).start()
    models = server.registry.names()
    print(f"serving {', '.join(models) if models else 'no models yet'} from {os.path.abspath(model_base)}: "
          f"gRPC {host}:{server.grpc_port}, REST http://{host}:{server.rest_port} "
          f"(re-scanning every {poll_seconds:g} s; Ctrl-C stops)", flush=True)
    try:
        server.wait()
    finally:
        server.stop()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", required=True)
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return serve(args.model_base, args.grpc_port, args.rest_port, args.host, args.poll_seconds)


if __name__ == "__main__":
    raise SystemExit(main())
