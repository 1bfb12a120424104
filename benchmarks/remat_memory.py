"""What the segmenter's ``remat`` option saves: XLA's memory analysis of the jitted training step with the encoders
(and the decoder) recomputed in the backward pass, against the plain step (GitHub issue 16, item 3).

    KERAS_BACKEND=jax python benchmarks/remat_memory.py [--preset tiny] [--crop 32,64,64[;48,96,96]] [--batch 1]
        [--policy float32,mixed_bfloat16] [--remat none,encoders,all] [--no-compile] [--out report.json]

For each crop, dtype policy and ``remat`` mode, Keras' own JAX ``train_step`` (the model's full ShaSpec loss, SGD
with Nesterov momentum, the state donated as Keras' trainer does) is lowered with ``jax.jit`` and compiled for this
machine's backend, and XLA's ``memory_analysis()`` is read:

* ``temp``: the buffers the step holds beside its arguments and outputs (activations kept for the backward pass,
  gradients, workspace); ``argument``, ``output``, ``alias`` (outputs written into donated arguments);
* ``peak_estimate`` = argument + output - alias + temp: what the device holds at the step's peak if nothing else is
  allocated (on a GPU the allocator's ``peak_bytes_in_use`` adds fragmentation and cuDNN workspaces);
* ``kept``: before XLA, the bytes the backward pass keeps from the forward pass (``jax.linearize``'s residuals, the
  weights apart; ``hlo_casts.residuals``), an upper bound that needs no compilation.

The ratios to ``remat=none`` (same crop and policy) are the transferable figures: XLA:CPU and XLA:GPU fuse and lay
out buffers differently, so absolute sizes on this machine are not the GPU's. Unless ``XLA_FLAGS`` is set, the CPU
back end's machine-code optimisation is turned down (``hlo_casts.FAST_CPU_COMPILE``; buffer assignment, which the
figures come from, is unchanged). ``--no-compile`` gives ``kept`` alone (seconds instead of minutes).

``--fit`` with two or more crops also fits ``peak = a + b * voxels`` per policy and mode (least squares) and
extrapolates it to ``--fit-crop`` (default the preset's crop): the activations grow with the volume, the weights,
gradients and optimiser state do not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
REPO = os.path.dirname(HERE)
MIB = 2 ** 20


def measure(preset: str, crop, batch: int, policy: str, remat: str, compile_step: bool) -> dict:
    import jax

    import hlo_casts

    model, x, regions, state = hlo_casts.train_step_inputs(hlo_casts.build(preset, policy, remat, {}), batch, crop)
    report = {"preset": preset, "crop": list(crop), "voxels": int(np.prod(crop)), "batch": batch, "policy": policy,
              "remat": remat, "params": int(model.count_params())}
    start = time.perf_counter()
    report["kept_mib"] = hlo_casts.residuals(model, state, x, regions, top=1)["mib"]
    report["kept_s"] = time.perf_counter() - start
    if compile_step:
        start = time.perf_counter()
        lowered = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, regions, None))
        report["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        analysis = lowered.compile().memory_analysis()
        report["compile_s"] = time.perf_counter() - start
        mib = {k: getattr(analysis, f"{k}_size_in_bytes") / MIB for k in ("temp", "argument", "output", "alias")}
        mib["peak_estimate"] = mib["argument"] + mib["output"] - mib["alias"] + mib["temp"]
        report["memory_mib"] = mib
    return report


def add_ratios(reports: list) -> None:
    """``ratio``: each figure over the same crop and policy's ``remat=none`` figure."""
    base = {(tuple(r["crop"]), r["policy"]): r for r in reports if r["remat"] == "none"}
    for r in reports:
        b = base.get((tuple(r["crop"]), r["policy"]))
        if b is None:
            continue
        ratio = {"kept": r["kept_mib"] / b["kept_mib"] if b["kept_mib"] else None}
        for key in ("temp", "peak_estimate"):
            if "memory_mib" in r and "memory_mib" in b and b["memory_mib"][key]:
                ratio[key] = r["memory_mib"][key] / b["memory_mib"][key]
        r["ratio"] = ratio


def fit(reports: list, crop) -> list:
    """Per (policy, remat): ``peak = a + b * voxels`` through the compiled crops, at ``crop``."""
    out = []
    groups = {}
    for r in reports:
        if "memory_mib" in r:
            groups.setdefault((r["policy"], r["remat"]), []).append(r)
    voxels = int(np.prod(crop))
    for (policy, remat), rs in groups.items():
        if len({r["voxels"] for r in rs}) < 2:
            continue
        entry = {"policy": policy, "remat": remat, "crop": list(crop), "from_crops": [r["crop"] for r in rs]}
        for key in ("temp", "peak_estimate", "kept"):
            ys = [r["kept_mib"] if key == "kept" else r["memory_mib"][key] for r in rs]
            b, a = np.polyfit([r["voxels"] for r in rs], ys, 1)
            entry[f"{key}_mib"] = float(a + b * voxels)
        out.append(entry)
    base = {e["policy"]: e for e in out if e["remat"] == "none"}
    for e in out:
        if e["policy"] in base:
            e["ratio"] = {k: e[f"{k}_mib"] / base[e["policy"]][f"{k}_mib"] for k in ("temp", "peak_estimate", "kept")}
    return out


def _line(r: dict) -> str:
    mem = r.get("memory_mib")
    ratio = r.get("ratio", {})
    text = (f"{r['preset']} {'x'.join(map(str, r['crop']))} {r['policy']:15s} remat={r['remat']:8s} "
            f"kept {r['kept_mib']:9.1f} MiB (x{ratio.get('kept', float('nan')):.2f})")
    if mem:
        text += (f"  temp {mem['temp']:9.1f} MiB (x{ratio.get('temp', float('nan')):.2f})  peak~ "
                 f"{mem['peak_estimate']:9.1f} MiB (x{ratio.get('peak_estimate', float('nan')):.2f})  "
                 f"[args {mem['argument']:.0f}, out {mem['output']:.0f}, alias {mem['alias']:.0f}; compile "
                 f"{r['compile_s']:.0f} s]")
    return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=("paper", "small", "tiny"))
    parser.add_argument("--crop", default="32,64,64", help="D,H,W; several separated by ';'")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--policy", default="float32,mixed_bfloat16", help="Keras dtype policies, comma-separated")
    parser.add_argument("--remat", default="none,encoders,all", help="remat modes, comma-separated")
    parser.add_argument("--no-compile", action="store_true", help="the pre-XLA residuals only")
    parser.add_argument("--fit", action="store_true", help="extrapolate linearly in voxels (2+ crops)")
    parser.add_argument("--fit-crop", default=None, help="D,H,W for --fit (default: the preset's crop)")
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not args.no_compile:
        import hlo_casts

        os.environ.setdefault("XLA_FLAGS", hlo_casts.FAST_CPU_COMPILE)
    sys.path.insert(0, REPO)
    import keras

    if keras.backend.backend() != "jax":
        parser.error("run under KERAS_BACKEND=jax (the step is compiled with jax.jit)")
    from shaspec_tf.models import SEGMENTER_PRESETS
    from shaspec_tf.models.presets import REMAT_MODES

    try:
        crops = [[int(v) for v in c.split(",")] for c in args.crop.split(";") if c.strip()]
        fit_crop = ([int(v) for v in args.fit_crop.split(",")] if args.fit_crop
                    else list(SEGMENTER_PRESETS[args.preset]["crop_size"]))
    except ValueError:
        parser.error(f"--crop and --fit-crop are D,H,W (crops separated by ';'), got {args.crop!r}")
    if any(len(c) != 3 for c in crops + [fit_crop]) or args.batch < 1:
        parser.error("every crop is D,H,W and --batch is at least 1")
    remats = [m.strip() for m in args.remat.split(",")]
    if not set(remats) <= set(REMAT_MODES):
        parser.error(f"--remat takes {', '.join(REMAT_MODES)} (comma-separated), got {args.remat!r}")
    reports = []
    plan = [(c, p.strip(), m) for c in crops for p in args.policy.split(",") for m in remats]
    for i, (crop, policy, remat) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {args.preset} {'x'.join(map(str, crop))} {policy} remat={remat} ...", flush=True)
        reports.append(measure(args.preset, crop, args.batch, policy, remat, not args.no_compile))
    add_ratios(reports)
    for r in reports:
        print(_line(r), flush=True)
    result = {"schema": "shaspec-remat-memory 1", "xla_flags": os.environ.get("XLA_FLAGS"), "reports": reports}
    if args.fit:
        result["fit"] = fit(reports, fit_crop)
        for e in result["fit"]:
            print(f"fit at {'x'.join(map(str, e['crop']))} {e['policy']} remat={e['remat']}: temp "
                  f"{e['temp_mib']:.0f} MiB, peak~ {e['peak_estimate_mib']:.0f} MiB"
                  + (f" (x{e['ratio']['peak_estimate']:.2f} of remat=none)" if "ratio" in e else ""), flush=True)
    if args.out:
        with open(args.out + ".partial", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".partial", args.out)
    return result


if __name__ == "__main__":
    main()
