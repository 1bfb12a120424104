"""TF Serving side of shaspec-tf, an application built on the ``shaspec_tf`` library: a local server speaking TF
Serving's protocol from the exported SavedModels (``shaspec_serving.server``, ``shaspec serve``), the ``shaspec``
program that adds ``serve`` to the library's command line (``shaspec_serving.cli``, the console script), the gRPC
and REST clients (``shaspec_serving.client``, re-exported from ``shaspec_tf.serving_client``), and example model,
batching and monitoring configs for the real ``tensorflow/serving`` (see ``shaspec_serving/README.md``).

It imports the library; the library never imports it."""
