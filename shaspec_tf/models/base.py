"""Shared machinery of the ShaSpec models: configuration, serialisation, mask validation, and the loss used by
``fit``."""
from __future__ import annotations

import json

import keras

from shaspec_tf import losses
from shaspec_tf.models.masks import validate_modality_mask


def output_dtype() -> str:
    """The dtype of the models' ``logits`` output layer: float32 under mixed precision (float64 when floatx is
    float64)."""
    return "float64" if keras.config.floatx() == "float64" else "float32"


@keras.saving.register_keras_serializable(package="shaspec_tf")
class ShaSpecModel(keras.Model):
    """A functional Keras model with a ShaSpec configuration.

    Subclasses build their graph from ``self.shaspec_config`` and pass ``inputs``/``outputs`` here. Inputs are a dict
    holding the modality tensors and ``"modality_mask"``; outputs a dict with at least ``"logits"`` (plus
    ``"shared_features"`` and ``"domain_logits"`` for the ShaSpec variant).

    ``fit`` works without a compiled loss: :meth:`compute_loss` adds the task loss and the auxiliary losses
    (paper Eq. 9) and tracks each term as a metric (``task_loss``, ``alignment_loss``, ``domain_loss``).

    The models are registered Keras classes (package ``shaspec_tf``): ``model.save("m.keras")`` writes one file and
    ``keras.saving.load_model("m.keras")`` rebuilds the graph from ``shaspec_config`` (through
    :func:`shaspec_tf.models.build_model`) and loads the weights, without ``custom_objects``, once
    ``shaspec_tf.models`` is imported (see :func:`shaspec_tf.models.save_model`).
    """

    def __init__(self, inputs, outputs, config: dict, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.shaspec_config = dict(config)
        self._term_trackers = {name: keras.metrics.Mean(name=f"{name}_loss")
                               for name in ("task", "alignment", "domain")}

    # -- configuration ------------------------------------------------------------------------------------------
    @property
    def modalities(self):
        return tuple(self.shaspec_config["modalities"])

    def config_json(self) -> str:
        return json.dumps(self.shaspec_config, sort_keys=True)

    def get_config(self):
        """The preset configuration and the model's name: everything :meth:`from_config` needs (the graph is a
        function of ``shaspec_config``, so no layer configs are stored)."""
        return {"shaspec_config": dict(self.shaspec_config), "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuild the model that :meth:`get_config` described, through :func:`shaspec_tf.models.build_model` (which
        resolves the preset and fills the defaults of options added since the config was written)."""
        from shaspec_tf.models import build_model  # the task -> class dispatch; models/__init__ imports this module

        model = build_model(dict(config["shaspec_config"]))
        if not isinstance(model, cls):
            raise ValueError(f"a {cls.__name__} config describes a {type(model).__name__} (task "
                             f"{model.shaspec_config.get('task')!r})")
        if config.get("name") and config["name"] != model.name:
            model.name = config["name"]
        return model

    # -- calling ------------------------------------------------------------------------------------------------
    def validate_inputs(self, inputs) -> None:
        if not isinstance(inputs, dict) or "modality_mask" not in inputs:
            raise ValueError(f"{self.name} expects a dict of inputs with a 'modality_mask' entry, got "
                             f"{type(inputs).__name__}")
        validate_modality_mask(inputs["modality_mask"], self.modalities)

    def __call__(self, inputs, *args, **kwargs):
        # Before Keras' own input checks, so that a bad mask gets the one-line explanation below.
        self.validate_inputs(inputs)
        return super().__call__(inputs, *args, **kwargs)

    # -- training -----------------------------------------------------------------------------------------------
    def task_loss(self, y, y_pred):
        raise NotImplementedError

    def loss_terms(self, x, y, y_pred):
        """``{"total", "task", "alignment", "domain"}`` for a batch (baseline: auxiliary terms are zero)."""
        target = y["target"] if isinstance(y, dict) else y
        task = self.task_loss(target, y_pred)
        c = self.shaspec_config
        if c["variant"] != "shaspec":
            zero = keras.ops.zeros(())
            return {"total": task, "task": task, "alignment": zero, "domain": zero}
        return losses.shaspec_loss(task, y_pred["shared_features"], y_pred["domain_logits"], x["modality_mask"],
                                   alpha=c["alpha"], beta=c["beta"], masked=c["masked_aux_losses"],
                                   pairs=c["alignment_pairs"])

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        terms = self.loss_terms(x, y, y_pred)
        for name, tracker in self._term_trackers.items():
            tracker.update_state(terms[name])
        total = terms["total"]
        if self.losses:
            total = total + keras.ops.sum(self.losses)
        return total

    @property
    def metrics(self):
        return list(super().metrics) + list(self._term_trackers.values())
