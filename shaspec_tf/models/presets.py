"""Model presets, in one place.

``paper`` reproduces the official BraTS model (3D ResNet-50 encoders, layer4 = 320 planes, ASPP, 187.71 M
parameters, 80x160x160 crops). ``small`` and ``tiny`` keep the architecture and shrink widths and depths so that
training and tests run on a CPU. ``avmnist`` is the 0.22 M-parameter classifier for AV-MNIST.
"""
from __future__ import annotations

import copy

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_REGIONS = ("ET", "WT", "TC")  # the official channel order
AVMNIST_MODALITIES = ("image", "audio")

_SEGMENTER_COMMON = dict(
    task="segmentation",
    variant="shaspec",            # or "baseline": zero-filled inputs, plain concatenation, no auxiliary losses
    modalities=BRATS_MODALITIES,
    regions=BRATS_REGIONS,
    norm="instance",
    activation="leaky_relu",
    weight_std=True,
    symmetric_padding=False,      # True: PyTorch padding (needed for official weights)
    fusion_kernel=3,              # 3: the official 3x3x3 projection; 1: the paper's "linear" projection
    fusion_init="glorot_uniform", # a plain projection at the scale of r; "standardised": the official one (33-117x r)
    missing_rule="mean",          # paper Eq. 4; "first": the official code
    masked_aux_losses=True,       # paper: auxiliary losses only over present modalities; False: official code
    alignment_pairs="cyclic",
    alpha=0.1,
    beta=0.02,
    aspp_rates=(2, 4, 8),
    aspp_image_pool_norm=False,   # True: the official (degenerate) instance norm on the 1x1x1 image-pool branch
    remat="none",                 # "encoders": recompute the encoders' insides in the backward pass; "all": decoder too
    absent_features="detached",   # absent modalities' skip maps (the baseline: all their features): the official
)                                 # values with no gradient back; "zeros"; "encoded" (the official code, gradient too)

# What the decoder receives for an absent modality. The official code feeds it the shared encoder's response to the
# zero-filled input ("encoded"); every instance norm of those (near-)constant maps multiplies the gradient by up to
# 1/sqrt(eps) = 316, so the shared stem's gradient reaches 1e5 (TensorFlow) to 1e17 (JAX, float32) whenever a
# modality is absent, and 8 SGD steps from initialisation without a warm-up put weights at 9e5 (TensorFlow) and
# 4e18 (JAX). "detached" (default) gives the decoder the same values with no gradient through them: the official
# forward pass, every weight bounded. "zeros" gives it zeros instead, also without gradient.
ABSENT_FEATURES = ("zeros", "detached", "encoded")

# Rematerialisation (gradient checkpointing) of the segmenter's training calls: what the backward pass recomputes
# instead of keeping. Same values and gradients; less memory, one more forward pass of what is recomputed.
REMAT_MODES = ("none", "encoders", "all")

SEGMENTER_PRESETS = {
    "paper": dict(_SEGMENTER_COMMON, depth=50, stem_filters=64, planes=(64, 128, 256, 320), blocks=None,
                  feature_channels=256, decoder_filters=(256, 128, 64, 32), crop_size=(80, 160, 160)),
    "small": dict(_SEGMENTER_COMMON, depth=18, stem_filters=16, planes=(16, 32, 48, 64), blocks=(1, 1, 1, 1),
                  feature_channels=48, decoder_filters=(48, 32, 16, 16), crop_size=(48, 96, 96)),
    "tiny": dict(_SEGMENTER_COMMON, depth=10, stem_filters=8, planes=(8, 8, 16, 16), blocks=(1, 1, 1, 1),
                 feature_channels=16, decoder_filters=(16, 8, 8, 8), aspp_rates=(1, 2, 2), crop_size=(32, 64, 64)),
}

CLASSIFIER_PRESETS = {
    "avmnist": dict(
        task="classification",
        variant="shaspec",
        modalities=AVMNIST_MODALITIES,
        input_shapes={"image": (28, 28, 1), "audio": (20, 20, 1)},
        num_classes=10,
        stem_filters=16,
        stem_size=12,               # both stems map their modality onto a 12x12x16 grid for the shared trunk
        trunk_filters=(32, 64),
        feature_dim=64,
        head_units=64,
        dropout=0.5,
        norm_groups=8,
        missing_rule="mean",
        masked_aux_losses=True,
        alignment_pairs="cyclic",
        alpha=0.1,
        beta=0.02,
    ),
}
CLASSIFIER_PRESETS["avmnist-tiny"] = dict(CLASSIFIER_PRESETS["avmnist"], stem_filters=4, trunk_filters=(8, 8),
                                          feature_dim=8, head_units=8)

# official_parity=True applies these on top of the preset (load weights from the official PyTorch code).
OFFICIAL_PARITY = dict(fusion_init="standardised", missing_rule="first", masked_aux_losses=False,
                       symmetric_padding=True, aspp_image_pool_norm=True, absent_features="encoded")


def resolve_config(presets: dict, preset: str, overrides: dict) -> dict:
    """The preset's configuration with ``overrides`` applied; unknown keys and presets are errors."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(presets)}")
    config = copy.deepcopy(presets[preset])
    parity = bool(overrides.pop("official_parity", False))
    if parity:
        config.update(OFFICIAL_PARITY)
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for preset {preset!r}; known: {sorted(config)}")
    config.update(overrides)
    config["preset"] = preset
    config["official_parity"] = parity
    for key in ("modalities", "regions", "planes", "blocks", "decoder_filters", "crop_size", "aspp_rates",
                "trunk_filters"):
        if isinstance(config.get(key), list):
            config[key] = tuple(config[key])
    if isinstance(config.get("input_shapes"), dict):  # lists after a JSON round trip, as the tuples above
        config["input_shapes"] = {name: tuple(shape) for name, shape in config["input_shapes"].items()}
    variants = ("shaspec", "baseline", "concat") if config["task"] == "classification" else ("shaspec", "baseline")
    if config["variant"] not in variants:
        raise ValueError(f"unknown variant {config['variant']!r} for the {preset} preset: expected "
                         f"{', '.join(variants)}")
    if config["task"] == "segmentation":
        _validate_choice(config, "remat", REMAT_MODES, preset)
        _validate_choice(config, "absent_features", ABSENT_FEATURES, preset)
        _validate_remat(config)
    return config


def _validate_choice(config: dict, key: str, choices: tuple, preset: str) -> None:
    if config[key] not in choices:
        raise ValueError(f"unknown {key} {config[key]!r} for the {preset} preset: expected one of "
                         f"{', '.join(choices)}")


def _validate_remat(config: dict) -> None:
    if config["remat"] != "none" and config["norm"] == "batch":
        raise ValueError(f"remat={config['remat']!r} needs a stateless norm (instance, group, none), not batch: "
                         "batch norm updates its moving statistics in the forward pass, which remat repeats")
