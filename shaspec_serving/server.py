"""A local, pure-TensorFlow stand-in for TensorFlow Serving: the same gRPC and REST APIs, from the same folders.

    python -m shaspec_serving.server --model-base BASE [--grpc-port 8500] [--rest-port 8501] [--poll-seconds 2]
                             [--host 127.0.0.1] [--max-request-bytes 1GiB] [--read-timeout 30]
    shaspec serve --model-base BASE ...                                   (the same)

It listens on the loopback interface (127.0.0.1) unless ``--host`` says otherwise, and has no authentication and no
TLS: bind it elsewhere only behind your own network policy (a warning says what is exposed).

Every sub-folder of BASE is a model; its integer sub-folders holding a ``saved_model.pb`` are its versions (loaded
with ``tf.saved_model.load``); requests without a version get the highest one. BASE may be a local folder or a URI
(``gs://bucket/models``: listed through :mod:`shaspec_tf.fileio`; each version is copied to a temporary local folder,
loaded, and the copy removed). BASE is re-scanned every ``poll_seconds``: a version dropped in (renamed into place,
as ``shaspec export`` does) is loaded and served without a restart, a removed one is unloaded; a version that failed
to load is tried again whenever anything in its folder changes (a version copied in file by file is served once it
is complete). On a bucket every scan lists BASE and reads the size and time of every version's files: raise
``poll_seconds`` to make fewer requests.

gRPC: ``tensorflow.serving.PredictionService/Predict`` and ``GetModelMetadata`` (``signature_def``),
``tensorflow.serving.ModelService/GetModelStatus``. REST: ``POST /v1/models/NAME[/versions/V]:predict`` (row
``instances`` or columnar ``inputs``), ``GET /v1/models/NAME[/versions/V]`` (status) and ``.../metadata``. Errors
carry TF Serving's codes: INVALID_ARGUMENT (REST 400) for malformed requests and failed graph checks, NOT_FOUND
(REST 404) for unknown models, versions and paths, FAILED_PRECONDITION (REST 400) for versions that failed to load;
REST error bodies are ``{"error": "..."}``.

Limits: a request may be at most ``max_request_bytes`` (default 1 GiB): the gRPC receive limit, the REST
``Content-Length`` limit (checked before the body is read; 413), and the most that a request's inputs may take once
decoded (a TensorProto that declares a large shape but carries one value is refused, not expanded). A REST client
that sends nothing for ``read_timeout_s`` (default 30 s) is dropped, and at most ``max_workers`` REST connections are
served at once (more get 503 at once).
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional

import numpy as np

from shaspec_tf import fileio

log = logging.getLogger("shaspec.serving")

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing outside this machine can connect unless --host says so
DEFAULT_MAX_REQUEST_BYTES = 1 << 30  # a whole 4x240x240x155 float32 volume is 136 MiB (JSON: ~0.7 GB); leave room
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_WORKERS = 16
MAX_MESSAGE_BYTES = 1 << 30  # responses (gRPC send limit)
_GRPC_MAX_LENGTH = (1 << 31) - 1  # gRPC's message length options are int32
_READ_CHUNK = 1 << 20
_FINGERPRINT_MAX_FILES = 10000
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
                "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "INTERNAL": 500, "UNKNOWN": 500}


class ServingError(Exception):
    """A request that cannot be served; ``code`` is a gRPC status code name (``"NOT_FOUND"``, ...)."""

    def __init__(self, code: str, message: str, http_status: Optional[int] = None):
        super().__init__(message)
        self.code = code
        self.message = _one_line(message)
        self.http_status = http_status or _HTTP_STATUS.get(code, 500)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(error: BaseException, limit: int = 500) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters."""
    text = _one_line(error)
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_size(value) -> int:
    """Bytes from ``1073741824``, ``"1GiB"``, ``"512M"``, ``"64k"`` (binary units); ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(b|k|kib|m|mib|g|gib|t|tib)?\s*", str(value), re.IGNORECASE)
        if not match:
            raise ValueError(f"{value!r} is not a size: give bytes, or a number with K/M/G/T (KiB/MiB/GiB/TiB, binary "
                             f"units), e.g. 1GiB")
        scale = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[
            (match.group(2) or "").lower()[:1]]
        size = int(float(match.group(1)) * scale)
    if size < 1:
        raise ValueError(f"the request size limit must be at least 1 byte, got {value!r}")
    return size


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is (or only resolves to) a loopback address: only this machine can connect."""
    host = str(host).strip()
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not host:  # "" means every interface
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def exposure_warning(host: str, grpc_port: Optional[int], rest_port: Optional[int]) -> Optional[str]:
    """The warning to log when the server listens beyond the loopback interface (None on loopback)."""
    if _is_loopback(host):
        return None
    ports = ", ".join(p for p in (f"gRPC port {grpc_port}" if grpc_port is not None else "",
                                  f"REST port {rest_port}" if rest_port is not None else "") if p)
    return (f"listening on {host or 'every interface'} ({ports or 'no ports'}): anyone who can reach this machine can "
            f"run and inspect the served models, with no authentication and no TLS. Put it behind your own network "
            f"policy (firewall, private network, an authenticating TLS proxy), as TF Serving users do, or leave "
            f"--host at 127.0.0.1 to keep it local")


@contextlib.contextmanager
def _local_folder(path: str):
    """``path`` itself when it is local; for a URI (``gs://...``), a temporary local copy of the version folder
    (``fileio.upload_tree`` reads a bucket in bounded pieces), removed afterwards. TensorFlow could read ``gs://``
    itself, but the checkpoint reader of ``tf.saved_model.load`` makes the large reads that crashed tensorflow-io's
    ``gs://`` filesystem; the loaded model holds its variables in memory, so the copy is not needed once loaded."""
    if not fileio.is_uri(path):
        yield path
        return
    import shutil
    import tempfile

    local = tempfile.mkdtemp(prefix="shaspec-serve-")
    try:
        fileio.upload_tree(path, local)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


class ServedVersion:
    """One loaded SavedModel version: its callable signatures and their ``SignatureDef`` protos."""

    def __init__(self, name: str, version: int, path: str, fingerprint: Optional[tuple] = None):
        import tensorflow as tf
        from google.protobuf.message import DecodeError
        from tensorflow.core.protobuf import saved_model_pb2

        self.name, self.version, self.path = name, version, path
        self.fingerprint = _fingerprint(path) if fingerprint is None else fingerprint
        with _local_folder(path) as local:
            proto = saved_model_pb2.SavedModel()
            data = fileio.read_bytes(fileio.join(local, "saved_model.pb"))
            try:
                proto.ParseFromString(data)
            except (DecodeError, RuntimeError, ValueError) as error:  # RuntimeError: too deeply nested
                raise ValueError(f"saved_model.pb ({len(data)} bytes) is not a SavedModel protobuf: "
                                 f"{_describe(error)}") from None
            if not proto.meta_graphs:
                raise ValueError(f"saved_model.pb ({len(data)} bytes) holds no MetaGraph: not a SavedModel")
            self.signature_defs = {k: v for k, v in proto.meta_graphs[0].signature_def.items()
                                   if not k.startswith("__")}
            try:
                self.loaded = tf.saved_model.load(local)  # variables and tables are in memory once it returns
            except Exception as error:
                raise ValueError(f"tf.saved_model.load failed: {_describe(error)}") from None
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

    def check_input_names(self, signature_name: str, names) -> None:
        """INVALID_ARGUMENT unless ``names`` are exactly the signature's inputs (before anything is decoded)."""
        signature_name, fn = self.signature(signature_name)
        specs = fn.structured_input_signature[1]
        expected = ", ".join(sorted(specs))
        missing = sorted(set(specs) - set(names))
        if missing:
            raise ServingError("INVALID_ARGUMENT", f"missing input {missing[0]!r} for signature {signature_name!r} "
                                                   f"(expects {expected})")
        extra = sorted(set(names) - set(specs))
        if extra:
            raise ServingError("INVALID_ARGUMENT", f"unknown input {extra[0]!r} for signature {signature_name!r} "
                                                   f"(expects {expected})")

    def predict(self, signature_name: str, inputs: Dict[str, np.ndarray], output_filter=()) -> Dict[str, np.ndarray]:
        """Validate ``inputs`` (numpy arrays, already of the signature's dtypes) against the signature and run it."""
        import tensorflow as tf

        self.check_input_names(signature_name, inputs)
        signature_name, fn = self.signature(signature_name)
        specs = fn.structured_input_signature[1]
        tensors = {}
        for key, spec in specs.items():
            value = inputs[key]
            if value.dtype != spec.dtype.as_numpy_dtype:
                raise ServingError("INVALID_ARGUMENT", f"input {key!r} must be {spec.dtype.name}, got {value.dtype}")
            _check_shape(key, spec, value.shape)
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


def _check_shape(key: str, spec, shape) -> None:
    """INVALID_ARGUMENT unless ``shape`` has the rank and the fixed dimensions of ``spec`` (a TensorSpec)."""
    shape = [int(d) for d in shape]
    if spec.shape.rank is None:  # an unknown-rank signature input takes any shape
        return
    if len(shape) != spec.shape.rank or not spec.shape.is_compatible_with(shape):
        want = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape.as_list()) + "]"
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} must have shape {want} (rank {spec.shape.rank}), "
                                               f"got {shape}")


def _fingerprint(path: str) -> tuple:
    """``((relative path, size, mtime_ns), ...)`` of every file under ``path`` (a local folder or a URI): any change
    to the folder changes it."""
    entries = []
    prefix = len(str(path).rstrip("/").rstrip(os.sep)) + 1
    for root, dirs, files in fileio.walk(path):
        for name in files:
            full = fileio.join(root, name)
            try:
                size, mtime_ns = fileio.stat(full)
            except Exception:  # noqa: BLE001  vanished meanwhile, a dangling link: the next scan sees the change
                continue
            entries.append((full[prefix:].replace(os.sep, "/"), size, mtime_ns))
            if len(entries) >= _FINGERPRINT_MAX_FILES:  # a misplaced dataset: enough to tell changes
                return tuple(entries)
    return tuple(entries)


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
        if not fileio.isdir(base):
            raise FileNotFoundError(f"model base {base} is not a folder" + (
                " (no objects under it)" if fileio.is_uri(base) else ""))
        self.base = base
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._models: Dict[str, Dict[int, ServedVersion]] = {}
        self._failed: Dict[tuple, tuple] = {}  # (name, version) -> (fingerprint of the folder, message)

    def _scan(self) -> dict:
        found = {}
        for name in fileio.listdir(self.base):
            folder = fileio.join(self.base, name)
            if name.startswith("."):
                continue
            try:
                if not fileio.isdir(folder):
                    continue
                entries = fileio.listdir(folder)
            except Exception as error:  # noqa: BLE001  unreadable, or removed meanwhile: skip it, serve the others
                log.debug("cannot list %s: %s", folder, _describe(error))
                continue
            versions = {}
            for entry in entries:  # ASCII digits only (str.isdigit accepts "\u00b2"); of "01" and "1" the first wins
                if entry.isascii() and entry.isdigit() and int(entry) not in versions \
                        and fileio.isfile(fileio.join(folder, entry, "saved_model.pb")):
                    versions[int(entry)] = fileio.join(folder, entry)
            found[name] = versions
        return found

    def refresh(self) -> None:
        """Load versions that appeared (or changed) under ``base`` and drop those that went away.

        A version is (re)loaded whenever the fingerprint of its folder (every file's path, size and mtime) differs
        from the one it was last loaded (or last failed to load) with. So a version copied in file by file fails
        while incomplete, and loads once its last file has arrived.
        """
        with self._refresh_lock:
            found = self._scan()
            with self._lock:
                current = {n: dict(v) for n, v in self._models.items()}
                failed = dict(self._failed)
            for name, versions in found.items():
                for version, path in sorted(versions.items()):
                    fingerprint = _fingerprint(path)
                    served = current.get(name, {}).get(version)
                    if served is not None and served.fingerprint == fingerprint:
                        continue
                    if failed.get((name, version), (None,))[0] == fingerprint:
                        continue
                    try:
                        loaded = ServedVersion(name, version, path, fingerprint)
                    except Exception as error:  # a broken export must not stop the others
                        message = _one_line(error) or type(error).__name__
                        with self._lock:
                            self._failed[(name, version)] = (fingerprint, message)
                        log.error("cannot load %s version %d from %s: %s%s", name, version, path, message,
                                  " (still serving the copy loaded before)" if served is not None else
                                  " (tried again when its folder changes)")
                        continue
                    with self._lock:
                        self._failed.pop((name, version), None)
                        self._models.setdefault(name, {})[version] = loaded
                    log.info("%s %s version %d from %s", "reloaded" if served is not None else "serving", name,
                             version, path)
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
        """The served version (the highest one when ``version`` is None); NOT_FOUND for unknown models and
        versions, FAILED_PRECONDITION for versions that failed to load."""
        with self._lock:
            versions = self._models.get(name) or {}
            failed = {v: message for (n, v), (_, message) in self._failed.items() if n == name and v not in versions}
            if version is None and versions:
                return versions[max(versions)]
            if version is not None and version in versions:
                return versions[version]
            if version is not None and version in failed:
                raise ServingError("FAILED_PRECONDITION", f"version {version} of model {name!r} failed to load and "
                                                          f"is not served: {failed[version]}")
            if not versions:
                if failed:
                    raise ServingError("FAILED_PRECONDITION", f"model {name!r} has no version that loaded (version "
                                                              f"{max(failed)} failed: {failed[max(failed)]})")
                known = ", ".join(sorted(n for n, v in self._models.items() if v)) or "none"
                raise ServingError("NOT_FOUND", f"model {name!r} is not being served (models: {known})")
            raise ServingError("NOT_FOUND", f"version {version} of model {name!r} is not being served "
                                            f"(versions: {', '.join(str(v) for v in sorted(versions))})")

    def status(self, name: str, version: Optional[int] = None) -> list:
        """``[(version, state, error_message)]``: AVAILABLE versions, and END for those that failed to load."""
        with self._lock:
            available = set(self._models.get(name, {}))
            rows = [(v, "AVAILABLE", "") for v in sorted(available)]
            rows += [(v, "END", msg) for (n, v), (_, msg) in sorted(self._failed.items())
                     if n == name and v not in available]
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
class _Unparsable:
    """What the lenient request deserializer hands over for bytes that are not the expected message."""

    def __init__(self, message_type: str, error: BaseException):
        self.message_type, self.error = message_type, error


def _lenient_parser(message_class):
    """A gRPC request deserializer that never raises (gRPC would answer INTERNAL): :class:`_Unparsable` instead."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as error:  # DecodeError, and RuntimeError / RecursionError for too deeply nested ones
            return _Unparsable(message_class.DESCRIPTOR.full_name, error)
    return parse


# TensorProto fields holding the values of each dtype, and how many entries one element takes
_VALUE_FIELDS = {"float32": ("float_val", 1), "float64": ("double_val", 1), "int32": ("int_val", 1),
                 "uint8": ("int_val", 1), "int8": ("int_val", 1), "int16": ("int_val", 1), "uint16": ("int_val", 1),
                 "int64": ("int64_val", 1), "uint32": ("uint32_val", 1), "uint64": ("uint64_val", 1),
                 "bool": ("bool_val", 1), "float16": ("half_val", 1), "bfloat16": ("half_val", 1),
                 "complex64": ("scomplex_val", 2), "complex128": ("dcomplex_val", 2)}


def _checked_tensor_bytes(key: str, proto, spec) -> int:
    """Bytes the TensorProto ``proto`` decodes to, after checking it against ``spec`` and against what it carries,
    without decoding it: ``tf.make_ndarray`` repeats the last value (or zeros) up to the declared shape, so a few
    bytes could otherwise ask for gigabytes."""
    import tensorflow as tf

    if proto.dtype != spec.dtype.as_datatype_enum:
        try:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "an unset dtype"
        except (TypeError, ValueError):
            got = f"an unknown dtype ({proto.dtype})"
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} must be {spec.dtype.name}, got {got}")
    if proto.tensor_shape.unknown_rank:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} has an unknown rank: its tensor_shape must list "
                                               f"every dimension")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise ServingError("INVALID_ARGUMENT", f"input {key!r} has a negative dimension in its shape {dims}")
    _check_shape(key, spec, dims)
    if spec.dtype.name not in _VALUE_FIELDS:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r}: dtype {spec.dtype.name} is not supported by the "
                                               f"local server")
    elements = math.prod(dims)
    size = elements * np.dtype(spec.dtype.as_numpy_dtype).itemsize
    if proto.tensor_content:
        if len(proto.tensor_content) != size:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} carries {len(proto.tensor_content)} bytes of "
                                                   f"tensor_content, but its shape {dims} of {spec.dtype.name} "
                                                   f"takes {size}")
    else:
        field, per_element = _VALUE_FIELDS[spec.dtype.name]
        count = len(getattr(proto, field)) // per_element
        if count > elements:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} carries {count} values in {field}, more than "
                                                   f"its shape {dims} holds ({elements})")
    return size


def _grpc_inputs(served: ServedVersion, signature_name: str, protos, max_request_bytes: int) -> dict:
    """Numpy inputs from a PredictRequest's TensorProtos: names, dtypes, shapes and sizes are all checked first,
    and nothing is decoded beyond ``max_request_bytes`` in all."""
    import tensorflow as tf

    served.check_input_names(signature_name, protos)
    specs = served.input_specs(signature_name)
    sizes = {key: _checked_tensor_bytes(key, protos[key], specs[key]) for key in sorted(protos)}
    total = sum(sizes.values())
    if total > max_request_bytes:
        shapes = ", ".join(f"{k} {[d.size for d in protos[k].tensor_shape.dim]}" for k in sorted(protos))
        raise ServingError("INVALID_ARGUMENT", f"the inputs would take {total} bytes decoded ({shapes}), more than "
                                               f"this server's limit of {max_request_bytes} bytes per request "
                                               f"(--max-request-bytes)")
    inputs = {}
    for key in sorted(protos):
        try:
            inputs[key] = tf.make_ndarray(protos[key])
        except Exception as error:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r} is not a valid TensorProto: "
                                                   f"{_one_line(error)}") from None
    return inputs


def _make_grpc_handlers(registry: ModelRegistry, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> list:
    """gRPC generic handlers for PredictionService (Predict, GetModelMetadata) and ModelService (GetModelStatus).

    Requests are parsed by :func:`_lenient_parser`, so bytes that are not the method's message get
    INVALID_ARGUMENT (the generated ``add_*_to_server`` would answer INTERNAL)."""
    import grpc
    import tensorflow as tf
    from google.protobuf import any_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

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
        def wrapper(request, context):
            try:
                if isinstance(request, _Unparsable):
                    raise ServingError("INVALID_ARGUMENT", f"the request is not a valid {request.message_type} "
                                                           f"protobuf: {_describe(request.error)}")
                return method(request, context)
            except ServingError as error:
                abort(context, error)
            except Exception as error:  # never take the server down
                log.exception("gRPC %s failed", method.__name__)
                abort(context, ServingError("INTERNAL", _describe(error)))
        wrapper.__name__ = method.__name__
        return wrapper

    @guarded
    def Predict(request, context):  # noqa: N802 - the RPC's name
        served = registry.get(request.model_spec.name, requested_version(request.model_spec))
        signature_name = request.model_spec.signature_name or "serving_default"
        inputs = _grpc_inputs(served, signature_name, request.inputs, max_request_bytes)
        outputs = served.predict(signature_name, inputs, tuple(request.output_filter))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = served.name
        response.model_spec.version.value = served.version
        response.model_spec.signature_name = signature_name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    @guarded
    def GetModelMetadata(request, context):  # noqa: N802
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise ServingError("INVALID_ARGUMENT", f"metadata_field must be ['signature_def'], got {fields}")
        served = registry.get(request.model_spec.name, requested_version(request.model_spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = served.name
        response.model_spec.version.value = served.version
        response.metadata["signature_def"].CopyFrom(_pack(any_pb2, _signature_def_map(served)))
        return response

    @guarded
    def GetModelStatus(request, context):  # noqa: N802
        return _status_response(get_model_status_pb2, registry.status(
            request.model_spec.name, requested_version(request.model_spec)))

    def handler(method, request_class, response_class):
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=_lenient_parser(request_class),
                                                   response_serializer=response_class.SerializeToString)

    return [
        grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
            "Predict": handler(Predict, predict_pb2.PredictRequest, predict_pb2.PredictResponse),
            "GetModelMetadata": handler(GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest,
                                        get_model_metadata_pb2.GetModelMetadataResponse)}),
        grpc.method_handlers_generic_handler("tensorflow.serving.ModelService", {
            "GetModelStatus": handler(GetModelStatus, get_model_status_pb2.GetModelStatusRequest,
                                      get_model_status_pb2.GetModelStatusResponse)}),
    ]


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
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2].isascii() and parts[2].isdigit():
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


def _make_http_handler(registry: ModelRegistry, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                       read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
    from tensorflow_serving.apis import get_model_status_pb2

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "shaspec-local-serving"
        timeout = read_timeout_s  # StreamRequestHandler.setup: socket timeout, so a stalled client is dropped
        _body_read = False

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            log.debug("%s - %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, status: int, message: str):
            """An error answer; closes the connection when the request's body was not read (it would be taken for
            the next request), and never raises (the client may be gone)."""
            if not self.close_connection and not self._body_read and (
                    self.command == "POST" or "Transfer-Encoding" in self.headers
                    or (self.headers.get("Content-Length") or "0").strip() != "0"):
                self.close_connection = True
            try:
                self._send(status, {"error": _one_line(message)})
            except OSError:
                self.close_connection = True

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (bad request line or headers, URI too long, unknown method), as JSON."""
            self.close_connection = True
            self._send_error(code, message or self.responses.get(code, ("error",))[0])

        def handle_expect_100(self):
            """``Expect: 100-continue`` (curl, for large bodies): refuse a body over the limit before it is sent."""
            if self.command == "POST":
                try:
                    self._content_length()
                except ServingError as error:
                    self._send_error(error.http_status, error.message)
                    return False
            return super().handle_expect_100()

        def _handle(self, method: str):
            self._body_read = False
            try:
                name, version, action = _parse_path(self.path)
                if method == "POST":
                    if action != "predict":
                        raise ServingError("NOT_FOUND", f"POST {self.path}: only :predict takes a POST")
                    body = self._read_body()
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
                self._send_error(error.http_status, error.message)
            except TimeoutError:  # the client sent nothing for read_timeout_s (or does not read the answer)
                self.close_connection = True
                log.warning("REST %s %s from %s: nothing received for %g s, connection dropped", method,
                            _one_line(self.path)[:200], self.client_address[0], read_timeout_s)
                self._send_error(408, f"nothing received for {read_timeout_s:g} s: connection closed")
            except ConnectionError as error:  # the client went away
                self.close_connection = True
                log.info("REST %s %s from %s: %s", method, _one_line(self.path)[:200], self.client_address[0],
                         _describe(error))
            except Exception as error:  # never take the server down
                log.exception("REST %s %s failed", method, self.path)
                self._send_error(500, _describe(error))

        def _content_length(self) -> int:
            """The body's declared size, checked before anything is read: 411 / 400 / 413 otherwise."""
            if "Transfer-Encoding" in self.headers:
                raise ServingError("INVALID_ARGUMENT", "chunked request bodies are not supported: send the body "
                                                       "with a Content-Length header", 411)
            length = self.headers.get("Content-Length")
            if length is None:
                raise ServingError("INVALID_ARGUMENT", "the request needs a Content-Length header (the body's size "
                                                       "in bytes)", 411)
            length = length.strip()
            if not (length.isascii() and length.isdigit()):
                raise ServingError("INVALID_ARGUMENT", f"invalid Content-Length {length[:40]!r}: must be the body's "
                                                       f"size in bytes", 400)
            size = int(length)
            if size > max_request_bytes:
                raise ServingError("RESOURCE_EXHAUSTED", f"the request body is {size} bytes, more than this server's "
                                                         f"limit of {max_request_bytes} bytes (--max-request-bytes)",
                                   413)
            return size

        def _read_body(self):
            size = self._content_length()
            data = bytearray()
            while len(data) < size:  # each read waits at most read_timeout_s (the socket's timeout)
                chunk = self.rfile.read(min(_READ_CHUNK, size - len(data)))
                if not chunk:
                    self.close_connection = True
                    raise ServingError("INVALID_ARGUMENT", f"the request body ended after {len(data)} of the {size} "
                                                           f"bytes its Content-Length announced")
                data += chunk
            self._body_read = True
            try:
                return json.loads(data)
            except RecursionError:
                raise ServingError("INVALID_ARGUMENT", "JSON parse error: the body is nested too deeply") from None
            except (ValueError, TypeError) as error:  # JSONDecodeError, UnicodeDecodeError, int digit limit, ...
                raise ServingError("INVALID_ARGUMENT", f"JSON parse error: {_one_line(error)}") from None
            except MemoryError:
                raise ServingError("RESOURCE_EXHAUSTED", "not enough memory to parse the request body") from None

        def _predict(self, name, version, body):
            if not isinstance(body, dict):
                raise ServingError("INVALID_ARGUMENT", "the request body must be a JSON object")
            served = registry.get(name, version)
            signature_name = body.get("signature_name") or "serving_default"
            if not isinstance(signature_name, str):
                raise ServingError("INVALID_ARGUMENT", "'signature_name' must be a string")
            try:
                inputs = _json_inputs(body, served.input_specs(signature_name))
            except RecursionError:
                raise ServingError("INVALID_ARGUMENT", "the inputs are nested too deeply") from None
            outputs = served.predict(signature_name, inputs)
            return _json_outputs(outputs, row_format="instances" in body)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``max_connections`` handler threads: more connections get 503."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for a stalled client's read timeout

    def __init__(self, address, handler, max_connections: int):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request, client_address):
        log.warning("REST connection from %s refused: all %d connections busy", client_address[0],
                    self.max_connections)
        body = json.dumps({"error": f"server busy: all {self.max_connections} REST connections are in use; "
                                    f"try again later"}).encode()
        try:
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s"
                            % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------
class LocalServer:
    """gRPC + REST serving of every SavedModel under ``model_base``; :meth:`start` returns once they are loaded.

    Port 0 picks a free port (see ``grpc_port`` / ``rest_port`` after :meth:`start`); ``None`` disables that
    protocol. ``poll_seconds`` <= 0 disables re-scanning the base folder. ``host`` is 127.0.0.1 (this machine only)
    unless given; any other address is logged as a warning (no authentication, no TLS). ``max_request_bytes`` (an
    int, or a size such as ``"512MiB"``) caps each request (gRPC message, REST body, decoded inputs);
    ``read_timeout_s`` drops REST clients that send nothing for that long; ``max_workers`` bounds the gRPC worker
    threads (4x as many RPCs may wait; more get RESOURCE_EXHAUSTED) and the REST connections (more get 503).
    """

    def __init__(self, model_base: str, grpc_port: Optional[int] = 8500, rest_port: Optional[int] = 8501,
                 host: str = DEFAULT_HOST, poll_seconds: float = 2.0, max_workers: int = DEFAULT_MAX_WORKERS,
                 max_request_bytes=DEFAULT_MAX_REQUEST_BYTES, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        self.max_request_bytes = parse_size(max_request_bytes)
        if isinstance(read_timeout_s, bool) or not isinstance(read_timeout_s, (int, float)) \
                or not math.isfinite(read_timeout_s) or read_timeout_s <= 0:
            raise ValueError(f"the read timeout must be a positive number of seconds, got {read_timeout_s!r}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
        self.registry = ModelRegistry(model_base)
        self.host, self.poll_seconds, self.max_workers = host, poll_seconds, max_workers
        self.read_timeout_s = float(read_timeout_s)
        self.grpc_port, self.rest_port = grpc_port, rest_port
        self._grpc = self._http = None
        self._stop = threading.Event()
        self._threads = []

    def start(self) -> "LocalServer":
        import grpc

        self.registry.refresh()
        if self.grpc_port is not None:
            receive = min(self.max_request_bytes, _GRPC_MAX_LENGTH)
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers),
                                     options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                              ("grpc.max_receive_message_length", receive)],
                                     maximum_concurrent_rpcs=4 * self.max_workers)
            self._grpc.add_generic_rpc_handlers(_make_grpc_handlers(self.registry, self.max_request_bytes))
            address = f"[{self.host}]:{self.grpc_port}" if ":" in self.host else f"{self.host}:{self.grpc_port}"
            port = self._grpc.add_insecure_port(address)
            if not port:
                raise OSError(f"cannot bind the gRPC port {address}")
            self.grpc_port = port
            self._grpc.start()
        if self.rest_port is not None:
            handler = _make_http_handler(self.registry, self.max_request_bytes, self.read_timeout_s)
            self._http = _HTTPServer((self.host, self.rest_port), handler, self.max_workers)
            self.rest_port = self._http.server_address[1]
            self._spawn(self._http.serve_forever, "rest")
        warning = exposure_warning(self.host, self.grpc_port, self.rest_port)
        if warning:
            log.warning("%s", warning)
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
            except Exception as error:  # a vanished folder mid-scan and the like: try again next time
                log.error("re-scanning %s failed (trying again in %g s): %s", self.registry.base, self.poll_seconds,
                          _describe(error))

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
          host: str = DEFAULT_HOST, poll_seconds: float = 2.0, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
          read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> int:
    """Run :class:`LocalServer` in the foreground until Ctrl-C."""
    server = LocalServer(model_base, grpc_port, rest_port, host, poll_seconds, max_request_bytes=max_request_bytes,
                         read_timeout_s=read_timeout_s).start()
    models = server.registry.names()
    print(f"serving {', '.join(models) if models else 'no models yet'} from {fileio.absolute(model_base)}: "
          f"gRPC {host}:{server.grpc_port}, REST http://{host}:{server.rest_port} "
          f"(re-scanning every {poll_seconds:g} s; requests up to {server.max_request_bytes} bytes, REST read "
          f"timeout {server.read_timeout_s:g} s; Ctrl-C stops)", flush=True)
    try:
        server.wait()
    finally:
        server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shaspec_serving.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", required=True)
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                             "server, which has no authentication and no TLS)")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--max-request-bytes", default=str(DEFAULT_MAX_REQUEST_BYTES),
                        help="largest request, in bytes or with K/M/G (binary) units (default 1GiB): gRPC message, "
                             "REST body, decoded inputs")
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                        help="seconds a REST client may send nothing before it is dropped (default 30)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return serve(args.model_base, args.grpc_port, args.rest_port, args.host, args.poll_seconds,
                     max_request_bytes=args.max_request_bytes, read_timeout_s=args.read_timeout)
    except (OSError, ValueError) as error:  # bad input: one line, no traceback
        print(f"shaspec_serving.server: error: {_one_line(error) or type(error).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
