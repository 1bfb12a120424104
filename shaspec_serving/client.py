"""The gRPC and REST clients for TensorFlow Serving, re-exported from the library (:mod:`shaspec_tf.serving_client`)
for code that imports them from the serving app; new code can import either.

    from shaspec_serving.client import GrpcClient, RestClient, segment_volume, predict_nifti_remote
"""
from shaspec_tf.serving_client import (MAX_MESSAGE_BYTES, GrpcClient, RestClient, ServingError, make_client,
                                       predict_nifti_remote, segment_volume)

__all__ = ["ServingError", "GrpcClient", "RestClient", "make_client", "segment_volume", "predict_nifti_remote",
           "MAX_MESSAGE_BYTES"]
