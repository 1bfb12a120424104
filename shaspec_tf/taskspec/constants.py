"""The constants of each task, importing nothing: what the data, metrics and inference modules read (the task
classes in ``brats.py`` / ``avmnist.py``, which call into those modules, sit above them)."""

# -- BraTS --------------------------------------------------------------------------------------------------------
BRATS_NAME = "brats"
BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_REGIONS = ("ET", "WT", "TC")                    # region channels of the model, in the official order
BRATS_LABEL_VALUES = (0, 1, 2, 4)
# BraTS 2018-2021 label maps: a region is a set of label values (BraTS 2023 uses 3 for the enhancing tumour).
BRATS_LABEL_REGIONS = {"ET": (4,), "WT": (1, 2, 4), "TC": (1, 4)}
BRATS2023_LABEL_REGIONS = {"ET": (3,), "WT": (1, 2, 3), "TC": (1, 3)}
# Region probabilities -> label values, in the order the official code writes them (later ones win): WT -> 2, then
# TC -> 1, then ET -> 4. The one definition of the precedence, as (channel index, label value) pairs.
BRATS_LABEL_PRECEDENCE = tuple((BRATS_REGIONS.index(region), value) for region, value in (("WT", 2), ("TC", 1),
                                                                                            ("ET", 4)))
BRATS_SPLITS = ("train", "eval")
BRATS_RECORD_FEATURES = ("schema_version", "task", "case_id", "modalities", "modality_mask", "image", "image_shape",
                         "label", "has_label", "spacing", "affine", "original_shape", "crop_start",
                         "present_modalities", "label_values")
BRATS_STATS_FEATURES = ("schema_version", "task", "modality_mask", "present_modalities", "label_values", "has_label",
                        "spacing", "image_shape", "original_shape")

# -- AV-MNIST -----------------------------------------------------------------------------------------------------
AVMNIST_NAME = "avmnist"
AVMNIST_MODALITIES = ("image", "audio")
AVMNIST_IMAGE_SHAPE = (28, 28, 1)
AVMNIST_AUDIO_SHAPE = (20, 20, 1)                     # 20 MFCCs x 20 frames
AVMNIST_CLASSES = 10
AVMNIST_SPLITS = ("train", "test")                    # the SMIL protocol's names
AVMNIST_RECORD_FEATURES = ("schema_version", "task", "sample_id", "modalities", "modality_mask", "image", "audio",
                           "label", "speaker", "present_modalities")
AVMNIST_STATS_FEATURES = ("schema_version", "task", "modality_mask", "present_modalities", "label", "speaker")
