"""tf.data input: TFRecords -> augmented, modality-dropped batches for ``model.fit``.

Randomness is stateless and keyed on ``(seed, element index)``, so a pipeline is deterministic under a seed however
many parallel calls ``map`` makes. Absent modalities stay zeros through every augmentation, and modality dropout
only ever removes modalities a case has, keeping at least one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import tensorflow as tf

from shaspec_tf import fileio
from shaspec_tf.data.files import record_dataset
from shaspec_tf.data.schema import (BRATS_MODALITIES, avmnist_model_inputs, brats_model_inputs, parse_avmnist_example,
                                    parse_brats_example, region_masks_tf)

AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Augmentation:
    """BraTS training augmentation (a subset of the official batchgenerators pipeline)."""

    foreground_prob: float = 0.5 * 3 / 4   # official sampler before Sep 2024: p(centre on a random ET/WT/TC voxel)
    flip_prob: float = 0.5                 # per spatial axis
    scale_prob: float = 0.5                # crop int(s * size) with s ~ U(0.9, 1.1), resized back (official)
    scale_range: Sequence[float] = (0.9, 1.1)
    brightness_prob: float = 0.15          # multiplicative, U(0.75, 1.25) per present modality
    noise_prob: float = 0.1                # additive Gaussian, sigma 0.1


@dataclass
class ModalityDropout:
    """Per-sample modality dropout by the official law (keep ``k ~ U{1..present}`` of a case's modalities).

    ``rate`` is the probability that a sample is dropped at all; with ``ramp_steps`` it grows linearly from 0 to
    ``rate`` over that many batches (the curriculum the authors suggest); ``warmup_steps`` batches first keep every
    modality (the official two-stage schedule). ``subset`` fixes one mask for every sample (dedicated training).

    ``probs`` (one per modality, in mask order) replaces the official law by independent per-modality dropout: each
    present modality is left out with its own probability (sensors fail at different rates), scaled by the same
    warm-up and ramp; when every present modality would go, one of them, chosen uniformly, stays. ``rate`` is then
    not used.
    """

    rate: float = 1.0
    warmup_steps: int = 0
    ramp_steps: int = 0
    subset: Optional[Sequence[int]] = None
    probs: Optional[Sequence[float]] = None


def _uniform(seed, index, salt, shape=()):
    return tf.random.stateless_uniform(shape, seed=tf.stack([tf.cast(seed, tf.int64) * 1000003 + salt,
                                                             tf.cast(index, tf.int64)]))


def drop_modalities(mask, index, seed, dropout: ModalityDropout, batch_size: int = 1):
    """The mask after dropout for element ``index`` (``mask`` float32 ``[M]`` of the modalities the case has)."""
    if dropout.subset is not None:
        fixed = tf.constant(dropout.subset, tf.float32)
        return fixed * mask
    step = tf.cast(index // batch_size, tf.float32)
    if dropout.ramp_steps > 0:
        schedule = tf.clip_by_value((step - dropout.warmup_steps) / dropout.ramp_steps, 0.0, 1.0)
    else:
        schedule = tf.where(step < dropout.warmup_steps, 0.0, 1.0)
    m = mask.shape[0]
    if dropout.probs is not None:
        if len(dropout.probs) != m:
            raise ValueError(f"modality drop probabilities {list(dropout.probs)} must give one per modality ({m})")
        leave = _uniform(seed, index, 4, (m,)) < tf.constant(dropout.probs, tf.float32) * schedule
        kept = mask * tf.cast(tf.logical_not(leave), tf.float32)
        # every present modality drawn to go: keep one of them, uniformly (the smallest random key among them)
        rescue = tf.one_hot(tf.argmin(tf.where(mask > 0, _uniform(seed, index, 5, (m,)), 2.0)), m, dtype=tf.float32)
        return tf.where(tf.reduce_sum(kept) > 0, kept, rescue * mask)
    rate = tf.constant(dropout.rate, tf.float32) * schedule
    present = tf.reduce_sum(mask)
    keep = tf.floor(_uniform(seed, index, 1) * present) + 1.0                        # k ~ U{1..present}
    order = tf.argsort(tf.where(mask > 0, _uniform(seed, index, 2, (m,)), 2.0))     # present ones first, shuffled
    rank = tf.scatter_nd(order[:, None], tf.range(m, dtype=tf.float32), [m])
    dropped = tf.cast(rank < keep, tf.float32) * mask
    return tf.where(_uniform(seed, index, 3) < rate, dropped, mask)


def _crop_start(label, crop, shape, seed, index, fg_prob):
    """Foreground-biased crop corner: with ``fg_prob``, centre on a random voxel of a random region."""
    size = tf.cast(shape, tf.float32)
    crop_f = tf.cast(crop, tf.float32)
    random_start = tf.floor(_uniform(seed, index, 10, (3,)) * (size - crop_f + 1.0))
    masks = region_masks_tf(label)
    region = tf.cast(tf.floor(_uniform(seed, index, 11) * float(masks.shape[0])), tf.int32)
    voxels = tf.where(tf.gather(masks, region))
    count = tf.shape(voxels, out_type=tf.int64)[0]
    pick = tf.cast(tf.floor(_uniform(seed, index, 12) * tf.cast(tf.maximum(count, 1), tf.float32)), tf.int64)
    centre = tf.cast(tf.gather(voxels, tf.minimum(pick, tf.maximum(count - 1, 0))), tf.float32)
    fg_start = tf.clip_by_value(centre - tf.floor(crop_f / 2.0), 0.0, size - crop_f)
    use_fg = tf.logical_and(count > 0, _uniform(seed, index, 13) < fg_prob)
    return tf.cast(tf.where(use_fg, fg_start, random_start), tf.int32)


def _resize3d(volume, size, method):
    """Resize ``[D, H, W, C]`` to ``size`` (D, H, W) by two 2D resizes."""
    d, h, w = size[0], size[1], size[2]
    x = tf.image.resize(volume, tf.stack([h, w]), method=method)                     # over (H, W), D as batch
    x = tf.transpose(x, (1, 0, 2, 3))                                                # [H, D, W, C]
    x = tf.image.resize(x, tf.stack([d, w]), method=method)
    return tf.transpose(x, (1, 0, 2, 3))


def augment_case(features, index, seed, crop_size, aug: Augmentation):
    """Random crop (padding volumes smaller than the crop), scaling, flips and intensity changes for one case."""
    image, label = features["image"], features["label"]
    mask = tf.cast(features["modality_mask"], tf.float32)
    crop = tf.constant(crop_size, tf.int32)
    scale = tf.where(_uniform(seed, index, 20) < aug.scale_prob,
                     aug.scale_range[0] + _uniform(seed, index, 21) * (aug.scale_range[1] - aug.scale_range[0]), 1.0)
    scaled = tf.cast(tf.floor(tf.cast(crop, tf.float32) * scale), tf.int32)
    shape = tf.shape(label)
    pad = tf.maximum(scaled - shape, 0)
    paddings = tf.stack([pad // 2, pad - pad // 2], axis=1)
    image = tf.pad(image, tf.concat([paddings, [[0, 0]]], axis=0))
    label = tf.pad(label, paddings)
    shape = tf.shape(label)
    start = _crop_start(label, scaled, shape, seed, index, aug.foreground_prob)
    image = tf.slice(image, tf.concat([start, [0]], 0), tf.concat([scaled, [-1]], 0))
    label = tf.slice(label, start, scaled)
    image = _resize3d(image, crop, "bilinear")
    label = tf.cast(_resize3d(tf.cast(label[..., None], tf.float32), crop, "nearest")[..., 0], tf.uint8)
    for axis in range(3):
        flip = _uniform(seed, index, 30 + axis) < aug.flip_prob
        image = tf.cond(flip, lambda: tf.reverse(image, [axis]), lambda: image)
        label = tf.cond(flip, lambda: tf.reverse(label, [axis]), lambda: label)
    m = mask.shape[0]
    gain = tf.where(_uniform(seed, index, 40, (m,)) < aug.brightness_prob,
                    0.75 + 0.5 * _uniform(seed, index, 41, (m,)), 1.0)
    noise = tf.random.stateless_normal(tf.shape(image), seed=tf.stack([tf.cast(seed, tf.int64) * 7 + 42,
                                                                     tf.cast(index, tf.int64)])) * 0.1
    image = image * gain + tf.where(_uniform(seed, index, 43) < aug.noise_prob, 1.0, 0.0) * noise
    image = image * mask  # absent modalities stay exactly zero
    image.set_shape(list(crop_size) + [m])
    label.set_shape(list(crop_size))
    return dict(features, image=image, label=label)


def brats_dataset(file_pattern, batch_size: int = 1, crop_size=(80, 160, 160), training: bool = True,
                  seed: int = 0, augmentation: Optional[Augmentation] = None,
                  dropout: Optional[ModalityDropout] = None, repeat: Optional[bool] = None,
                  shuffle_buffer: int = 16, num_modalities: int = len(BRATS_MODALITIES),
                  start_step: int = 0) -> tf.data.Dataset:
    """BraTS TFRecords -> ``({"image", "modality_mask"}, regions)`` batches.

    Training: shuffled, repeated, cropped to ``crop_size`` with augmentation and modality dropout; ``start_step``
    skips the batches a resumed run has already seen, so it continues with exactly the batches an uninterrupted run
    would have drawn. Evaluation (``training=False``): whole cases, unbatched shapes, masks as recorded.
    """
    files = fileio.glob(file_pattern) if isinstance(file_pattern, str) else list(file_pattern)
    if not files:
        raise FileNotFoundError(f"no TFRecords match {file_pattern}")
    ds = record_dataset(files, num_parallel_reads=min(len(files), 4))
    ds = ds.map(lambda s: parse_brats_example(s, num_modalities), num_parallel_calls=AUTOTUNE)
    if not training:
        return ds.map(brats_model_inputs, num_parallel_calls=AUTOTUNE).batch(1).prefetch(AUTOTUNE)
    aug = augmentation or Augmentation()
    drop = dropout or ModalityDropout()
    if repeat is None or repeat:
        ds = ds.repeat()
    ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = ds.enumerate().skip(start_step * batch_size)

    def prepare(index, features):
        features = augment_case(features, index, seed, crop_size, aug)
        mask = drop_modalities(tf.cast(features["modality_mask"], tf.float32), index, seed, drop, batch_size)
        features = dict(features, modality_mask=mask, image=features["image"] * mask)
        return brats_model_inputs(features)

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)


def avmnist_dataset(file_pattern, batch_size: int = 32, training: bool = True, seed: int = 0,
                    dropout: Optional[ModalityDropout] = None, shuffle_buffer: int = 2048,
                    audio_rate: Optional[float] = None, repeat: bool = False) -> tf.data.Dataset:
    """AV-MNIST TFRecords -> ``({"image", "audio", "modality_mask"}, label)`` batches.

    ``audio_rate`` R keeps the audio of a fixed fraction R of the samples (chosen by a hash of the sample id, so the
    same samples every epoch) and marks it absent for the rest, on top of what the records hold (the builder's
    ``--audio-rate`` does the same at build time, per class). ``dropout`` adds per-batch modality dropout.
    ``repeat`` (training): an endless stream, reshuffled every pass, whose element index (what the dropout's
    warm-up, ramp and draws are keyed on) keeps counting across passes, so the schedule runs over the whole training
    and every pass draws new masks."""
    files = fileio.glob(file_pattern) if isinstance(file_pattern, str) else list(file_pattern)
    if not files:
        raise FileNotFoundError(f"no TFRecords match {file_pattern}")
    ds = record_dataset(files).map(parse_avmnist_example, num_parallel_calls=AUTOTUNE)
    if audio_rate is not None:
        def limit_audio(features):
            bucket = tf.strings.to_hash_bucket_fast(features["sample_id"], 1_000_000)
            keep = tf.cast(tf.cast(bucket, tf.float64) / 1e6 < audio_rate, tf.int64)
            keep = tf.maximum(keep, 1 - features["modality_mask"][0])  # never leave a sample with nothing
            mask = features["modality_mask"] * tf.stack([tf.constant(1, tf.int64), keep])
            return dict(features, modality_mask=mask, audio=features["audio"] * tf.cast(mask[1], tf.float32))
        ds = ds.map(limit_audio, num_parallel_calls=AUTOTUNE)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
    if training and dropout is not None:
        def prepare(index, features):
            mask = drop_modalities(tf.cast(features["modality_mask"], tf.float32), index, seed, dropout, batch_size)
            return avmnist_model_inputs(dict(features, modality_mask=mask, image=features["image"] * mask[0],
                                             audio=features["audio"] * mask[1]))
        ds = ds.enumerate().map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(avmnist_model_inputs, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size).prefetch(AUTOTUNE)
