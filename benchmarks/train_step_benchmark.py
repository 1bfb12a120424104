"""Training-step, memory, whole-volume inference and data-loading benchmark of the ShaSpec segmenter, optionally side
by side with the official PyTorch ``DualNet_SS`` on the same device (GitHub issue 7).

    KERAS_BACKEND=jax python benchmarks/train_step_benchmark.py [--preset paper] [--crop 80,160,160] [--batch 1]
        [--steps 10] [--warmup 3] [--random-steps 10] [--jit | --no-jit] [--precision fp32[,bf16]]
        [--volume 155,240,240] [--overlap 0.3333] [--sw-batch-size 4] [--infer-reps 3]
        [--official DIR [--official-python PY] [--official-parity]] [--skip infer,data,random]
        [--out report.json]

Every measurement runs in its own subprocess (this file with ``--worker``), so that the peak memory of one is not
inherited by the next, and so that JAX and PyTorch never hold the same GPU at once. A measurement that fails or
passes ``--timeout`` is reported as ``{"error": ...}`` and the rest go on; the JSON report is rewritten after each.

What is measured (``ours`` = this package on the Keras backend ``--backend``, default ``$KERAS_BACKEND``):

* ``train``: ``model.train_on_batch`` (the model computes the full ShaSpec loss itself) with SGD, Nesterov momentum
  0.99, learning rate 1e-2; ``--warmup`` steps (the first one includes tracing / XLA compilation, reported as
  ``first_step_s``), then ``--steps`` timed steps with every modality present (``all_modalities``), then
  ``--random-steps`` timed steps with a random non-empty modality subset per sample (``random_modalities``; the
  official law: k ~ U{1..4} modalities). Each step's time ends when its loss is on the host, so it is synchronous.
  ``losses`` and ``all_finite`` cover every step of both runs. Data are a toy volume (``shaspec_tf.data.toy``)
  held in host memory and passed per step, so ours includes the host-to-device copy of the batch (as ``fit`` does).
* ``peak_memory``: JAX on GPU: ``memory_stats()["peak_bytes_in_use"]``; TensorFlow on GPU:
  ``get_memory_info()["peak"]``; PyTorch on CUDA: ``max_memory_allocated``; on a CPU the process' maximum resident
  set size (``kind`` says which).
* ``infer``: whole-volume sliding-window prediction, ROI = crop, ``--overlap``, ``--sw-batch-size`` windows per
  forward pass; ours is ``shaspec_tf.inference.sliding_window_predict`` (Gaussian blending, compiled with the
  model: one ``jax.jit`` / ``tf.function`` per volume), the official one a plain average of sigmoids on the device
  (as the official evaluation), over the same tiles (``tile_starts``, computed once by the driver with our rule).
  ``first_s`` includes compilation; then ``--infer-reps`` timed volumes.
* ``data``: batch production timed apart from the model: ``tfdata`` = ``shaspec_tf.data.input.brats_dataset`` over
  TFRecords of toy cases (``--data-case-shape``) written to a temporary folder, when TensorFlow is importable;
  otherwise ``numpy`` = random crop, flips and modality dropout of in-memory toy cases in NumPy (``source`` says
  which). ``first_batch_s`` is the pipeline's start-up, then per-batch times over ``--data-batches`` batches.
* ``official`` (with ``--official DIR``, a checkout of github.com/billhhh/ShaSpec; needs torch in
  ``--official-python``, default this interpreter): the paper-size ``DualNet_SS`` (IN, LeakyReLU, weight
  standardisation) trained the same way with the official loss (``loss_Dual`` Dice + BCE, 0.1 L1 alignment,
  0.02 domain cross-entropy; ``mode='0,1,2,3'`` then ``mode='random'``), fp32 and ``torch.autocast`` bf16.
  ``ratios`` (ours / official, > 1 = ours slower) are printed last; ``architecture_match`` says whether ours is the
  paper preset.

JSON keys: ``schema``, ``argv``, ``backend``, ``config``, ``host``, ``ours`` -> precision -> ``train`` / ``infer``,
``data``, ``official`` -> precision -> ``train`` / ``infer``, ``ratios`` -> precision -> ``train_step`` /
``train_step_random`` / ``whole_volume`` / ``peak_memory``. See ``TRAIN_KEYS`` / ``INFER_KEYS`` / ``DATA_KEYS``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCHEMA = 1
PRECISIONS = ("fp32", "bf16")
PRESET_CROPS = {"paper": [80, 160, 160], "small": [48, 96, 96], "tiny": [32, 64, 64]}  # presets' crop_size
TRAIN_KEYS = ("device", "params", "first_step_s", "warmup", "all_modalities", "random_modalities", "losses",
              "all_finite", "peak_memory")
INFER_KEYS = ("device", "volume", "roi", "overlap", "sw_batch_size", "tiles", "first_s", "reps", "median_s", "min_s",
              "max_s", "peak_memory")
DATA_KEYS = ("source", "crop", "batch", "case_shape", "first_batch_s", "median_s", "min_s", "max_s", "n",
             "batches_per_s")
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
# Ours (Keras)
# ----------------------------------------------------------------------------------------------------------------
def _keras_setup(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, REPO)
    import keras

    keras.utils.set_random_seed(spec["seed"])
    keras.config.set_dtype_policy("mixed_bfloat16" if spec["precision"] == "bf16" else "float32")
    return keras


def _keras_device(keras) -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {getattr(d, 'device_kind', d)}" if d.platform != "cpu" else cpu_name()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return "gpu: " + tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
        return cpu_name()
    return cpu_name()


def _keras_peak_memory(keras) -> dict:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        if d.platform != "cpu":
            stats = d.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                return memory_entry(stats["peak_bytes_in_use"], "device_peak_bytes_in_use")
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return memory_entry(tf.config.experimental.get_memory_info("GPU:0")["peak"], "device_peak")
    return memory_entry(max_rss_bytes(), "process_max_rss")


def _build_ours(keras, spec):
    import shaspec_tf

    overrides = dict(spec.get("overrides") or {})
    if spec.get("official_parity"):
        overrides["official_parity"] = True
    return shaspec_tf.build_segmenter(spec["preset"], **overrides)


def ours_train(spec) -> dict:
    keras = _keras_setup(spec)
    from shaspec_tf.training.schedules import make_optimizer

    model = _build_ours(keras, spec)
    model.compile(optimizer=make_optimizer("sgd", spec["lr"]), jit_compile=spec["jit"])
    images, regions = toy_data(spec["crop"], spec["batch"], spec["seed"])
    ones = np.ones((spec["batch"], len(model.modalities)), np.float32)
    rng = np.random.default_rng(spec["seed"])
    losses = []

    def step(mask):
        model.reset_metrics()  # so that "loss" is this step's loss, not a running mean
        start = time.perf_counter()
        logs = model.train_on_batch({"image": images, "modality_mask": mask}, regions, return_dict=True)
        elapsed = time.perf_counter() - start  # logs are NumPy values: the step has finished
        losses.append(float(logs["loss"]))
        return elapsed

    warm = [step(ones) for _ in range(max(1, spec["warmup"]))]
    timed = [step(ones) for _ in range(spec["steps"])]
    masks = [random_masks(rng, spec["batch"], len(model.modalities)) for _ in range(spec["random_steps"])]
    random_timed = [step(mask) for mask in masks]
    return {"device": _keras_device(keras), "backend": keras.backend.backend(), "keras": keras.__version__,
            "params": int(model.count_params()), "jit": spec["jit"], "precision": spec["precision"],
            "dtype_policy": keras.config.dtype_policy().name, "first_step_s": warm[0], "warmup": summarize(warm),
            "all_modalities": summarize(timed),
            "random_modalities": dict(summarize(random_timed), masks=[m.astype(int).tolist() for m in masks]),
            "losses": losses, "all_finite": bool(np.all(np.isfinite(losses))),
            "peak_memory": _keras_peak_memory(keras)}


def ours_infer(spec) -> dict:
    keras = _keras_setup(spec)
    from shaspec_tf.inference import sliding_window_predict

    model = _build_ours(keras, spec)
    model.compile(jit_compile=spec["jit"])
    volume, roi = tuple(spec["volume"]), tuple(spec["crop"])
    image = toy_data(volume, 1, spec["seed"])[0][0]
    mask = np.ones(len(model.modalities), np.float32)

    def run():
        start = time.perf_counter()
        prob = sliding_window_predict(model, image, mask, roi_size=roi, overlap=spec["overlap"],
                                      sw_batch_size=spec["sw_batch_size"])
        return time.perf_counter() - start, prob

    first, prob = run()
    times = [run()[0] for _ in range(spec["infer_reps"])]
    return dict({"device": _keras_device(keras), "backend": keras.backend.backend(), "jit": spec["jit"],
                 "precision": spec["precision"], "volume": list(volume), "roi": list(roi),
                 "overlap": spec["overlap"], "sw_batch_size": spec["sw_batch_size"],
                 "tiles": len(spec["tile_starts"]), "blending": "gaussian, device (compiled with the model)",
                 "first_s": first, "reps": len(times), "output_finite": bool(np.all(np.isfinite(prob))),
                 "peak_memory": _keras_peak_memory(keras)},
                **{k: v for k, v in summarize(times).items() if k != "n"})


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


# ----------------------------------------------------------------------------------------------------------------
# The official PyTorch model
# ----------------------------------------------------------------------------------------------------------------
def _official_setup(spec):
    import importlib.machinery
    import types

    import torch

    try:  # before the stand-ins below: torch._dynamo looks up the specs of optional modules when it loads
        import torch._dynamo  # noqa: F401
    except Exception:  # noqa: BLE001 - older torch
        pass

    # Imported at module level by the official files but not used here: stand-ins where they are not installed.
    for name in ("sklearn", "sklearn.manifold", "matplotlib", "matplotlib.pyplot", "scipy", "scipy.ndimage"):
        try:
            __import__(name)
        except ImportError:
            module = sys.modules[name] = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
            if name == "sklearn.manifold":
                module.TSNE = object
    import torch.nn.functional as F

    for name in ("_verify_spatial_size", "_verify_batch_size"):  # instance norm on the 1x1x1 ASPP image pool
        if hasattr(F, name):
            setattr(F, name, lambda *a, **k: None)
    sys.path.insert(0, os.path.abspath(spec["official"]))
    import random

    random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    from DualNet_SS import DualNet_SS

    model = DualNet_SS(types.SimpleNamespace(input_size=",".join(map(str, spec["crop"]))), norm_cfg="IN",
                       activation_cfg="LeakyReLU", num_classes=3, weight_std=True).to(device)
    return torch, device, model


def _torch_sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def _torch_device_name(torch, device) -> str:
    return f"cuda: {torch.cuda.get_device_name(0)}" if device == "cuda" else cpu_name()


def _torch_peak_memory(torch, device) -> dict:
    if device == "cuda":
        return memory_entry(torch.cuda.max_memory_allocated(), "device_max_memory_allocated")
    return memory_entry(max_rss_bytes(), "process_max_rss")


def official_train(spec) -> dict:
    torch, device, model = _official_setup(spec)
    import loss_Dual

    model.train()
    opt = torch.optim.SGD(model.parameters(), spec["lr"], momentum=0.99, nesterov=True)
    images, regions = toy_data(spec["crop"], spec["batch"], spec["seed"])
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 4, 1, 2, 3))).to(device)
    y = torch.from_numpy(np.ascontiguousarray(regions.transpose(0, 4, 1, 2, 3))).to(device)
    dice, bce, l1, ce = loss_Dual.DiceLoss4BraTS(), loss_Dual.BCELoss4BraTS(), torch.nn.L1Loss(), \
        torch.nn.CrossEntropyLoss()
    amp = spec["precision"] == "bf16"
    n, c = x.shape[:2]
    domain_labels = torch.arange(c, device=device).repeat(n)
    losses, modes = [], []

    def step(mode):
        _torch_sync(torch, device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            pred, shared, spec_logits, mode_split = model(x, mode=mode)
            s = shared
            alignment = l1(s[0::c], s[1::c]) + l1(s[1::c], s[2::c]) + l1(s[2::c], s[3::c]) + l1(s[3::c], s[0::c])
            loss = (dice(pred, y) + bce(pred, y) + 0.1 * alignment
                    + 0.02 * ce(spec_logits.float().reshape(n * c, -1), domain_labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss)  # synchronises
        _torch_sync(torch, device)
        losses.append(value)
        modes.append(sorted(int(m) for m in mode_split))
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = [step("0,1,2,3") for _ in range(max(1, spec["warmup"]))]
    timed = [step("0,1,2,3") for _ in range(spec["steps"])]
    random_timed = [step("random") for _ in range(spec["random_steps"])]
    return {"device": _torch_device_name(torch, device), "torch": torch.__version__,
            "params": int(sum(p.numel() for p in model.parameters())), "precision": spec["precision"],
            "first_step_s": warm[0], "warmup": summarize(warm), "all_modalities": summarize(timed),
            "random_modalities": dict(summarize(random_timed), modes=modes[len(warm) + len(timed):]),
            "losses": losses, "all_finite": bool(np.all(np.isfinite(losses))),
            "peak_memory": _torch_peak_memory(torch, device)}


def official_infer(spec) -> dict:
    torch, device, model = _official_setup(spec)
    model.eval()
    volume, roi = tuple(spec["volume"]), tuple(spec["crop"])
    padded = tuple(max(v, r) for v, r in zip(volume, roi))
    image = toy_data(volume, 1, spec["seed"])[0]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 4, 1, 2, 3))).to(device)
    if padded != volume:
        x = torch.nn.functional.pad(x, [p for v, q in zip(volume[::-1], padded[::-1]) for p in (0, q - v)])
    starts = [tuple(start) for start in spec["tile_starts"]]
    amp, k = spec["precision"] == "bf16", spec["sw_batch_size"]

    def run():
        _torch_sync(torch, device)
        start = time.perf_counter()
        full = torch.zeros((1, 3) + padded, device=device)
        count = torch.zeros((1, 1) + padded, device=device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            for first in range(0, len(starts), k):
                batch = starts[first:first + k]
                slices = [(slice(None), slice(None)) + tuple(slice(s, s + r) for s, r in zip(st, roi)) for st in batch]
                tiles = torch.cat([x[sl] for sl in slices])
                pred = model(tiles, val=True, mode="0,1,2,3")[0]
                prob = torch.sigmoid(pred.float())
                for i, sl in enumerate(slices):
                    full[sl] += prob[i:i + 1]
                    count[sl] += 1
        out = (full / count)[(slice(None), slice(None)) + tuple(slice(0, v) for v in volume)]
        finite = bool(torch.isfinite(out).all())
        _torch_sync(torch, device)
        return time.perf_counter() - start, finite

    first, finite = run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [run()[0] for _ in range(spec["infer_reps"])]
    return dict({"device": _torch_device_name(torch, device), "torch": torch.__version__,
                 "precision": spec["precision"], "volume": list(volume), "roi": list(roi),
                 "overlap": spec["overlap"], "sw_batch_size": k, "tiles": len(starts),
                 "blending": "uniform average, device", "first_s": first, "reps": len(times),
                 "output_finite": finite, "peak_memory": _torch_peak_memory(torch, device)},
                **{key: v for key, v in summarize(times).items() if key != "n"})


WORKERS = {"ours_train": ours_train, "ours_infer": ours_infer, "data": data_loading,
           "official_train": official_train, "official_infer": official_infer}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def run_worker(name: str, spec: dict, python: str, env: dict, timeout: float, in_process: bool = False) -> dict:
    start = time.time()
    if in_process:
        try:
            result = WORKERS[name](spec)
        except Exception as err:  # noqa: BLE001 - reported, the other measurements go on
            result = {"error": repr(err)[:2000]}
        result["wall_s"] = time.time() - start
        return result
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python, os.path.abspath(__file__), "--worker", name, "--spec", json.dumps(spec), "--worker-out", out]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr or b"")[-1500:]
            return {"error": f"timed out after {timeout:.0f} s",
                    "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
                    "wall_s": time.time() - start}
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"worker exited with {proc.returncode}", "stderr_tail": proc.stderr[-3000:],
                    "wall_s": time.time() - start}
        with open(out) as f:
            result = json.load(f)
    result["wall_s"] = time.time() - start
    return result


def _triple(text: str) -> list:
    values = [int(v) for v in text.replace("x", ",").split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected D,H,W, got {text!r}")
    return values


def _ratio(a, b):
    try:
        return float(a) / float(b) if a is not None and b else None
    except (TypeError, ValueError):
        return None


def compute_ratios(report: dict) -> dict:
    ratios = {}
    for precision, theirs in report.get("official", {}).items():
        ours = report.get("ours", {}).get(precision, {})
        o_tr, t_tr = ours.get("train", {}), theirs.get("train", {})
        o_in, t_in = ours.get("infer", {}), theirs.get("infer", {})
        ratios[precision] = {
            "train_step": _ratio(o_tr.get("all_modalities", {}).get("median_s"),
                                 t_tr.get("all_modalities", {}).get("median_s")),
            "train_step_random": _ratio(o_tr.get("random_modalities", {}).get("median_s"),
                                        t_tr.get("random_modalities", {}).get("median_s")),
            "whole_volume": _ratio(o_in.get("median_s"), t_in.get("median_s")),
            "peak_memory": _ratio(o_tr.get("peak_memory", {}).get("bytes"), t_tr.get("peak_memory", {}).get("bytes")),
            "peak_memory_kind": [o_tr.get("peak_memory", {}).get("kind"), t_tr.get("peak_memory", {}).get("kind")],
            "architecture_match": report["config"]["preset"] == "paper",
        }
    return ratios


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(report: dict) -> list:
    lines = [f"backend {report['backend']}, preset {report['config']['preset']}, crop "
             f"{'x'.join(map(str, report['config']['crop']))}, batch {report['config']['batch']}, jit "
             f"{report['config']['jit']}"]
    header = (f"{'model':9} {'prec':5} {'device':40} {'step med':>9} {'min':>7} {'max':>7} {'rand med':>9} "
              f"{'finite':>6} {'peak GiB':>9} {'volume s':>9} {'tiles':>5}")
    lines.append(header)
    for who in ("ours", "official"):
        for precision, entry in report.get(who, {}).items():
            tr, inf = entry.get("train", {}), entry.get("infer", {})
            if "error" in tr and "error" in inf:
                lines.append(f"{who:9} {precision:5} error: {tr['error'][:80]}")
                continue
            al, rd = tr.get("all_modalities", {}), tr.get("random_modalities", {})
            peak = tr.get("peak_memory", {})
            lines.append(f"{who:9} {precision:5} {str(tr.get('device', inf.get('device', '?')))[:40]:40} "
                         f"{_fmt(al.get('median_s')):>9} {_fmt(al.get('min_s')):>7} {_fmt(al.get('max_s')):>7} "
                         f"{_fmt(rd.get('median_s')):>9} {str(tr.get('all_finite', '-')):>6} "
                         f"{_fmt(peak.get('gib'), 2):>9}{'*' if peak.get('kind') == 'process_max_rss' else ' '}"
                         f"{_fmt(inf.get('median_s')):>9} {str(inf.get('tiles', '-')):>5}")
            for part in ("train", "infer"):
                if "error" in entry.get(part, {}):
                    lines.append(f"    {part} error: {entry[part]['error'][:200]}")
    data = report.get("data")
    if data:
        if "error" in data:
            lines.append(f"data: error {data['error'][:200]}")
        else:
            lines.append(f"data ({data['source']}): {_fmt(data.get('median_s'), 4)} s/batch median, "
                         f"{_fmt(data.get('batches_per_s'), 1)} batches/s, first batch {_fmt(data['first_batch_s'])} s")
    if any(e.get("train", {}).get("peak_memory", {}).get("kind") == "process_max_rss"
           for who in ("ours", "official") for e in report.get(who, {}).values()):
        lines.append("* peak memory is the process' maximum resident set size (CPU), not device memory")
    for precision, r in report.get("ratios", {}).items():
        lines.append(f"ours/official {precision}: train step {_fmt(r['train_step'], 2)}x, random-modality step "
                     f"{_fmt(r['train_step_random'], 2)}x, whole volume {_fmt(r['whole_volume'], 2)}x, peak memory "
                     f"{_fmt(r['peak_memory'], 2)}x" + ("" if r["architecture_match"] else
                                                        " (ours is not the paper preset: not like for like)"))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        choices=("tensorflow", "jax"), help="Keras backend of ours (default: $KERAS_BACKEND)")
    parser.add_argument("--preset", default="paper", choices=("paper", "small", "tiny"))
    parser.add_argument("--crop", type=_triple, default=None, help="D,H,W (default: the preset's crop_size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, every modality present")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1; the first compiles)")
    parser.add_argument("--random-steps", type=int, default=None, help="timed steps with random masks (= --steps)")
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True, help="XLA (jit_compile)")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp32,bf16")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--official-parity", action="store_true", help="ours with official_parity=True")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                        help="a build_segmenter option, e.g. --override weight_std=false")
    parser.add_argument("--volume", type=_triple, default=[155, 240, 240], help="whole volume D,H,W")
    parser.add_argument("--overlap", type=float, default=1 / 3)
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--infer-reps", type=int, default=3)
    parser.add_argument("--data-source", default="auto", choices=("auto", "tfdata", "numpy"))
    parser.add_argument("--data-batches", type=int, default=10)
    parser.add_argument("--data-cases", type=int, default=2)
    parser.add_argument("--data-case-shape", type=_triple, default=None, help="toy case D,H,W (default --volume)")
    parser.add_argument("--skip", default="", help="comma list of: train, random, infer, data, ours")
    parser.add_argument("--official", metavar="DIR", help="a checkout of the official ShaSpec code")
    parser.add_argument("--official-python", default=sys.executable, help="interpreter with torch (default: this)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--deadline", type=float, default=None,
                        help="Unix time after which no measurement starts (and none runs past it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (tests; peak memory shared)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one measurement, in this (sub)process
        result = WORKERS[args.worker](json.loads(args.spec))
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return result

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"train", "random", "infer", "data", "ours"}
    if unknown:
        parser.error(f"unknown --skip entries {sorted(unknown)}")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precision must be a comma list of {PRECISIONS}, got {args.precision!r}")
    crop = args.crop or PRESET_CROPS[args.preset]
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    spec = {"preset": args.preset, "crop": crop, "batch": args.batch, "steps": args.steps,
            "warmup": max(1, args.warmup), "random_steps": 0 if "random" in skip else (
                args.steps if args.random_steps is None else args.random_steps),
            "jit": args.jit, "lr": args.lr, "seed": args.seed, "official_parity": args.official_parity,
            "overrides": overrides, "volume": args.volume, "overlap": args.overlap,
            "sw_batch_size": args.sw_batch_size, "infer_reps": args.infer_reps, "data_source": args.data_source,
            "data_batches": args.data_batches, "data_cases": args.data_cases,
            "data_case_shape": args.data_case_shape or args.volume,
            "official": os.path.abspath(args.official) if args.official else None,
            "tile_starts": tile_starts(args.volume, crop, args.overlap)}
    env = dict(os.environ, KERAS_BACKEND=args.backend, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    report = {"schema": SCHEMA, "argv": sys.argv[1:] if argv is None else list(argv), "backend": args.backend,
              "config": {k: v for k, v in spec.items() if k not in ("official", "tile_starts")} | {
                  "precisions": precisions, "official": spec["official"], "skip": sorted(skip)},
              "host": {"node": platform.node(), "python": platform.python_version(), "cpu": cpu_name(),
                       "tensorflow_blocked": os.environ.get(BLOCK_TF_ENV) == "1"},
              "ours": {}, "official": {}}

    def save():
        report["ratios"] = compute_ratios(report)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)

    def measure(section, precision, part, worker, python=sys.executable):
        print(f"[{section} {precision} {part}] ...", flush=True)
        timeout = args.timeout
        if args.deadline is not None:
            timeout = min(timeout, args.deadline - time.time())
        if timeout < 30:
            result = {"error": f"skipped: {timeout:.0f} s left before --deadline"}
        else:
            result = run_worker(worker, dict(spec, precision=precision), python, env, timeout, args.in_process)
        report[section].setdefault(precision, {})[part] = result
        brief = {k: result.get(k) for k in ("error", "first_step_s", "first_s", "tiles", "wall_s") if k in result}
        if "all_modalities" in result:
            brief["median_s"] = result["all_modalities"].get("median_s")
            brief["random_median_s"] = result["random_modalities"].get("median_s")
            brief["all_finite"] = result["all_finite"]
        elif "median_s" in result:
            brief["median_s"] = result["median_s"]
        print(f"[{section} {precision} {part}] {json.dumps(brief)}", flush=True)
        save()

    if spec["official"]:  # first, so that a GPU starts clean for it (each one is its own process anyway)
        ok = subprocess.run([args.official_python, "-c", "import torch"], capture_output=True).returncode == 0
        if not ok:
            report["official_error"] = f"torch is not importable by {args.official_python}"
            print(report["official_error"], flush=True)
        else:
            for precision in precisions:
                if "train" not in skip:
                    measure("official", precision, "train", "official_train", args.official_python)
                if "infer" not in skip:
                    measure("official", precision, "infer", "official_infer", args.official_python)
    if "ours" not in skip:
        for precision in precisions:
            if "train" not in skip:
                measure("ours", precision, "train", "ours_train")
            if "infer" not in skip:
                measure("ours", precision, "infer", "ours_infer")
    if "data" not in skip:
        print("[data] ...", flush=True)
        timeout = args.timeout if args.deadline is None else min(args.timeout, args.deadline - time.time())
        report["data"] = (run_worker("data", dict(spec, precision="fp32"), sys.executable, env, timeout,
                                     args.in_process) if timeout >= 10 else {"error": "skipped: --deadline"})
        save()
    save()
    print("\n".join(summary_lines(report)), flush=True)
    return report


if __name__ == "__main__":
    if os.environ.get(BLOCK_TF_ENV) == "1":
        block_tensorflow()
    main()
