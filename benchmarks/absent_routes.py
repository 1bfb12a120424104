"""What each route for absent modalities' skips (the segmenter's ``absent_features``) does to training from
initialisation, with modalities absent from the first step (the official dropout law, no warm-up).

    python benchmarks/absent_routes.py --data RECORDS [--routes encoded,detached,zeros] [--steps 8] [--preset small]
                                       [--work absent_routes]
    KERAS_BACKEND=jax python benchmarks/absent_routes.py --data RECORDS ...

RECORDS is a ``shaspec prepare brats`` output (e.g. of ``shaspec prepare phantom``). Per route, ``--steps`` SGD steps
(the BraTS defaults: Nesterov momentum 0.99, learning rate 1e-2), run eagerly so that nothing is compiled, then the
largest absolute weight and the last loss, as one JSON line per route. On this project's CPU (``small``, 8 steps,
batch 2, 32x64x64, the 24 phantoms of ``benchmarks/phantom_brats_learning.py``): ``encoded`` put the largest weight
at 9.0e5 under TensorFlow and 4.1e18 under JAX, ``detached`` and ``zeros`` at 2.0 and 2.3
(``benchmarks/results/absent_routes/``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a 'shaspec prepare brats' output folder")
    parser.add_argument("--routes", default="encoded,detached,zeros")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--crop", default="32,64,64")
    parser.add_argument("--work", default="absent_routes", help="training folders, one per route and backend")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from shaspec_tf import fileio
    from shaspec_tf.trained import load_trained
    from shaspec_tf.training.trainer import TrainConfig, train

    lines = []
    for route in args.routes.split(","):
        out = fileio.join(args.work, f"{route}-{keras.backend.backend()}")
        start = time.time()
        keras.backend.clear_session()
        result = train(TrainConfig(task="brats", data=args.data, out=out, preset=args.preset, steps=args.steps,
                                   checkpoint_every=args.steps, batch_size=2,
                                   crop_size=tuple(int(v) for v in args.crop.split(",")), warmup_steps=0, seed=0,
                                   run_eagerly=True, model_options={"absent_features": route}))
        model = load_trained(out)
        largest = max(float(np.max(np.abs(keras.ops.convert_to_numpy(v)))) for v in model.trainable_variables)
        line = {"route": route, "backend": keras.backend.backend(), "steps": args.steps,
                "max_abs_weight": largest, "loss": float(result["history"]["loss"][-1]),
                "seconds": round(time.time() - start, 1)}
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
