"""Distribution strategies for ``shaspec train``: one machine (``default``, ``mirrored``) or several (``multi_worker``:
``tf.distribute.MultiWorkerMirroredStrategy``, what Vertex AI runs when a job has more than one replica).

A cluster is described by ``TF_CONFIG`` (``{"cluster": {"chief": [...], "worker": [...]}, "task": {"type",
"index"}}``; Vertex AI sets it on every replica). When it names more than one task, training runs under
``MultiWorkerMirroredStrategy`` whatever ``--strategy`` says (``default`` and ``mirrored`` would train one model per
machine, each writing the same run folder); every worker takes its share of the same global batch. Only the chief
(task ``chief``, or ``worker`` 0 when there is no chief) writes the run folder; the other workers compute the same
steps and write into a private temporary folder that is removed at the end (TF's advice: every worker runs the same
saving code, only the chief keeps what it wrote). They read the chief's checkpoints to resume, so the run folder must
be storage that every worker sees (``gs://...`` on Vertex AI).

Keras 3 (3.12, TF 2.16 backend) needs three things here that this module provides:

* ``Model.fit`` reduces nested structures (the first batch, to build the model symbolically) and scalar logs
  (``reduce("MEAN", v, axis=0)``) through ``strategy.reduce``; ``MultiWorkerMirroredStrategy.reduce`` with several
  workers accepts neither (a nested dict: "Attempt to convert a value ({'image': PerReplica...}) with an unsupported
  type (<class 'dict'>) to a Tensor"; a scalar with ``axis=0``: "Invalid reduction dimension 0 for input with 0
  dimensions"). :func:`make_strategy` returns a subclass whose ``reduce`` maps over the structure and reduces
  scalars with ``axis=None``.
* A model that computes its own loss (``compute_loss``, as ShaSpec's do) gets no per-replica scaling from Keras,
  while gradients are summed over replicas: :func:`scale_loss_per_replica` divides it by the number of replicas, so
  one step is the step of the global batch (Keras' loss tracker multiplies it back for the logs).
* ``fit`` iterates a distributed dataset twice (once to build the model, then to train), and a seeded
  ``shuffle`` reshuffles on every new iterator: :func:`distributable` rebuilds the pipeline for each iterator, so
  training reads exactly the batches a single-worker run reads, and shards it by data (each worker computes the
  global batch and keeps its replicas' part: the records need not be split into as many files as there are workers).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

STRATEGIES = ("default", "mirrored", "multi_worker")


def cluster(environ=None) -> dict:
    """``{"workers", "type", "index", "chief"}`` from ``TF_CONFIG`` (one worker, the chief, when it is unset);
    a one-line ``ValueError`` for a ``TF_CONFIG`` that is not a training cluster this trainer can run in."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        return {"workers": 1, "type": None, "index": 0, "chief": True}
    try:
        spec = json.loads(raw)
        roles = spec.get("cluster") or {}
        task = spec.get("task") or {}
        kind, index = task.get("type"), int(task.get("index", 0))
        workers = len(roles.get("chief") or []) + len(roles.get("worker") or [])
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"TF_CONFIG is not a cluster description ({type(error).__name__}: {error})") from None
    if roles.get("ps") or kind in ("ps", "evaluator"):
        raise ValueError(f"TF_CONFIG describes a {'parameter-server' if roles.get('ps') else kind} task: shaspec "
                         f"train runs synchronous data-parallel workers only (chief + worker tasks)")
    chief = kind == "chief" or (kind in ("worker", None) and index == 0 and not roles.get("chief"))
    return {"workers": max(workers, 1), "type": kind, "index": index, "chief": chief}


def is_chief(environ=None) -> bool:
    """Whether this process writes the run's outputs (always, outside a multi-worker cluster)."""
    return cluster(environ)["chief"]


_MULTI_WORKER_CLASS = None


def _multi_worker_class():
    global _MULTI_WORKER_CLASS
    if _MULTI_WORKER_CLASS is None:
        import tensorflow as tf

        class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
            """``reduce`` over nested structures, scalars without an axis (what Keras 3's ``fit`` asks of it)."""

            def reduce(self, reduce_op, value, axis):
                def one(v):
                    local = self.experimental_local_results(v)[0]
                    rank = getattr(getattr(local, "shape", None), "rank", None)
                    return super(MultiWorkerMirroredStrategy, self).reduce(reduce_op, v, None if rank == 0 else axis)

                return tf.nest.map_structure(one, value)

        _MULTI_WORKER_CLASS = MultiWorkerMirroredStrategy
    return _MULTI_WORKER_CLASS


def make_strategy(name: str, notice: Optional[Callable[[str], None]] = None):
    """The ``tf.distribute`` strategy for ``--strategy name``: ``multi_worker`` whenever ``TF_CONFIG`` describes more
    than one task (with a notice when another one was asked for)."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    here = cluster()
    if here["workers"] > 1 and name != "multi_worker":
        if notice is not None:
            notice(f"shaspec train: TF_CONFIG describes {here['workers']} workers: training with the multi_worker "
                   f"strategy instead of {name}")
        name = "multi_worker"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return _multi_worker_class()()


def replicas(strategy) -> int:
    return int(strategy.num_replicas_in_sync)


def scale_loss_per_replica(model, count: int) -> None:
    """Make ``model.compute_loss`` return its loss divided by ``count`` (the replicas in sync): the optimiser sums
    the replicas' gradients, so a step then follows the gradient of the global batch's mean loss."""
    import keras

    compute = model.compute_loss
    factor = 1.0 / count

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        total = compute(x, y, y_pred, sample_weight, training=training)
        return keras.ops.multiply(total, keras.ops.cast(factor, total.dtype))

    model.compute_loss = compute_loss


def distributable(make_dataset: Callable[[], object]):
    """The dataset ``make_dataset()`` builds, rebuilt for every iterator (so a second iterator reads the same batches
    as the first) and sharded by data (each worker keeps its replicas' part of every global batch)."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensors(0).flat_map(lambda _: make_dataset())
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.with_options(options)


def check_same_everywhere(strategy, value: int, what: str) -> None:
    """Raise a one-line ``ValueError`` unless every worker of ``strategy`` has the same integer ``value`` (e.g. the
    step it resumes from: workers that see different checkpoints would otherwise train different models). A
    collective: every worker must call it."""
    import tensorflow as tf

    @tf.function
    def gather():
        def step():
            v = tf.constant(float(value), tf.float32)
            return tf.distribute.get_replica_context().all_reduce("SUM", tf.stack([v, v * v, 1.0]))

        return strategy.run(step)

    total, squares, count = [float(x) for x in strategy.experimental_local_results(gather())[0].numpy()]
    if abs(squares * count - total * total) > 1e-3 * max(1.0, squares * count):
        raise ValueError(f"the workers disagree on {what} (this one: {value}, mean over {int(count)} replicas: "
                         f"{total / count:g}): the run folder must be storage every worker sees (gs://...)")
