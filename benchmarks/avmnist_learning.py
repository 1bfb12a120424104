"""Does ShaSpec learn on AV-MNIST? Accuracy per modality subset, and the paper's Table 3 setting.

    python benchmarks/avmnist_learning.py [--epochs 60] [--rates 0.05 0.1 0.15 0.2] [--out avmnist_learning.json]

Builds AV-MNIST by the SMIL protocol (``shaspec prepare avmnist``: train recording indices 15-49, test 5-14, speakers
jackson, nicolas, theo) from ``$SHASPEC_DATA`` or ``../shared/data``, then for ShaSpec and the baseline:

* full data: accuracy with image+audio, image only and audio only;
* Table 3: train with every image and audio for a fraction R of the training samples, test on images only (the paper
  reports 93.33 / 93.56 / 93.78 / 94.67 % for R = 5 / 10 / 15 / 20 %; its image-only lower bound is 92.35 %).

Adam, lr 1e-3, weight decay 1e-2, batch 32, as the paper. Every number comes from one run with seed 0.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from shaspec_tf import fileio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.05, 0.10, 0.15, 0.20])
    parser.add_argument("--out", default="avmnist_learning.json")
    parser.add_argument("--work", help="keep data and models here (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from shaspec_tf.data.avmnist import build_avmnist
    from shaspec_tf.training.trainer import TrainConfig, train
    from shaspec_tf.trained import evaluate_trained

    work = args.work or tempfile.mkdtemp(prefix="avmnist-learning-")
    data = os.path.join(work, "data")
    if not fileio.exists(fileio.join(data, "manifest.json")):
        build_avmnist(out_dir=data, progress=False)
    report = {"epochs": args.epochs, "runs": {}}

    def run(name, variant, audio_rate=None):
        start = time.time()
        out = os.path.join(work, name)
        train(TrainConfig(task="avmnist", data=data, out=out, variant=variant, epochs=args.epochs,
                          audio_rate=audio_rate, checkpoint_every=10_000))
        summary = evaluate_trained(out, data)["summary"]
        accuracy = {subset: round(100 * values["accuracy"], 2) for subset, values in summary.items()}
        report["runs"][name] = {"variant": variant, "audio_rate": audio_rate, "accuracy_percent": accuracy,
                                "seconds": round(time.time() - start, 1)}
        print(name, accuracy, flush=True)
        fileio.atomic_write_json(args.out, report)

    for variant in ("shaspec", "baseline"):
        run(f"{variant}-full", variant)
        for rate in args.rates:
            run(f"{variant}-audio{int(round(rate * 100))}", variant, audio_rate=rate)
    return report


if __name__ == "__main__":
    main()
