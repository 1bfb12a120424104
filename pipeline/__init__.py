"""The TFX pipeline of shaspec-tf: ``create_pipeline(config)`` and its local / Kubeflow V2 runners (in progress)."""
