"""Data side of shaspec-tf: modality masks, toy volumes; TFRecords, NIfTI and AV-MNIST readers build on these."""
