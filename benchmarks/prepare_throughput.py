"""Preprocessing throughput of ``shaspec prepare brats`` on full-size (155x240x240) phantom cases.

    python benchmarks/prepare_throughput.py [--cases 6] [--workers 1 2] [--out prepare_throughput.json]

Generates the phantoms once (not timed), then runs the Beam pipeline (DirectRunner, multi-processing) once per
worker count and reports cases per second, pipeline start-up included.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from shaspec_tf import fileio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", default="155,240,240")
    parser.add_argument("--out", default="prepare_throughput.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from shaspec_tf.data.beam_brats import prepare_brats
    from shaspec_tf.data.phantom import write_phantom_dataset

    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        write_phantom_dataset(f"{tmp}/nifti", args.cases, shape=shape, seed=0, progress=False)
        report = {"cases": args.cases, "shape": shape, "cpus": os.cpu_count(),
                  "phantom_seconds": round(time.time() - start, 1), "runs": []}
        for workers in args.workers:
            start = time.time()
            manifest = prepare_brats(f"{tmp}/nifti", f"{tmp}/records-{workers}", workers=workers)
            seconds = time.time() - start
            run = {"workers": workers, "seconds": round(seconds, 1), "cases_per_second": round(args.cases / seconds, 3),
                   "written": manifest["written"]}
            report["runs"].append(run)
            print(f"{workers} worker(s): {args.cases} cases in {seconds:.1f} s = {run['cases_per_second']} cases/s")
    fileio.atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
