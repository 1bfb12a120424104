"""The first training step of a fresh process, without and with the persistent compilation cache
(``shaspec_tf.compile_cache``).

    KERAS_BACKEND=jax python benchmarks/compile_cache_benchmark.py [--model avmnist] [--runs off,cold,warm]
        [--cache DIR] [--out compile_cache.json]

Each run is a new Python process that imports Keras, builds the model (a segmenter preset: ``tiny``, ``small``,
``paper``; or a classifier: ``avmnist``, ``avmnist-tiny``), compiles it with SGD and takes one training step on
toy data: ``off`` without a cache (``SHASPEC_COMPILE_CACHE=off``), ``cold`` with an empty cache folder, ``warm``
with the folder the cold run filled (the second process of the issue). Per run: ``to_first_step_s`` (from the
launch of the process to the end of the first step), ``first_step_s`` (the step: compilation or cache load, then
the step), ``import_s``, ``build_s``, and the cache entries before and after. ``warm_speedup`` is
``to_first_step_s`` of cold over warm.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLASSIFIERS = ("avmnist", "avmnist-tiny")


def _entries(folder) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if folder and os.path.isdir(folder) else 0


def child(model_name: str, cache: str, launched: float, seed: int = 0) -> dict:
    """One run, in this process: cache, imports, model, first step."""
    start = time.perf_counter()
    sys.path.insert(0, REPO)
    from shaspec_tf.compile_cache import enable_compile_cache

    before = _entries(cache if cache != "off" else None)
    folder = enable_compile_cache(cache if cache != "off" else None)
    import keras
    import numpy as np

    import shaspec_tf
    from shaspec_tf.training.schedules import make_optimizer

    imported = time.perf_counter()
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if model_name in CLASSIFIERS:
        model = shaspec_tf.build_classifier(model_name)
        shapes = model.shaspec_config["input_shapes"]
        x = {name: rng.normal(size=(4,) + tuple(shapes[name])).astype("float32") for name in model.modalities}
        x["modality_mask"] = np.ones((4, len(model.modalities)), "float32")
        y = rng.integers(0, model.shaspec_config["num_classes"], size=4)
    else:
        from shaspec_tf.data.toy import toy_batch

        model = shaspec_tf.build_segmenter(model_name)
        image, y = toy_batch(rng, 1, tuple(model.shaspec_config["crop_size"]))
        x = {"image": image, "modality_mask": np.ones((1, len(model.modalities)), "float32")}
    model.compile(optimizer=make_optimizer("sgd", 1e-2), jit_compile=True)
    built = time.perf_counter()
    loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
    done = time.perf_counter()
    return {"cache": folder, "backend": keras.backend.backend(), "to_first_step_s": time.time() - launched,
            "import_s": imported - start, "build_s": built - imported, "first_step_s": done - built, "loss": loss,
            "cache_entries_before": before, "cache_entries_after": _entries(cache if cache != "off" else None)}


def run(model_name: str, cache: str, timeout: float) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model_name, "--cache", cache,
           "--launched", repr(time.time())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": f"exited with {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="avmnist", help="a segmenter or classifier preset")
    parser.add_argument("--runs", default="off,cold,warm", help="comma list of off, cold, warm (in that order)")
    parser.add_argument("--cache", default=None, help="the cache folder (default: a new temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.model, args.cache, args.launched or time.time())
        print(json.dumps(result))
        return result
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"off", "cold", "warm"}:
        parser.error(f"--runs must be a comma list of off, cold, warm; got {args.runs!r}")
    own = args.cache is None
    cache = args.cache or tempfile.mkdtemp(prefix="shaspec-cache-bench-")
    report = {"model": args.model, "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "runs": {}}
    try:
        for name in runs:
            if name == "cold" and _entries(cache):
                report["runs"][name] = {"error": f"{cache} is not empty: no cold run"}
                continue
            print(f"[{name}] ...", flush=True)
            result = report["runs"][name] = run(args.model, "off" if name == "off" else cache, args.timeout)
            brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()
                     if k in ("error", "to_first_step_s", "first_step_s", "import_s", "build_s",
                              "cache_entries_before", "cache_entries_after")}
            print(f"[{name}] {json.dumps(brief)}", flush=True)
    finally:
        if own:
            shutil.rmtree(cache, ignore_errors=True)
    cold, warm = report["runs"].get("cold", {}), report["runs"].get("warm", {})
    if "to_first_step_s" in cold and "to_first_step_s" in warm:
        report["warm_speedup"] = cold["to_first_step_s"] / warm["to_first_step_s"]
        report["first_step_speedup"] = cold["first_step_s"] / warm["first_step_s"]
        print(f"warm process reaches its first step {report['warm_speedup']:.2f}x sooner than the cold one "
              f"({cold['to_first_step_s']:.1f} s -> {warm['to_first_step_s']:.1f} s; the step itself "
              f"{cold['first_step_s']:.1f} s -> {warm['first_step_s']:.1f} s)")
    if args.out:
        from shaspec_tf import fileio

        fileio.atomic_write_json(args.out, report, indent=1)
    return report


if __name__ == "__main__":
    main()
