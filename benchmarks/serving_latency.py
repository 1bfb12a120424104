"""Serving latency of an exported ShaSpec segmenter: per-request p50 / p95, directly and through ``shaspec serve``.

    python benchmarks/serving_latency.py [--preset small] [--requests 10] [--volume-requests 3]
                                         [--modes direct grpc rest] [--out serving_latency.json]

Exports an untrained model of the preset (latency does not depend on the weights), starts the local server on free
ports of 127.0.0.1, and times, after one untimed warm-up call each:

* ``serving_default`` on one patch ``[1, *patch, 4]`` (default 128x128x128), and
* ``segment_volume`` on one whole volume (default 144x176x144, the size of a BraTS case cropped to the brain;
  pass --volume 155,240,240 for an uncropped one),

called ``direct`` (``tf.saved_model.load`` in this process), over gRPC and over REST (JSON). Client-side encoding
and decoding are part of each request's time. Results go to a JSON file.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from shaspec_tf import fileio


def _percentiles(seconds):
    import numpy as np

    values = np.asarray(seconds, dtype=np.float64)
    return {"n": len(values), "p50_s": round(float(np.percentile(values, 50)), 3),
            "p95_s": round(float(np.percentile(values, 95)), 3), "mean_s": round(float(values.mean()), 3),
            "min_s": round(float(values.min()), 3), "max_s": round(float(values.max()), 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--patch", default="128,128,128", help="serving_default patch D,H,W")
    parser.add_argument("--volume", default="144,176,144", help="segment_volume volume D,H,W")
    parser.add_argument("--requests", type=int, default=10, help="timed serving_default requests per mode")
    parser.add_argument("--volume-requests", type=int, default=3, help="timed segment_volume requests per mode")
    parser.add_argument("--modes", nargs="+", default=["direct", "grpc", "rest"], choices=("direct", "grpc", "rest"))
    parser.add_argument("--out", default="serving_latency.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import numpy as np
    import tensorflow as tf

    import shaspec_tf
    from shaspec_serving.client import GrpcClient, RestClient
    from shaspec_serving.server import LocalServer
    from shaspec_tf.export import export_model

    patch = tuple(int(v) for v in args.patch.split(","))
    volume_shape = tuple(int(v) for v in args.volume.split(","))
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1,) + patch + (4,)).astype(np.float32)
    volume = rng.normal(size=(1,) + volume_shape + (4,)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1]], np.float32)
    report = {"preset": args.preset, "patch": patch, "volume": volume_shape, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "tensorflow": tf.__version__, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = shaspec_tf.build_segmenter(args.preset)
        report["roi"] = list(model.shaspec_config["crop_size"])
        start = time.time()
        export_model(model, tmp, "shaspec")
        report["export_seconds"] = round(time.time() - start, 1)
        del model
        server = LocalServer(tmp, grpc_port=0, rest_port=0, host="127.0.0.1", poll_seconds=0).start()
        try:
            signatures = server.registry.get("shaspec").signatures
            callers = {
                "direct": lambda sig, x, m: {k: v.numpy() for k, v in signatures[sig](
                    image=tf.constant(x), modality_mask=tf.constant(m)).items()},
                "grpc": (lambda c: lambda sig, x, m: c.predict("shaspec", {"image": x, "modality_mask": m}, sig))(
                    GrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=3600)),
                "rest": (lambda c: lambda sig, x, m: c.predict("shaspec", {"image": x, "modality_mask": m}, sig))(
                    RestClient(f"127.0.0.1:{server.rest_port}", timeout=3600)),
            }
            for mode in args.modes:
                for signature, x, count in (("serving_default", image, args.requests),
                                            ("segment_volume", volume, args.volume_requests)):
                    if count <= 0:
                        continue
                    call = callers[mode]
                    out = call(signature, x, mask)  # warm-up (graph instantiation), not timed
                    assert out["labels"].shape == x.shape[:4], (signature, out["labels"].shape)
                    seconds = []
                    for _ in range(count):
                        start = time.perf_counter()
                        call(signature, x, mask)
                        seconds.append(time.perf_counter() - start)
                    result = _percentiles(seconds)
                    report["results"][f"{mode}/{signature}"] = result
                    print(f"{mode:>6} {signature:<16} p50 {result['p50_s']:.3f} s  p95 {result['p95_s']:.3f} s "
                          f"(n={count})", flush=True)
        finally:
            server.stop()
    fileio.atomic_write_json(args.out, report)
    print(f"wrote {os.path.abspath(args.out)}")
    return report


if __name__ == "__main__":
    main()
