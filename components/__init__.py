"""Custom TFX components of shaspec-tf: the Beam example gens, schema curation, the Trainer's ``run_fn``, the
missing-modality evaluator and an idempotent Pusher."""
