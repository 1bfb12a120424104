"""Learning-rate schedules and optimisers of the paper and the official code (backend-agnostic Keras)."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="shaspec_tf")
class PolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``lr = initial * (1 - step / decay_steps) ** power`` (the official ``lr_poly``, power 0.9), held at 0 after
    ``decay_steps``."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, power: float = 0.9):
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = int(decay_steps)
        self.power = float(power)
        if self.decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {decay_steps}")

    def __call__(self, step):
        progress = ops.minimum(ops.cast(step, "float32") / self.decay_steps, 1.0)
        return self.initial_learning_rate * ops.power(1.0 - progress, self.power)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "power": self.power}


def make_schedule(kind: str, learning_rate: float, steps: int):
    """``poly`` (official code, the default), ``cosine`` (the paper's text), or ``constant``."""
    if kind == "poly":
        return PolyDecay(learning_rate, steps)
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    if kind == "constant":
        return learning_rate
    raise ValueError(f"unknown schedule {kind!r}: expected poly, cosine or constant")


def make_optimizer(name: str, learning_rate, weight_decay: float = 0.0):
    """``sgd``: SGD with Nesterov momentum 0.99 (BraTS, paper section 4.2); ``adam``: Adam with decoupled weight
    decay (AV-MNIST, the paper's 1e-2)."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.99, nesterov=True,
                                    weight_decay=weight_decay or None)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay or None)
    raise ValueError(f"unknown optimiser {name!r}: expected sgd or adam")
