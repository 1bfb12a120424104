"""The tasks shaspec-tf knows, by name: ``get_task("brats")`` / ``get_task("avmnist")``.

Everything that differs between tasks (modalities, regions and labels, record layout and splits, training defaults,
model, scoring and reports, schema rules, inference settings) is asked of the :class:`~shaspec_tf.tasks.base.Task`
rather than decided by comparing names. A new task is one module defining a ``Task`` and one :func:`register` call
(below, or from that module's user).

:func:`get_task` also takes a model configuration's kind (``"segmentation"``, ``"classification"``: what
``model.shaspec_config["task"]`` and evaluation results say), which means the first task registered with that
kind; :func:`task_for_model` picks by kind and modalities.
"""
from __future__ import annotations

from shaspec_tf.tasks.avmnist import AVMNIST
from shaspec_tf.tasks.base import FeatureRule, Task, TrainDefaults
from shaspec_tf.tasks.brats import BRATS
from shaspec_tf.taskspec.registry import (all_tasks, get_task, register, task_for_model, task_for_preset, task_names,
                                       unregister)

register(BRATS)
register(AVMNIST)

__all__ = ["AVMNIST", "BRATS", "FeatureRule", "Task", "TrainDefaults", "all_tasks", "get_task", "register",
           "task_for_model", "task_for_preset", "task_names", "unregister"]
