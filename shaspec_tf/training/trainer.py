"""``shaspec train``: ShaSpec training on prepared TFRecords, with exact resume.

    shaspec train --task brats|avmnist --data DIR --out DIR [--preset P] [--steps N | --epochs N]
                  [--regime non-dedicated|dedicated --subset flair+t1ce] [--audio-rate R]

Output folder: ``model_config.json`` (the model's configuration), ``model.weights.h5`` (final weights),
``checkpoints/`` (model + optimiser + step, written every ``--checkpoint-every`` steps; a re-run of the same command
resumes from it and draws exactly the batches an uninterrupted run would have), ``tensorboard/``, ``history.json``
and ``learning_curves.png``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

TASK_DEFAULTS = {
    # BraTS: the official random modality dropout; AV-MNIST: only the missingness the data carries (the paper's
    # audio-rate protocol) unless --drop-rate asks for more.
    "brats": dict(preset="small", batch_size=2, learning_rate=1e-2, optimizer="sgd", weight_decay=0.0,
                  drop_rate=1.0),
    "avmnist": dict(preset="avmnist", batch_size=32, learning_rate=1e-3, optimizer="adam", weight_decay=1e-2,
                    drop_rate=0.0),
}


@dataclass
class TrainConfig:
    task: str
    data: str
    out: str
    preset: Optional[str] = None
    variant: str = "shaspec"
    steps: Optional[int] = None
    epochs: Optional[int] = None
    checkpoint_every: int = 100
    batch_size: Optional[int] = None
    crop_size: Optional[Sequence[int]] = None
    regime: str = "non-dedicated"
    subset: Optional[str] = None
    warmup_steps: int = 0
    ramp_steps: int = 0
    drop_rate: Optional[float] = None
    learning_rate: Optional[float] = None
    schedule: str = "poly"
    optimizer: Optional[str] = None
    weight_decay: Optional[float] = None
    mixed_precision: str = "off"
    jit_compile: bool = False
    run_eagerly: bool = False
    strategy: str = "default"
    audio_rate: Optional[float] = None
    seed: int = 0
    model_options: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        if self.task not in TASK_DEFAULTS:
            raise ValueError(f"unknown task {self.task!r}: expected brats or avmnist")
        values = asdict(self)
        for key, value in TASK_DEFAULTS[self.task].items():
            if values.get(key) is None:
                values[key] = value
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        if self.regime not in ("non-dedicated", "dedicated"):
            raise ValueError(f"unknown regime {self.regime!r}: expected non-dedicated or dedicated")
        if self.regime == "dedicated" and not self.subset:
            raise ValueError("dedicated training needs --subset (the modalities available, e.g. flair+t1ce)")
        return TrainConfig(**values)


def _subset_mask(subset: str, modalities) -> list:
    names = [name for name in subset.split("+") if name]
    unknown = sorted(set(names) - set(modalities))
    if unknown or not names:
        raise ValueError(f"subset {subset!r}: unknown modalities {unknown}; choose from {'+'.join(modalities)}")
    return [1 if m in names else 0 for m in modalities]


def _records(data: str, task: str, split: str) -> list:
    from shaspec_tf.data.files import split_files

    return split_files(data, split, task)


def _count_records(files) -> int:
    from shaspec_tf.data.files import record_dataset

    return sum(1 for _ in record_dataset(files))


def _strategy(name: str):
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}: expected default, mirrored or multi_worker")


def _check_output_folder(out: str, model_config: dict) -> Optional[int]:
    """The step to resume from (``None`` for a fresh start); refuses a folder that belongs to another model and a
    corrupt checkpoint, rather than silently starting afresh."""
    saved_path = os.path.join(out, "model_config.json")
    if not os.path.exists(saved_path):
        return None
    with open(saved_path) as f:
        saved = json.load(f)
    if json.loads(json.dumps(model_config)) != saved:
        differing = sorted(k for k in set(saved) | set(model_config)
                           if json.dumps(saved.get(k)) != json.dumps(model_config.get(k)))
        raise ValueError(f"{out} holds a different model (preset {saved.get('preset')!r}, differing options "
                         f"{differing}); use another --out or the same model options")
    meta = os.path.join(out, "checkpoints", "training_metadata.json")
    weights = os.path.join(out, "checkpoints", "latest.weights.h5")
    if not os.path.exists(meta):
        return None
    try:
        import h5py

        with open(meta) as f:
            epoch = int(json.load(f)["epoch"])
        with h5py.File(weights, "r"):
            pass
    except Exception as error:
        raise ValueError(f"checkpoint in {out}/checkpoints is unreadable ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); delete that folder to start "
                         f"afresh") from error
    return epoch


POLICIES = {"off": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def train(config: TrainConfig, callbacks=()) -> dict:
    """Train (or resume) and return ``{"history", "steps", "out", "resumed_from_step"}``. The mixed-precision
    policy applies for the duration of the call and is restored afterwards."""
    import keras

    c = config.resolved()
    if c.mixed_precision not in POLICIES:
        raise ValueError(f"unknown mixed precision {c.mixed_precision!r}: expected one of {sorted(POLICIES)}")
    previous = keras.mixed_precision.global_policy()
    if POLICIES[c.mixed_precision]:
        keras.mixed_precision.set_global_policy(POLICIES[c.mixed_precision])
    try:
        return _train(c, callbacks)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _train(c: TrainConfig, callbacks) -> dict:
    import keras

    import shaspec_tf
    from shaspec_tf.data.input import ModalityDropout, avmnist_dataset, brats_dataset
    from shaspec_tf.training.schedules import make_optimizer, make_schedule

    keras.utils.set_random_seed(c.seed)
    train_files = _records(c.data, c.task, "train")
    build = shaspec_tf.build_segmenter if c.task == "brats" else shaspec_tf.build_classifier
    probe = build(c.preset, variant=c.variant, **c.model_options)
    model_config, modalities = dict(probe.shaspec_config), probe.modalities
    del probe
    if c.task == "brats":
        crop = tuple(c.crop_size or model_config["crop_size"])
        steps_per_epoch = min(c.checkpoint_every, c.steps) if c.steps else c.checkpoint_every
        total = c.steps if c.steps else c.epochs * steps_per_epoch
    else:
        per_epoch = math.ceil(_count_records(train_files) / c.batch_size)
        total = c.steps if c.steps else c.epochs * per_epoch
        steps_per_epoch = min(c.checkpoint_every, per_epoch, total)
    epochs = math.ceil(total / steps_per_epoch)
    total = epochs * steps_per_epoch

    os.makedirs(c.out, exist_ok=True)
    start_epoch = _check_output_folder(c.out, model_config) or 0
    with open(os.path.join(c.out, "model_config.json"), "w") as f:
        json.dump(model_config, f, indent=2, sort_keys=True)
    with open(os.path.join(c.out, "train_config.json"), "w") as f:
        json.dump(asdict(c), f, indent=2, default=list)

    subset = _subset_mask(c.subset, modalities) if c.regime == "dedicated" else None
    dropout = ModalityDropout(rate=c.drop_rate, warmup_steps=c.warmup_steps, ramp_steps=c.ramp_steps, subset=subset)
    start_step = start_epoch * steps_per_epoch
    if c.task == "brats":
        data = brats_dataset(train_files, batch_size=c.batch_size, crop_size=crop, seed=c.seed, dropout=dropout,
                             start_step=start_step)
    else:
        data = avmnist_dataset(train_files, batch_size=c.batch_size, seed=c.seed, audio_rate=c.audio_rate,
                               dropout=dropout if (subset or c.drop_rate > 0) else None)
        data = data.repeat().skip(start_step)

    with _strategy(c.strategy).scope():
        model = build(c.preset, variant=c.variant, **c.model_options)
        optimizer = make_optimizer(c.optimizer, make_schedule(c.schedule, c.learning_rate, total), c.weight_decay)
        model.compile(optimizer=optimizer, jit_compile=c.jit_compile, run_eagerly=c.run_eagerly)

    checkpoints = os.path.join(c.out, "checkpoints")
    history = _history_writer(os.path.join(c.out, "history.json"), start_epoch)
    all_callbacks = [
        keras.callbacks.BackupAndRestore(checkpoints, save_freq="epoch", delete_checkpoint=False),
        history,
        keras.callbacks.TensorBoard(os.path.join(c.out, "tensorboard"), update_freq="epoch"),
        *callbacks,
    ]
    model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=all_callbacks,
              verbose=1 if os.isatty(1) else 2)
    model.save_weights(os.path.join(c.out, "model.weights.h5"))
    _plot_learning_curves(history.history, steps_per_epoch, os.path.join(c.out, "learning_curves.png"))
    return {"history": history.history, "steps": total, "out": c.out, "resumed_from_step": start_step}


def _history_writer(path: str, start_epoch: int):
    """A callback that keeps ``history.json`` current after every epoch, so an interrupted run's curve survives its
    resume (entries past ``start_epoch`` are dropped first)."""
    import keras

    class HistoryWriter(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            previous = {}
            if start_epoch and os.path.exists(path):
                with open(path) as f:
                    previous = json.load(f)
            self.history = {k: v[:start_epoch] for k, v in previous.items()}

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            with open(path + ".tmp", "w") as f:
                json.dump(self.history, f, indent=2)
            os.replace(path + ".tmp", path)

    return HistoryWriter()


def _plot_learning_curves(history: dict, steps_per_epoch: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "task_loss", "alignment_loss", "domain_loss") if history.get(k)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [(i + 1) * steps_per_epoch for i in range(len(history[key]))]
        ax.plot(steps, history[key], marker="o")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
