"""Parity of shaspec_tf with the official PyTorch ShaSpec: same weights, same input, compare the logits.

The reference comes from the official code run elsewhere (this repository holds none of it):
``DualNet_SS(args, norm_cfg='IN', activation_cfg='LeakyReLU', num_classes=3, weight_std=True).eval()``, its
``state_dict`` saved as ``.npz`` (key -> array), and an ``.npz`` holding ``input`` ``[N, 4, D, H, W]`` and
``logits_<tag>`` ``[N, 3, D, H, W]`` for each evaluated mode (``all`` = '0,1,2,3', ``m13`` = '1,3').

    python benchmarks/official_parity.py --state-dict sd.npz --reference ref.npz [--reference ref_fp64.npz]
        [--float64] [--out parity.json]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from shaspec_tf import fileio

MODES = {"all": (1, 1, 1, 1), "m13": (0, 1, 0, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dict", required=True, help="official state dict (.npz or .pth)")
    parser.add_argument("--reference", action="append", required=True, help="official outputs .npz (repeatable)")
    parser.add_argument("--float64", action="store_true", help="run our model in float64")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    import keras
    if args.float64:
        keras.config.set_floatx("float64")
    import shaspec_tf
    from shaspec_tf.convert import load_official_state_dict

    model = shaspec_tf.build_segmenter("paper", official_parity=True)
    load_official_state_dict(model, args.state_dict)
    references = [np.load(path) for path in args.reference]
    image = np.transpose(references[0]["input"], (0, 2, 3, 4, 1)).astype(keras.config.floatx())
    report = {"backend": keras.backend.backend(), "floatx": keras.config.floatx(),
              "parameters": int(model.count_params()), "input_shape": list(image.shape), "modes": {}}
    for tag, bits in MODES.items():
        mask = np.tile(np.asarray(bits, "float32"), (image.shape[0], 1))
        start = time.time()
        logits = np.asarray(model({"image": image, "modality_mask": mask})["logits"], dtype=np.float64)
        seconds = time.time() - start
        ours = np.transpose(logits, (0, 4, 1, 2, 3))  # back to [N, 3, D, H, W]
        for path, ref in zip(args.reference, references):
            theirs = ref[f"logits_{tag}"].astype(np.float64)
            diff = np.abs(ours - theirs)
            span = float(theirs.max() - theirs.min())
            entry = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                     "logit_range": span, "max_abs_diff_over_range": float(diff.max() / span),
                     "sign_agreement": float(np.mean((ours > 0) == (theirs > 0))), "seconds": round(seconds, 1)}
            report["modes"].setdefault(tag, {})[os.path.basename(path)] = entry
            print(f"[{tag}] vs {os.path.basename(path)}: max|diff| {entry['max_abs_diff']:.3e} "
                  f"= {entry['max_abs_diff_over_range']:.2e} of the logit range {span:.2f}; "
                  f"mean {entry['mean_abs_diff']:.2e}; thresholded agreement {entry['sign_agreement']:.6f}")
    if args.out:
        fileio.atomic_write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
