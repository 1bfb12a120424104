"""Helpers shared by the benchmark harness (``train_step_benchmark.py``) and its workers: timing summaries, memory
figures, toy data, the tiles of a whole volume, and the data-loading worker. NumPy and the standard library only
at import (the official PyTorch worker may run in an interpreter without Keras or TensorFlow)."""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BLOCK_TF_ENV = "SHASPEC_BENCH_BLOCK_TF"  # "1": make `import tensorflow` fail, as on the GPU host


# ----------------------------------------------------------------------------------------------------------------
# Small helpers (NumPy and the standard library only: the official worker may run in an interpreter without Keras)
# ----------------------------------------------------------------------------------------------------------------
def block_tensorflow():
    """Make ``import tensorflow`` raise ModuleNotFoundError, as in an environment without TensorFlow."""
    import importlib.abc

    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r} ({BLOCK_TF_ENV}=1)", name=name)
            return None

    sys.meta_path.insert(0, _Blocker())


def summarize(times) -> dict:
    times = [float(t) for t in times]
    if not times:
        return {"n": 0}
    return {"n": len(times), "median_s": float(np.median(times)), "min_s": min(times), "max_s": max(times),
            "mean_s": float(np.mean(times)), "times_s": [round(t, 6) for t in times]}


def tile_starts(volume, roi, overlap) -> list:
    """The window corners ``(d, h, w)`` of a whole volume, from ``shaspec_tf.inference.window_starts`` (the one
    definition of the rule). The driver computes them and hands them to the workers in the spec (``tile_starts``),
    so the official worker, which may run in an interpreter without this package's dependencies, needs no copy."""
    import itertools

    sys.path.insert(0, REPO)
    from shaspec_tf.inference.window import window_starts

    return [list(t) for t in itertools.product(*(window_starts(v, r, overlap) for v, r in zip(volume, roi)))]


def random_masks(rng: np.random.Generator, batch: int, m: int = 4) -> np.ndarray:
    """Per sample, ``k ~ U{1..m}`` modalities chosen at random (the official ``mode='random'`` law)."""
    masks = np.zeros((batch, m), np.float32)
    for b in range(batch):
        masks[b, rng.choice(m, size=int(rng.integers(1, m + 1)), replace=False)] = 1.0
    return masks


def max_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kilobytes


def memory_entry(value, kind: str) -> dict:
    return {"bytes": int(value), "gib": round(int(value) / 2 ** 30, 4), "kind": kind}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def toy_data(crop, batch: int, seed: int):
    """``images [B, D, H, W, 4]``, ``regions [B, D, H, W, 3]`` (float32) of the toy generator."""
    sys.path.insert(0, REPO)
    from shaspec_tf.data.toy import toy_batch

    return toy_batch(np.random.default_rng(seed), batch, tuple(crop))



# ----------------------------------------------------------------------------------------------------------------
# Data loading, apart from the model
# ----------------------------------------------------------------------------------------------------------------
def _tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def data_loading(spec) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, REPO)
    crop, batch, n = tuple(spec["crop"]), spec["batch"], spec["data_batches"]
    case_shape = tuple(max(c, s) for c, s in zip(crop, spec["data_case_shape"]))
    from shaspec_tf.data.toy import regions_from_labels, toy_case

    rng = np.random.default_rng(spec["seed"])
    cases = [toy_case(rng, case_shape) for _ in range(spec["data_cases"])]
    source = spec["data_source"]
    if source == "auto":
        source = "tfdata" if _tensorflow_available() else "numpy"
    times = []
    if source == "tfdata":
        import tensorflow as tf

        from shaspec_tf.data.input import brats_dataset
        from shaspec_tf.data.schema import BratsRecord, brats_example

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "train-00000-of-00001.tfrecord")
            with tf.io.TFRecordWriter(path) as writer:
                for i, (image, labels) in enumerate(cases):
                    record = BratsRecord(f"toy{i}", image, np.ones(4, np.int64), labels)
                    writer.write(brats_example(record).SerializeToString())
            iterator = iter(brats_dataset(path, batch_size=batch, crop_size=crop, seed=spec["seed"]))
            start = time.perf_counter()
            next(iterator)
            first = time.perf_counter() - start
            for _ in range(n):
                start = time.perf_counter()
                inputs, regions = next(iterator)
                _ = inputs["image"].numpy(), regions.numpy()
                times.append(time.perf_counter() - start)
        detail = ("shaspec_tf.data.input.brats_dataset (TFRecords of toy cases: parse, crop, augmentation, "
                  "modality dropout; tf.data pulled in a tight loop)")
    else:
        regions = [regions_from_labels(labels) for _, labels in cases]

        def produce(i):
            images, targets = [], []
            for b in range(batch):
                c = int(rng.integers(len(cases)))
                start = [int(rng.integers(0, s - k + 1)) for s, k in zip(case_shape, crop)]
                sl = tuple(slice(s, s + k) for s, k in zip(start, crop))
                image, target = cases[c][0][sl], regions[c][sl]
                for axis in range(3):
                    if rng.random() < 0.5:
                        image, target = np.flip(image, axis), np.flip(target, axis)
                mask = random_masks(rng, 1)[0]
                images.append(image * mask)
                targets.append(target)
            return np.ascontiguousarray(np.stack(images)), np.ascontiguousarray(np.stack(targets))

        start = time.perf_counter()
        produce(0)
        first = time.perf_counter() - start
        for i in range(n):
            start = time.perf_counter()
            produce(i + 1)
            times.append(time.perf_counter() - start)
        detail = "NumPy stand-in (TensorFlow not importable): random crop, flips, modality dropout of in-memory cases"
    s = summarize(times)
    return dict({"source": source, "detail": detail, "crop": list(crop), "batch": batch,
                 "case_shape": list(case_shape), "cases": len(cases), "first_batch_s": first,
                 "batches_per_s": (1.0 / s["median_s"]) if s.get("median_s") else None}, **s)


