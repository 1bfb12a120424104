"""The ``shaspec`` command line.

    shaspec demo [--preset tiny] [--steps 60]     build a model and train it briefly on toy volumes
    shaspec info [--preset paper]                 print a preset's configuration and parameter count
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's GCE cluster resolver imports google-api-core, which warns about Python 3.10 on every start.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core")


def _demo(args) -> int:
    import keras
    import numpy as np

    import shaspec_tf
    from shaspec_tf.data.masks import all_subsets, random_modality_masks
    from shaspec_tf.data.toy import toy_batch
    from shaspec_tf.metrics import region_dice

    shape = tuple(int(v) for v in args.shape.split(","))
    keras.utils.set_random_seed(args.seed)
    model = shaspec_tf.build_segmenter(args.preset)
    modalities = model.modalities
    print(f"shaspec demo: {model.name}, {model.count_params():,} parameters, backend {keras.backend.backend()}, "
          f"crops {shape}, batch {args.batch}, {args.steps} steps "
          f"({args.warmup} with every modality, then random modality dropout)")

    class ToyBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(args.seed)

        def __len__(self):
            return args.steps

        def __getitem__(self, index):
            images, regions = toy_batch(self.rng, args.batch, shape)
            drop = 0.0 if index < args.warmup else 1.0
            masks = random_modality_masks(self.rng, args.batch, len(modalities), drop_rate=drop)
            return {"image": images, "modality_mask": masks}, regions

    model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.99, nesterov=True), run_eagerly=args.eager)
    start = time.time()
    history = model.fit(ToyBatches(), epochs=1, verbose=1 if sys.stdout.isatty() else 2)
    seconds = time.time() - start
    losses = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    print(f"trained {args.steps} steps in {seconds:.0f} s: " +
          ", ".join(f"{k} {v[-1]:.4f}" for k, v in sorted(losses.items())))

    images, regions = toy_batch(np.random.default_rng(args.seed + 1), 2, shape)
    print("Dice on 2 held-out toy cases per available-modality subset (ET / WT / TC):")
    table = {}
    for name, mask in all_subsets(modalities):
        logits = model.predict_on_batch({"image": images, "modality_mask": np.tile(mask, (2, 1))})["logits"]
        table[name] = region_dice(logits, regions)
        print(f"  {name:<20} " + " / ".join(f"{table[name][r]:.3f}" for r in ("ET", "WT", "TC")))

    os.makedirs(args.out, exist_ok=True)
    model.save_weights(os.path.join(args.out, "model.weights.h5"))
    with open(os.path.join(args.out, "model_config.json"), "w") as f:
        f.write(model.config_json())
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"losses": losses, "seconds": seconds, "dice": table}, f, indent=2)
    print(f"weights, config and figures written to {os.path.abspath(args.out)}")
    return 0


def _info(args) -> int:
    import shaspec_tf

    build = shaspec_tf.build_classifier if args.preset.startswith("avmnist") else shaspec_tf.build_segmenter
    model = build(args.preset)
    print(json.dumps({"name": model.name, "parameters": model.count_params(), "config": model.shaspec_config},
                     indent=2, default=list))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shaspec", description="ShaSpec missing-modality learning (Keras 3 / TFX)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build a model and train it briefly on toy volumes, printing losses")
    demo.add_argument("--preset", default="tiny", help="segmenter preset (tiny, small, paper)")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--warmup", type=int, default=20, help="steps with every modality before random dropout")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--shape", default="32,64,64", help="crop size D,H,W (divisible by 16,32,32)")
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--eager", action="store_true",
                      help="run the training steps eagerly: no graph compilation, slower steps (debugging)")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="print a preset's configuration and parameter count")
    info.add_argument("--preset", default="paper", help="tiny, small, paper, avmnist, avmnist-tiny")
    info.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
