"""The TFX pipeline of shaspec-tf: ``create_pipeline(config)`` (``pipeline.pipeline``), its configs
(``pipeline.configs``) and the local / Kubeflow V2 runners."""
