"""Clients for TensorFlow Serving (or ``shaspec serve``): gRPC and REST, numpy in and out.

    client = GrpcClient("localhost:8500")                 # or RestClient("localhost:8501")
    out = client.predict("shaspec", {"image": x, "modality_mask": m})            # {"probabilities": ..., "labels": ...}
    labels = segment_volume(client, "shaspec", volume, [1, 0, 1, 1])          # uint8 [D, H, W]
    predict_nifti_remote("localhost:8500", "shaspec", {"flair": "f.nii.gz"}, "seg.nii.gz")   # shaspec predict --server

Failures raise :class:`ServingError` (a ``ValueError``) naming the server, the status code and the server's message.

Part of the library because it talks to any server of TF Serving's API (the ``tensorflow/serving`` container
included) about the models that :mod:`shaspec_tf.export` writes; it needs only the ``serving`` install extras
(``tensorflow-serving-api``, ``grpcio``; REST needs nothing more), imported when a client is made. The local server
(``shaspec serve``) is the serving app's (``shaspec_serving/server.py``); ``shaspec_serving.client`` re-exports this
module.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Dict, Optional

import numpy as np

MAX_MESSAGE_BYTES = 1 << 30

__all__ = ["ServingError", "GrpcClient", "RestClient", "make_client", "segment_volume", "predict_nifti_remote"]


class ServingError(ValueError):
    """A request the server refused or could not answer; ``code`` is the gRPC code name or the HTTP status."""

    def __init__(self, target: str, code, message: str):
        super().__init__(f"server {target}: {code}: {' '.join(str(message).split())}")
        self.code = code
        self.server_message = message


class GrpcClient:
    """``tensorflow.serving.PredictionService`` / ``ModelService`` over gRPC (messages up to 1 GiB)."""

    def __init__(self, target: str, timeout: float = 600.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        try:
            import grpc
            from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
        except ImportError as error:  # an install without the extras: one line, not a traceback
            raise OSError(f"the gRPC client needs the 'serving' extras (pip install -e .[serving]): {error}") \
                from error

        self.target, self.timeout = target, timeout
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", max_message_bytes),
                                                               ("grpc.max_receive_message_length", max_message_bytes)])
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise ServingError(self.target, error.code().name, error.details()) from None

    @staticmethod
    def _spec(spec, name, version, signature_name=None):
        spec.name = name
        if version is not None:
            spec.version.value = int(version)
        if signature_name is not None:
            spec.signature_name = signature_name

    def predict(self, model_name: str, inputs: Dict[str, np.ndarray], signature_name: str = "serving_default",
                version: Optional[int] = None, output_filter=()) -> Dict[str, np.ndarray]:
        """``{output name: numpy array}`` of one Predict call; ``inputs`` are sent with their own dtypes."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model_name, version, signature_name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
        request.output_filter.extend(output_filter)
        response = self._call(self._predict.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def metadata(self, model_name: str, version: Optional[int] = None) -> dict:
        """``{"version": int, "signature_def": {name: SignatureDef as a dict}}``."""
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, model_name, version)
        request.metadata_field.append("signature_def")
        response = self._call(self._predict.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return {"version": response.model_spec.version.value,
                "signature_def": {k: json_format.MessageToDict(v, preserving_proto_field_name=True)
                                  for k, v in signatures.signature_def.items()}}

    def status(self, model_name: str, version: Optional[int] = None) -> list:
        """``[{"version": int, "state": "AVAILABLE", ...}]`` from ``ModelService.GetModelStatus``."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model_name, version)
        response = self._call(self._models.GetModelStatus, request)
        return [{"version": s.version, "state": get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                 "error_message": s.status.error_message} for s in response.model_version_status]

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_NUMPY_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32, "DT_INT64": np.int64,
                 "DT_UINT8": np.uint8, "DT_INT8": np.int8, "DT_INT16": np.int16, "DT_UINT16": np.uint16,
                 "DT_BOOL": np.bool_, "DT_HALF": np.float16}


class RestClient:
    """TF Serving's REST API (``POST /v1/models/NAME[/versions/V]:predict``, columnar ``inputs``)."""

    def __init__(self, target: str, timeout: float = 600.0):
        self.base = target.rstrip("/") if "://" in target else f"http://{target.rstrip('/')}"
        self.target, self.timeout = target, timeout
        self._dtypes = {}

    def _url(self, model_name, version):
        return f"{self.base}/v1/models/{model_name}" + (f"/versions/{int(version)}" if version is not None else "")

    def _request(self, url: str, body: Optional[bytes] = None) -> dict:
        request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            raise ServingError(self.target, error.code, text) from None
        except urllib.error.URLError as error:
            raise ServingError(self.target, "UNAVAILABLE", error.reason) from None

    def _output_dtypes(self, model_name, version, signature_name) -> dict:
        key = (model_name, version, signature_name)
        if key not in self._dtypes:
            signature = self.metadata(model_name, version)["signature_def"].get(signature_name, {})
            self._dtypes[key] = {k: _NUMPY_DTYPES.get(v.get("dtype")) for k, v in signature.get("outputs", {}).items()}
        return self._dtypes[key]

    def predict(self, model_name: str, inputs: Dict[str, np.ndarray], signature_name: str = "serving_default",
                version: Optional[int] = None) -> Dict[str, np.ndarray]:
        """``{output name: numpy array}``, with the dtypes the signature declares (read once from its metadata)."""
        body = json.dumps({"signature_name": signature_name,
                           "inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}).encode()
        outputs = self._request(self._url(model_name, version) + ":predict", body)["outputs"]
        dtypes = self._output_dtypes(model_name, version, signature_name)
        if not isinstance(outputs, dict):  # TF Serving leaves out the name of a single output
            if len(dtypes) != 1:
                raise ServingError(self.target, "UNKNOWN", f"got one unnamed output, but signature "
                                                           f"{signature_name!r} declares {sorted(dtypes)}")
            outputs = {next(iter(dtypes)): outputs}
        return {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in outputs.items()}

    def metadata(self, model_name: str, version: Optional[int] = None) -> dict:
        """``{"version": int, "signature_def": {name: SignatureDef as a dict}}``."""
        response = self._request(self._url(model_name, version) + "/metadata")
        return {"version": int(response["model_spec"]["version"]),
                "signature_def": response["metadata"]["signature_def"]["signature_def"]}

    def status(self, model_name: str, version: Optional[int] = None) -> list:
        """``[{"version": int, "state": "AVAILABLE", ...}]``."""
        response = self._request(self._url(model_name, version))
        return [{"version": int(s["version"]), "state": s["state"],
                 "error_message": s.get("status", {}).get("error_message", "")}
                for s in response["model_version_status"]]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_client(server: str, protocol: str = "grpc", timeout: float = 600.0):
    """A :class:`GrpcClient` or :class:`RestClient` for ``HOST:PORT``."""
    if protocol == "grpc":
        return GrpcClient(server, timeout=timeout)
    if protocol == "rest":
        return RestClient(server, timeout=timeout)
    raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")


def segment_volume(client, model_name: str, image, modality_mask, version: Optional[int] = None) -> np.ndarray:
    """BraTS labels ``uint8 [D, H, W]`` of one volume ``[D, H, W, M]`` through the ``segment_volume`` signature."""
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(modality_mask, dtype=np.float32)
    if image.ndim != 4 or mask.shape != (image.shape[-1],):
        raise ValueError(f"segment_volume needs an image [D, H, W, M] and a mask [M], got {image.shape} and "
                         f"{mask.shape}")
    outputs = client.predict(model_name, {"image": image[None], "modality_mask": mask[None]},
                             signature_name="segment_volume", version=version)
    labels = np.asarray(outputs["labels"])
    if labels.shape != (1,) + image.shape[:3]:
        raise ValueError(f"server returned labels of shape {labels.shape} for a volume {image.shape[:3]}")
    return labels[0].astype(np.uint8, copy=False)


def predict_nifti_remote(server: str, model_name: str, paths: Dict[str, Optional[str]], out_path: str,
                         protocol: str = "grpc", version: Optional[int] = None, postprocess: bool = False,
                         timeout: float = 600.0, overwrite: bool = False) -> dict:
    """``shaspec predict --server``: read and preprocess the given sequences as
    :func:`shaspec_tf.segment_nifti.predict_nifti` does, segment the brain crop on the server (``segment_volume``),
    and write BraTS labels as NIfTI with the input's affine (atomically); inputs and ``out_path`` may be URIs. An
    ``out_path`` that is one of the inputs or a folder is refused before any work."""
    from shaspec_tf.segment_nifti import (check_nifti_output, local_inputs, nifti_inputs, read_nifti_case,
                                          write_nifti_labels)

    given = nifti_inputs(paths)
    check_nifti_output(given, out_path, overwrite)  # before any reading or request
    with local_inputs(given) as local:  # URIs (gs://...) downloaded once
        record = read_nifti_case(local, out_path)
        with make_client(server, protocol, timeout) as client:
            labels = segment_volume(client, model_name, record.image, record.modality_mask.astype(np.float32),
                                    version)
        return write_nifti_labels(labels, record, given, out_path, postprocess, overwrite,
                                  reference=next(iter(local.values())))
