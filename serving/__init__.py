"""TF Serving side of shaspec-tf: model configs and gRPC / REST clients (in progress)."""
