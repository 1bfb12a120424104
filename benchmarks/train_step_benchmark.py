"""Training-step, memory, whole-volume inference and data-loading benchmark of the ShaSpec segmenter, optionally side
by side with the official PyTorch ``DualNet_SS`` on the same device (GitHub issue 7).

    KERAS_BACKEND=jax python benchmarks/train_step_benchmark.py [--preset paper] [--crop 80,160,160] [--batch 1]
        [--steps 10] [--warmup 3] [--random-steps 10] [--jit | --no-jit] [--precision fp32[,bf16]]
        [--volume 155,240,240] [--overlap 0.3333] [--sw-batch-size 4] [--infer-reps 3] [--infer-forward]
        [--compile-cache DIR] [--remat none|encoders|all] [--official DIR [--official-python PY] [--official-parity]]
        [--skip infer,data,random] [--label NAME] [--out report.json]

Every measurement runs in its own subprocess (this file with ``--worker``), so that the peak memory of one is not
inherited by the next, and so that JAX and PyTorch never hold the same GPU at once. A measurement that fails or
passes ``--timeout`` is reported as ``{"error": ...}`` and the rest go on; the JSON report is rewritten after each.

What is measured (``ours`` = this package on the Keras backend ``--backend``, default ``$KERAS_BACKEND``):

* ``train``: ``model.train_on_batch`` (the model computes the full ShaSpec loss itself) with SGD, Nesterov momentum
  0.99, learning rate 1e-2; ``--warmup`` steps (the first one includes tracing / XLA compilation, reported as
  ``first_step_s``), then ``--steps`` timed steps with every modality present (``all_modalities``), then
  ``--random-steps`` timed steps with a random non-empty modality subset per sample (``random_modalities``; the
  official law: k ~ U{1..4} modalities). Each step's time ends when its loss is on the host, so it is synchronous.
  ``startup`` splits the way to the first step: ``import_s``, ``build_s``, ``first_step_s`` and
  ``to_first_step_s`` (from the worker's launch), and under JAX ``first_step_phases``: the first step's seconds of
  tracing, lowering, XLA compilation and cache loading as JAX reports them; with ``--compile-cache DIR`` ours keeps
  and loads its compiled programs there (``shaspec_tf.compile_cache``; ``cache_entries_before`` tells a cold run
  from a warm one).
  ``losses`` and ``all_finite`` cover every step of both runs. Data are a toy volume (``shaspec_tf.data.toy``)
  held in host memory and passed per step, so ours includes the host-to-device copy of the batch (as ``fit`` does).
* ``peak_memory``: JAX on GPU: ``memory_stats()["peak_bytes_in_use"]``; TensorFlow on GPU:
  ``get_memory_info()["peak"]``; PyTorch on CUDA: ``max_memory_allocated``; on a CPU the process' maximum resident
  set size (``kind`` says which).
* ``infer``: whole-volume sliding-window prediction, ROI = crop, ``--overlap``, ``--sw-batch-size`` windows per
  forward pass; ours is ``shaspec_tf.inference.sliding_window_predict`` (padding, tiles, logits-only forward,
  sigmoids, Gaussian blending and crop in one ``jax.jit`` / ``tf.function``; only the probabilities come back), the
  official one a plain average of sigmoids on the device (as the official evaluation), over the same tiles
  (``tile_starts``, computed once by the driver with our rule). ``first_s`` includes compilation; then
  ``--infer-reps`` timed volumes. ``--infer-forward`` adds ``forward``: the compiled forward pass alone on one batch
  of tiles, and ``per_volume_s``, its time for every batch of the volume (the model's share).
* ``data``: batch production timed apart from the model: ``tfdata`` = ``shaspec_tf.data.input.brats_dataset`` over
  TFRecords of toy cases (``--data-case-shape``) written to a temporary folder, when TensorFlow is importable;
  otherwise ``numpy`` = random crop, flips and modality dropout of in-memory toy cases in NumPy (``source`` says
  which). ``first_batch_s`` is the pipeline's start-up, then per-batch times over ``--data-batches`` batches.
* ``official`` (with ``--official DIR``, a checkout of github.com/billhhh/ShaSpec; needs torch in
  ``--official-python``, default this interpreter): the paper-size ``DualNet_SS`` (IN, LeakyReLU, weight
  standardisation) trained the same way with the official loss (``loss_Dual`` Dice + BCE, 0.1 L1 alignment,
  0.02 domain cross-entropy; ``mode='0,1,2,3'`` then ``mode='random'``), fp32 and ``torch.autocast`` bf16.
  ``ratios`` (ours / official, > 1 = ours slower) are printed last; ``architecture_match`` says whether ours is the
  paper preset. Without the code or torch the official entries say ``skipped: ...``.
* ``--remat encoders`` (or ``all``): ours built with that ``remat`` option (the encoders', or also the decoder's,
  activations recomputed in the backward pass: less memory, more time); the report's ``config.remat`` and each
  ours entry's ``remat`` say so. The official model is never rematerialised.

JSON keys: ``schema``, ``label``, ``argv``, ``backend``, ``config``, ``host``, ``card`` (the device the workers
named), ``ours`` -> precision -> ``train`` / ``infer``, ``data``, ``official`` -> precision -> ``train`` / ``infer``,
``ratios`` -> precision -> ``train_step`` / ``train_step_random`` / ``whole_volume`` / ``peak_memory``. See
``TRAIN_KEYS`` / ``INFER_KEYS`` / ``DATA_KEYS`` / ``STARTUP_KEYS`` (and ``JAX_PHASES``).
``benchmarks/bench_report.py`` merges several reports (the parts of ``benchmarks/gpu/run_gpu_benchmark.sh``) into one
summary.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, official_torch: run or imported

from bench_common import (BLOCK_TF_ENV, REPO, block_tensorflow, cpu_name, data_loading,  # noqa: E402,F401
                          max_rss_bytes, memory_entry, random_masks, summarize, tile_starts, toy_data)
from bench_report import _fmt, card_of, compute_ratios, summary_lines  # noqa: E402,F401
from official_torch import official_infer, official_train  # noqa: E402

SCHEMA = 2
PRECISIONS = ("fp32", "bf16")
PRESET_CROPS = {"paper": [80, 160, 160], "small": [48, 96, 96], "tiny": [32, 64, 64]}  # presets' crop_size
TRAIN_KEYS = ("device", "params", "first_step_s", "warmup", "all_modalities", "random_modalities", "losses",
              "all_finite", "peak_memory")
INFER_KEYS = ("device", "volume", "roi", "overlap", "sw_batch_size", "tiles", "first_s", "reps", "median_s", "min_s",
              "max_s", "peak_memory")
DATA_KEYS = ("source", "crop", "batch", "case_shape", "first_batch_s", "median_s", "min_s", "max_s", "n",
             "batches_per_s")
STARTUP_KEYS = ("compile_cache", "cache_entries_before", "import_s", "build_s", "first_step_s", "to_first_step_s")


# ----------------------------------------------------------------------------------------------------------------
# Ours (Keras)
# ----------------------------------------------------------------------------------------------------------------
def _cache_entries(folder) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder and os.path.isdir(folder) else 0


def _keras_setup(spec):
    """Keras with the run's dtype policy and seed; with ``spec["compile_cache"]``, the persistent compilation cache
    there first (``shaspec_tf.compile_cache``, before Keras imports the backend). Fills ``spec["_startup"]``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, REPO)
    start = time.perf_counter()
    folder = spec.get("compile_cache")
    startup = spec["_startup"] = {"compile_cache": folder, "cache_entries_before": _cache_entries(folder)}
    if folder:
        from shaspec_tf.compile_cache import enable_compile_cache

        enable_compile_cache(folder)
    import keras

    keras.utils.set_random_seed(spec["seed"])
    keras.config.set_dtype_policy("mixed_bfloat16" if spec["precision"] == "bf16" else "float32")
    startup["import_s"] = time.perf_counter() - start
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
    if spec.get("remat", "none") != "none":
        overrides["remat"] = spec["remat"]
    if spec.get("official_parity"):
        overrides["official_parity"] = True
    return shaspec_tf.build_segmenter(spec["preset"], **overrides)


# JAX's monitoring events of a compilation, by the name ``first_step_phases`` gives them
JAX_PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
              "/jax/core/compile/backend_compile_duration": "xla_compile_s",
              "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s"}


def jax_phase_seconds(keras):
    """A dict of the seconds JAX reports, from now on, for each phase of :data:`JAX_PHASES`: ``trace_s``, the longest
    tracing (a jitted function's tracing includes that of the jitted functions it calls, which report their own:
    the longest is the training step's, whole); ``lower_s``, ``xla_compile_s`` and ``cache_load_s``, sums over
    programs (lowering to StableHLO, XLA's compilation, loading from the persistent cache). ``None`` under another
    backend. Tracing and lowering happen in every process, cache or not: they bound a warm first step."""
    if keras.backend.backend() != "jax":
        return None
    import jax.monitoring

    phases = dict.fromkeys(JAX_PHASES.values(), 0.0)

    def listener(event, duration, *args, **kwargs):
        name = JAX_PHASES.get(event)
        if name == "trace_s":
            phases[name] = max(phases[name], float(duration))
        elif name:
            phases[name] += float(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return phases


def ours_train(spec) -> dict:
    keras = _keras_setup(spec)
    from shaspec_tf.training.schedules import make_optimizer

    start = time.perf_counter()
    model = _build_ours(keras, spec)
    model.compile(optimizer=make_optimizer("sgd", spec["lr"]), jit_compile=spec["jit"])
    images, regions = toy_data(spec["crop"], spec["batch"], spec["seed"])
    ones = np.ones((spec["batch"], len(model.modalities)), np.float32)
    rng = np.random.default_rng(spec["seed"])
    losses = []
    spec["_startup"]["build_s"] = time.perf_counter() - start

    def step(mask):
        model.reset_metrics()  # so that "loss" is this step's loss, not a running mean
        start = time.perf_counter()
        logs = model.train_on_batch({"image": images, "modality_mask": mask}, regions, return_dict=True)
        elapsed = time.perf_counter() - start  # logs are NumPy values: the step has finished
        losses.append(float(logs["loss"]))
        return elapsed

    phases = jax_phase_seconds(keras)
    warm = [step(ones)]
    # From the worker's launch (interpreter start, imports, model build, compilation or cache load, first step).
    startup = dict(spec["_startup"], first_step_s=warm[0],
                   to_first_step_s=time.time() - spec["launched_at"] if spec.get("launched_at") else None)
    if phases is not None:
        startup["first_step_phases"] = {k: round(v, 3) for k, v in phases.items()}
    warm += [step(ones) for _ in range(max(1, spec["warmup"]) - 1)]
    timed = [step(ones) for _ in range(spec["steps"])]
    masks = [random_masks(rng, spec["batch"], len(model.modalities)) for _ in range(spec["random_steps"])]
    random_timed = [step(mask) for mask in masks]
    return {"device": _keras_device(keras), "backend": keras.backend.backend(), "keras": keras.__version__,
            "params": int(model.count_params()), "jit": spec["jit"], "precision": spec["precision"],
            "remat": model.shaspec_config.get("remat", "none"),
            "dtype_policy": keras.config.dtype_policy().name, "first_step_s": warm[0], "startup": startup,
            "warmup": summarize(warm), "all_modalities": summarize(timed),
            "random_modalities": dict(summarize(random_timed), masks=[m.astype(int).tolist() for m in masks]),
            "losses": losses, "all_finite": bool(np.all(np.isfinite(losses))),
            "peak_memory": _keras_peak_memory(keras)}


def _forward_seconds(keras, model, roi, batch: int, reps: int) -> dict:
    """The compiled logits-only forward pass on one batch of ``batch`` tiles: the model's share of a volume."""
    tiles = np.zeros((batch,) + tuple(roi) + (len(model.modalities),), np.float32)
    masks = np.ones((batch, len(model.modalities)), np.float32)
    if keras.backend.backend() == "jax":
        import jax

        fn = jax.jit(lambda state, x, m: model.stateless_call(state[0], state[1], {"image": x, "modality_mask": m},
                                                              training=False)[0]["logits"])
        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
        call = lambda: fn(state, tiles, masks).block_until_ready()  # noqa: E731
    else:
        import tensorflow as tf

        fn = tf.function(lambda x, m: model({"image": x, "modality_mask": m}, training=False)["logits"])
        call = lambda: fn(tiles, masks).numpy()  # noqa: E731
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return dict({"batch": batch, "first_s": first}, **{k: v for k, v in summarize(times).items() if k != "n"})


def ours_infer(spec) -> dict:
    keras = _keras_setup(spec)
    from shaspec_tf.inference import sliding_window_predict

    start = time.perf_counter()
    model = _build_ours(keras, spec)
    spec["_startup"]["build_s"] = time.perf_counter() - start
    volume, roi = tuple(spec["volume"]), tuple(spec["crop"])
    image = toy_data(volume, 1, spec["seed"])[0][0]
    mask = np.ones(len(model.modalities), np.float32)
    tiles = len(spec["tile_starts"])

    def run():
        start = time.perf_counter()
        prob = sliding_window_predict(model, image, mask, roi_size=roi, overlap=spec["overlap"],
                                      sw_batch_size=spec["sw_batch_size"])
        return time.perf_counter() - start, prob  # prob is a NumPy array: the volume has finished

    first, prob = run()
    times = [run()[0] for _ in range(spec["infer_reps"])]
    result = dict({"device": _keras_device(keras), "backend": keras.backend.backend(), "jit": spec["jit"],
                   "precision": spec["precision"], "volume": list(volume), "roi": list(roi),
                   "overlap": spec["overlap"], "sw_batch_size": min(spec["sw_batch_size"], tiles), "tiles": tiles,
                   "blending": "gaussian, on the device: sliding_window_predict (one compiled function: padding, "
                               "tiles in batches, logits-only forward, sigmoid, blend, crop)",
                   "first_s": first, "startup": spec["_startup"], "reps": len(times),
                   "output_finite": bool(np.all(np.isfinite(prob))), "peak_memory": _keras_peak_memory(keras)},
                  **{k: v for k, v in summarize(times).items() if k != "n"})
    if spec.get("infer_forward"):  # the model's share: ceil(tiles / batch) forward passes
        forward = _forward_seconds(keras, model, roi, result["sw_batch_size"], spec["infer_reps"])
        forward["per_volume_s"] = forward["median_s"] * -(-tiles // result["sw_batch_size"])
        result["forward"] = forward
    return result


WORKERS = {"ours_train": ours_train, "ours_infer": ours_infer, "data": data_loading,
           "official_train": official_train, "official_infer": official_infer}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def run_worker(name: str, spec: dict, python: str, env: dict, timeout: float, in_process: bool = False) -> dict:
    start = time.time()
    spec = dict(spec, launched_at=start)  # the worker's to_first_step_s counts from here
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
    parser.add_argument("--remat", default="none", choices=("none", "encoders", "all"),
                        help="ours: the segmenter's remat option (activations recomputed in the backward pass)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                        help="a build_segmenter option, e.g. --override weight_std=false")
    parser.add_argument("--volume", type=_triple, default=[155, 240, 240], help="whole volume D,H,W")
    parser.add_argument("--overlap", type=float, default=1 / 3)
    parser.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--infer-reps", type=int, default=3)
    parser.add_argument("--infer-forward", action="store_true",
                        help="also time the logits-only forward pass alone (one more compilation)")
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="ours: JAX's persistent compilation cache in DIR (shaspec_tf.compile_cache); an empty "
                             "DIR gives a cold first step, a second run with the same DIR a warm one")
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
    parser.add_argument("--label", default=None, help="a name kept in the report (the GPU script: cold, warm, ...)")
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
            "remat": args.remat,
            "overrides": overrides, "volume": args.volume, "overlap": args.overlap,
            "sw_batch_size": args.sw_batch_size, "infer_reps": args.infer_reps, "data_source": args.data_source,
            "data_batches": args.data_batches, "data_cases": args.data_cases,
            "data_case_shape": args.data_case_shape or args.volume,
            "official": os.path.abspath(args.official) if args.official else None,
            "compile_cache": os.path.abspath(args.compile_cache) if args.compile_cache else None,
            "infer_forward": args.infer_forward, "tile_starts": tile_starts(args.volume, crop, args.overlap)}
    env = dict(os.environ, KERAS_BACKEND=args.backend, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    report = {"schema": SCHEMA, "label": args.label, "argv": sys.argv[1:] if argv is None else list(argv),
              "backend": args.backend,
              "config": {k: v for k, v in spec.items() if k not in ("official", "tile_starts")} | {
                  "precisions": precisions, "official": spec["official"], "skip": sorted(skip)},
              "host": {"node": platform.node(), "python": platform.python_version(), "cpu": cpu_name(),
                       "tensorflow_blocked": os.environ.get(BLOCK_TF_ENV) == "1"},
              "ours": {}, "official": {}}

    def save():
        report["ratios"] = compute_ratios(report)
        report["card"] = card_of(report)
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
        if not os.path.isfile(os.path.join(spec["official"], "DualNet_SS.py")):
            report["official_error"] = f"skipped: no official code (DualNet_SS.py) in {spec['official']}"
        elif subprocess.run([args.official_python, "-c", "import torch"], capture_output=True).returncode != 0:
            report["official_error"] = f"skipped: torch not installed (import torch fails in {args.official_python})"
        if report.get("official_error"):
            for precision in precisions:
                report["official"][precision] = {part: {"error": report["official_error"]}
                                                 for part in ("train", "infer") if part not in skip}
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
