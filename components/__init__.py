"""Custom TFX components of shaspec-tf: example gens, the missing-modality evaluator (in progress)."""
