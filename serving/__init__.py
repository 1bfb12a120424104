"""TF Serving side of shaspec-tf: gRPC and REST clients (``serving.client``), a local server speaking TF Serving's
protocol from the exported SavedModels (``serving.server``, ``shaspec serve``), and example model, batching and
monitoring configs for the real ``tensorflow/serving`` (see ``serving/README.md``)."""
