"""The task registry, at the bottom of the task package: the generic modules (data files, schema, evaluation,
export, training) look tasks up here by name or kind, and ``shaspec_tf.tasks`` registers the built-in ones. It
imports no task module, so looking a task up never runs back up into the modules a task calls."""
from __future__ import annotations

from typing import Dict

_REGISTRY: Dict[str, object] = {}  # name -> shaspec_tf.tasks.base.Task


def register(task, replace: bool = False):
    """Make ``task`` known under ``task.name``; a one-line ``ValueError`` when the name is taken (unless
    ``replace``) or is an existing task's kind."""
    if not all(hasattr(task, attr) for attr in ("name", "kind", "scoring", "modalities")):
        raise TypeError(f"register needs a Task, got {type(task).__name__}")
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered")
    if any(t.kind == task.name for t in _REGISTRY.values()):
        raise ValueError(f"task name {task.name!r} is already a task kind")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    """Forget the task called ``name`` (tests that register toy tasks)."""
    _REGISTRY.pop(name, None)


def task_names() -> tuple:
    """The registered task names, in registration order."""
    return tuple(_REGISTRY)


def all_tasks() -> tuple:
    return tuple(_REGISTRY.values())


def get_task(name):
    """The task called ``name``, or the first task of kind ``name``; a ``Task`` is returned as it is. A one-line
    ``ValueError`` naming the known tasks otherwise."""
    if not isinstance(name, str) and hasattr(name, "scoring"):  # a Task already
        return name
    task = _REGISTRY.get(name) if isinstance(name, str) else None
    if task is None:
        task = next((t for t in _REGISTRY.values() if t.kind == name), None)
    if task is None:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(_REGISTRY)} (or a kind: "
                         f"{', '.join(dict.fromkeys(t.kind for t in _REGISTRY.values()))})")
    return task


def task_for_model(config: dict):
    """The task of a saved model configuration (``model.shaspec_config``): its kind, and among the tasks of that
    kind the one with its modalities."""
    kind = config.get("task") if isinstance(config, dict) else None
    candidates = [t for t in _REGISTRY.values() if t.kind == kind]
    if not candidates:
        raise ValueError(f"unknown task {kind!r} in the model configuration: expected one of "
                         f"{', '.join(dict.fromkeys(t.kind for t in _REGISTRY.values()))}")
    return next((t for t in candidates if t.matches_model(config)), candidates[0])


def task_for_preset(preset: str):
    """The task whose model builder has ``preset``; a one-line ``ValueError`` listing every preset otherwise."""
    for task in _REGISTRY.values():
        if preset in task.presets():
            return task
    known = [p for t in _REGISTRY.values() for p in t.presets()]
    raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(known)}")
