"""Whole-volume inference: the device window (``shaspec_tf.inference.sliding_window_predict``) against the host
loop it replaced, and against the model's forward pass alone, on one model in one process.

    KERAS_BACKEND=jax python benchmarks/inference_benchmark.py [--preset tiny] [--volume 48,96,96]
        [--sw-batch-size 4] [--reps 3] [--impl host,device,forward,device_bf16] [--out inference.json]

* ``device``: ``sliding_window_predict``: padding, tile gathering, the logits-only forward in batches of
  ``--sw-batch-size`` tiles, sigmoids, Gaussian blending and the crop, all in one compiled function (``jax.jit`` /
  ``tf.function``); only the probabilities come back.
* ``host``: the loop the device window replaced: the volume padded in NumPy, each batch of tiles through
  ``model.predict_on_batch`` (every output, feature maps included, comes back to the host), sigmoids and
  Gaussian blending in NumPy.
* ``device_bf16``: the same with ``precision="bf16"`` (the model's layers in bfloat16, float32 weights and
  probabilities); ``bf16_vs_device`` gives its largest and mean probability difference from ``device`` and the
  share of voxels whose thresholded regions agree.
* ``forward``: the compiled logits-only forward pass alone, ``ceil(tiles / sw_batch_size)`` calls on one batch of
  tiles: the model's share of the work, a floor for the other two.

``first_s`` includes compilation (tracing under TensorFlow), then ``--reps`` timed volumes (median, min, max);
``max_abs_diff`` compares host and device probabilities. The window (``roi``) is the preset's crop.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("shaspec_tf") is None:  # not installed: this checkout's (PYTHONPATH may name another)
    sys.path.insert(0, os.path.dirname(HERE))

from shaspec_tf.inference.window import gaussian_importance_map, window_starts  # noqa: E402 (after the path)


def host_predict(model, image, mask, roi, overlap, sw_batch_size):
    """Region probabilities of one volume by the host loop (the pre-device implementation)."""
    shape = image.shape[:3]
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    image = np.pad(image, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    weights = gaussian_importance_map(roi)
    starts = list(itertools.product(*(window_starts(p, r, overlap) for p, r in zip(padded, roi))))
    accum, total = None, np.zeros(padded, np.float32)
    for first in range(0, len(starts), sw_batch_size):
        slices = [tuple(slice(s, s + r) for s, r in zip(start, roi)) for start in starts[first:first + sw_batch_size]]
        tiles = np.stack([image[sl] for sl in slices])
        outputs = model.predict_on_batch({"image": tiles, "modality_mask": np.repeat(mask[None], len(slices), 0)})
        prob = 1.0 / (1.0 + np.exp(-np.asarray(outputs["logits"], np.float32)))
        if accum is None:
            accum = np.zeros(padded + prob.shape[-1:], np.float32)
        for sl, p in zip(slices, prob):
            accum[sl] += p * weights[..., None]
            total[sl] += weights
    return (accum / total[..., None])[:shape[0], :shape[1], :shape[2]]


def forward_function(model):
    """``run(tiles, masks) -> logits`` on the device: the model's logits output alone, compiled."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        @jax.jit
        def logits(state, tiles, masks):
            outputs, _ = model.stateless_call(state[0], state[1], {"image": tiles, "modality_mask": masks},
                                              training=False)
            return outputs["logits"]

        def run(tiles, masks):
            state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
            return logits(state, tiles, masks).block_until_ready()

        return run
    import tensorflow as tf

    fn = tf.function(lambda tiles, masks: model({"image": tiles, "modality_mask": masks}, training=False)["logits"])
    return lambda tiles, masks: fn(tiles, masks).numpy()


def timed(fn, reps):
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, {"first_s": round(first, 4), "median_s": round(float(np.median(times)), 4),
                 "min_s": round(min(times), 4), "max_s": round(max(times), 4), "reps": reps}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--volume", default="48,96,96", help="D,H,W of the volume")
    parser.add_argument("--overlap", type=float, default=1 / 3)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--impl", default="host,device,forward",
                        help="comma list of host, device, forward, device_bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    if not impls or set(impls) - {"host", "device", "forward", "device_bf16"}:
        parser.error(f"--impl must be a comma list of host, device, forward, device_bf16; got {args.impl!r}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    import shaspec_tf
    from shaspec_tf.inference import sliding_window_predict

    keras.utils.set_random_seed(args.seed)
    model = shaspec_tf.build_segmenter(args.preset)
    roi = tuple(model.shaspec_config["crop_size"])
    volume = tuple(int(v) for v in args.volume.split(","))
    image = np.random.default_rng(args.seed).normal(size=volume + (len(model.modalities),)).astype(np.float32)
    mask = np.ones(len(model.modalities), np.float32)
    tiles = math.prod(len(window_starts(v, r, args.overlap)) for v, r in zip(volume, roi))
    batch = min(args.sw_batch_size, tiles)
    report = {"backend": keras.backend.backend(), "keras": keras.__version__, "preset": args.preset,
              "package": os.path.dirname(shaspec_tf.__file__), "volume": list(volume), "roi": list(roi),
              "tiles": tiles, "sw_batch_size": batch, "overlap": args.overlap,
              "host": {"node": platform.node(), "cpus": os.cpu_count()}, "results": {}}
    outputs = {}
    for impl in impls:
        if impl in ("device", "device_bf16"):
            fn = functools.partial(sliding_window_predict, model, image, mask, roi_size=roi, overlap=args.overlap,
                                   sw_batch_size=batch, precision="bf16" if impl == "device_bf16" else "fp32")
        elif impl == "host":
            fn = lambda: host_predict(model, image, mask, roi, args.overlap, batch)  # noqa: E731
        else:
            run = forward_function(model)
            x = np.stack([image[:roi[0], :roi[1], :roi[2]]] * batch) if all(
                v >= r for v, r in zip(volume, roi)) else np.zeros((batch,) + roi + image.shape[-1:], np.float32)
            masks = np.repeat(mask[None], batch, 0)
            calls = -(-tiles // batch)
            fn = lambda: [run(x, masks) for _ in range(calls)]  # noqa: E731
        print(f"[{impl}] ...", flush=True)
        outputs[impl], report["results"][impl] = timed(fn, args.reps)
        print(f"[{impl}] {json.dumps(report['results'][impl])}", flush=True)
    if "host" in outputs and "device" in outputs:
        report["max_abs_diff_host_device"] = float(np.abs(outputs["host"] - outputs["device"]).max())
        print(f"max |host - device| = {report['max_abs_diff_host_device']:.2e}")
    if "device" in outputs and "device_bf16" in outputs:
        diff = np.abs(outputs["device"] - outputs["device_bf16"])
        report["bf16_vs_device"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                                    "regions_agree": float(((outputs["device"] > 0.5)
                                                            == (outputs["device_bf16"] > 0.5)).mean())}
        print(f"bf16 vs fp32: {json.dumps(report['bf16_vs_device'])}")
    if args.out:
        from shaspec_tf import fileio

        fileio.atomic_write_json(args.out, report, indent=1)
    return report


if __name__ == "__main__":
    main()
