"""Where the dtype casts of the segmenter's jitted training step sit, and what the step keeps for its backward pass
(GitHub issue 16, item 3: bf16 training slower than fp32 under XLA).

    KERAS_BACKEND=jax python benchmarks/hlo_casts.py [--preset tiny] [--crop 32,64,64] [--batch 1]
        [--policy float32,mixed_bfloat16] [--remat none[,encoders,all,layers:A+B,larger_than:N,full]]
        [--norm-remat off[,low,all]] [--compile [--steps N] [--dump DIR]] [--no-residuals] [--top 12]
        [--out report.json]

For each dtype policy and rematerialisation mode the training step of ``benchmarks/train_step_benchmark.py`` (Keras'
own JAX ``train_step``: the model's full ShaSpec loss, SGD) is lowered with ``jax.jit(...).lower`` on toy data, and

* ``converts``: every ``stablehlo.convert`` of the lowered module (before XLA's optimisations, so what the model asks
  for, whatever the device), with its elements and the bytes it reads and writes, grouped by the source line that
  made it (``file:line``), its direction (``bf16->f32``, ...) and its phase (``forward``: under ``jvp``,
  ``backward``: under ``transpose``, ``other``: the optimiser, the loss tail); ``activations`` counts those of
  rank-4 and higher tensors other than 3D kernels;
* ``convolutions``: the convolutions by operand dtypes;
* ``residuals``: what the backward pass keeps from the forward (``jax.ad_checkpoint``'s saved residuals of the
  loss with respect to the trainable weights): bytes by dtype, the weights themselves apart, the largest groups
  by source line and the totals by top-level layer. This is before XLA, which recomputes cheap elementwise
  producers inside the fusions that consume them (a cast, a subtraction) instead of keeping them, so it is an
  upper bound; the compiled ``temp`` below is what a step holds;
* with ``--compile``: XLA's compiled ``memory_analysis()`` on this machine (``temp``: the buffers a step holds at
  its peak beside its arguments and outputs: activations, residuals, gradients) and the compile time. XLA:CPU's
  LLVM back end takes many minutes over a 3D training step at its default optimisation level, so unless
  ``XLA_FLAGS`` is set this sets ``--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true``
  (machine-code optimisation only: XLA's buffer assignment, which the memory figures come from, is the same);
  ``optimized``: the compiled module's converts, layout changes (``copy``, ``transpose``), convolutions and custom
  calls (cuDNN's on a GPU, with their result dtype); ``--dump DIR`` writes the lowered and the optimised modules.

``--remat``: ``encoders`` and ``all`` are the segmenter's own ``remat`` option (every encoder, and for ``all`` the
decoder too, under ``keras.remat``, i.e. ``jax.checkpoint``: only its inputs and outputs are kept, its inside is
recomputed in the backward pass; ``benchmarks/remat_memory.py`` compares them); the others build the model under a
``keras.RematScope``: ``layers:A+B`` with ``mode="list_of_layers"`` naming top-level layers (e.g.
``layers:shared_encoder``),
``larger_than:N`` under ``mode="larger_than"`` (every layer whose output has more than N elements), ``full`` every
layer. ``--norm-remat`` rematerialises every ``InstanceNormalization`` call (patched here, the library is
unchanged): ``low`` only on bfloat16 / float16 inputs (its float32 statistics are then recomputed from the
low-precision input in the backward pass instead of being kept), ``all`` whatever the dtype; ``off`` (default) is
the library's code. ``--steps N`` (with ``--compile``) also runs the compiled step N times and reports the median
time: on a GPU, what each variant costs.

Prints a summary per configuration and writes the whole report as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i8": 1, "ui8": 1, "i1": 1, "ui32": 4}
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_CONVERT = re.compile(r"stablehlo\.convert\s+%\S+\s*:\s*\(tensor<([^>]*)>\)\s*->\s*tensor<([^>]*)>.*loc\((#loc\d+)\)")
_CONV = re.compile(r"stablehlo\.convolution\(.*:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)")
_LOC = re.compile(r"^(#loc\d+) = loc\((.*)\)\s*$")


def _tensor(text: str):
    """``"1x32x64x8xbf16"`` -> ``((1, 32, 64, 8), "bf16")``."""
    *dims, dtype = text.split("x")
    return tuple(int(d) for d in dims if d.isdigit()), dtype


class Locations:
    """The ``#locN`` table of an MLIR module printed with debug info: each location's op name (the JAX name stack,
    Keras layer paths included) and the source line of this repository that made it."""

    def __init__(self, text: str):
        self.raw = {}
        for line in text.splitlines():
            match = _LOC.match(line)
            if match:
                self.raw[match.group(1)] = match.group(2)

    def name(self, ref: str, depth: int = 0) -> str:
        raw = self.raw.get(ref, "")
        if raw.startswith('"') and not re.match(r'^"[^"]*":\d+', raw):
            return raw[1:raw.index('"', 1)]
        if raw.startswith("callsite(") and depth < 50:
            return self.name(raw[len("callsite("):].split(" at ")[0].strip(), depth + 1)
        return ""

    def source(self, ref: str, depth: int = 0) -> str:
        """The innermost frame of this package (``shaspec_tf/...:line``), with the innermost library frame that made
        the op when it is another (``shaspec_tf/layers/norm.py:40 <- keras/src/backend/jax/core.py:268``)."""
        return source_of(self._frames(ref, depth))

    def _frames(self, ref: str, depth: int) -> list:
        if depth > 50:
            return []
        raw = self.raw.get(ref, "")
        frames = [f"{path}:{line}" for path, line in re.findall(r'"([^"]+)":(\d+):\d+', raw)]
        for child in re.findall(r"#loc\d+", raw):
            frames += self._frames(child, depth + 1)
        return frames


def _short(frame: str) -> str:
    return frame.split("site-packages/", 1)[1] if "site-packages/" in frame else os.path.relpath(frame, REPO) \
        if frame.startswith(REPO) else frame


def source_of(frames) -> str:
    """``ours <- library`` of a list of frames (``path:line``), innermost first."""
    ours = [f for f in frames if f.startswith(REPO) and "site-packages" not in f]
    first = frames[0] if frames else "?"
    if not ours:
        return _short(first)
    return _short(ours[0]) + ("" if first == ours[0] else f" <- {_short(first)}")


def _is_kernel(shape) -> bool:
    """A 3D convolution kernel ``(k, k, k, in, out)`` (odd cubic window), not an activation ``(B, D, H, W, C)``."""
    return len(shape) == 5 and shape[0] == shape[1] == shape[2] and shape[0] in (1, 3, 5, 7)


def _phase(name: str) -> str:
    if "transpose(" in name:
        return "backward"
    if "jvp(" in name:
        return "forward"
    return "other"


def analyse_module(text: str, top: int) -> dict:
    """Converts and convolutions of a lowered StableHLO module printed with debug info."""
    locations = Locations(text)
    groups = collections.defaultdict(lambda: [0, 0, 0])  # (source, direction, phase) -> count, elements, bytes
    totals = collections.Counter()
    for match in _CONVERT.finditer(text):
        (shape, src), (_, dst) = _tensor(match.group(1)), _tensor(match.group(2))
        elements = int(np.prod(shape)) if shape else 1
        moved = elements * (ITEMSIZE.get(src, 4) + ITEMSIZE.get(dst, 4))
        name = locations.name(match.group(3))
        direction, phase = f"{src}->{dst}", _phase(name)
        activation = len(shape) >= 4 and not _is_kernel(shape)
        group = groups[(locations.source(match.group(3)), direction, phase)]
        group[0], group[1], group[2] = group[0] + 1, group[1] + elements, group[2] + moved
        totals["count"] += 1
        totals["bytes"] += moved
        if activation:
            totals["activation_count"] += 1
            totals["activation_bytes"] += moved
            totals[f"activation_bytes {direction}"] += moved
    convolutions = collections.Counter(f"{_tensor(a)[1]}x{_tensor(b)[1]}" for a, b in _CONV.findall(text))
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][2])
    return {"converts": {"count": totals["count"], "mib_moved": totals["bytes"] / 2 ** 20,
                         "activations": {"count": totals["activation_count"],
                                         "mib_moved": totals["activation_bytes"] / 2 ** 20,
                                         **{k.split(" ", 1)[1]: v / 2 ** 20 for k, v in totals.items()
                                            if k.startswith("activation_bytes ")}},
                         "by_source": [{"source": s, "direction": d, "phase": p, "count": c, "elements": e,
                                        "mib_moved": b / 2 ** 20} for (s, d, p), (c, e, b) in ranked[:top]]},
            "convolutions": dict(convolutions)}


def saved_for_backward(f, *args) -> list:
    """``[(aval, frames innermost first, name stack)]`` of what the backward pass of ``f`` keeps from its forward
    pass, the arguments apart (``aval`` None for them; the way ``jax.ad_checkpoint.print_saved_residuals`` finds
    them, with the whole traceback of each)."""
    import jax
    from jax._src import core, source_info_util

    leaves, tree = jax.tree_util.tree_flatten(args)

    def flat(*values):
        return f(*jax.tree_util.tree_unflatten(tree, values))

    jaxpr = jax.make_jaxpr(lambda *values: jax.linearize(flat, *values)[1])(*leaves).jaxpr
    kept = {v for v in jaxpr.outvars if not isinstance(v, core.Literal)}
    found = [(v.aval, ["argument"], "") for v in jaxpr.invars if v in kept]
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if v in kept:
                frames = [f"{fr.file_name}:{fr.start_line}" for fr in source_info_util.user_frames(eqn.source_info)]
                found.append((v.aval, frames, str(eqn.source_info.name_stack)))
    return found


def residuals(model, state, x, y, top: int) -> dict:
    """Bytes that the backward pass of the model's loss keeps from its forward pass (the weights apart), by dtype
    and by the source line that made them."""
    trainable, non_trainable, optimizer, metrics = state

    def loss(values):
        return model.compute_loss_and_updates(values, non_trainable, metrics, x, y, None, training=True,
                                              optimizer_variables=optimizer)[0]

    by_dtype, weights, groups, layers = collections.Counter(), 0, collections.Counter(), collections.Counter()
    for aval, frames, names in saved_for_backward(loss, trainable):
        size = int(np.prod(aval.shape)) * aval.dtype.itemsize
        if frames == ["argument"]:
            weights += size
            continue
        by_dtype[str(aval.dtype)] += size
        groups[f"{source_of(frames)} {aval.dtype}"] += size
        layers[re.sub(r"^(?:\w+\()+", "", names).split("/")[0].rstrip(")") or "(model)"] += size
    return {"mib": sum(by_dtype.values()) / 2 ** 20, "mib_by_dtype": {k: v / 2 ** 20 for k, v in by_dtype.items()},
            "weights_mib": weights / 2 ** 20,
            "largest": [{"source": s, "mib": b / 2 ** 20} for s, b in groups.most_common(top)],
            "by_layer_mib": {k: v / 2 ** 20 for k, v in layers.most_common()}}


def build(preset: str, policy: str, remat: str, overrides: dict):
    import keras

    import shaspec_tf

    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    if remat in ("none", "encoders", "all"):
        return shaspec_tf.build_segmenter(preset, remat=remat, **overrides)
    if remat.startswith("layers:"):
        scope = keras.RematScope(mode="list_of_layers", layer_names=remat.split(":", 1)[1].split("+"))
    elif remat.startswith("larger_than:"):
        scope = keras.RematScope(mode="larger_than", output_size_threshold=int(remat.split(":", 1)[1]))
    elif remat == "full":
        scope = keras.RematScope(mode="full")
    else:
        raise ValueError(f"unknown --remat {remat!r}: none, encoders, all, layers:A+B, larger_than:N or full")
    with scope:
        return shaspec_tf.build_segmenter(preset, **overrides)


_OP = re.compile(r"=\s*\(?(\w+)\[[^=]*?\s([\w-]+)\(")


def census(optimized: str) -> dict:
    """Op counts of an optimised HLO module, fused computations included: converts, layout changes (``copy``,
    ``transpose``), fusions, convolutions by result dtype, and custom calls by target and first result dtype
    (cuDNN's convolutions on a GPU)."""
    ops = collections.Counter()
    for line in optimized.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        dtype, op = match.groups()
        if op in ("convert", "copy", "transpose", "fusion"):
            ops[op] += 1
        elif op == "convolution":
            ops[f"convolution {dtype}"] += 1
        elif op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            ops[f"custom-call {target.group(1) if target else '?'} {dtype}"] += 1
    return dict(sorted(ops.items()))


def _norm_remat(mode: str) -> None:
    """Instance norms as the library has them (``off``), or rematerialised on low-precision inputs (``low``) or on
    every input (``all``)."""
    import keras

    from shaspec_tf.layers.norm import InstanceNormalization

    if not hasattr(InstanceNormalization, "library_call"):
        InstanceNormalization.library_call = InstanceNormalization.call

    def call(self, x):
        low = keras.backend.standardize_dtype(x.dtype) not in ("float32", "float64")
        if mode == "all" or (mode == "low" and low):
            return keras.remat(self.library_call)(x)
        return self.library_call(x)

    InstanceNormalization.call = InstanceNormalization.library_call if mode == "off" else call


def train_step_inputs(model, batch: int, crop):
    """``(model, x, regions, state)``: ``model`` compiled as training compiles it (SGD, XLA), a toy batch of
    ``batch`` crops with every modality present, and Keras' JAX state for ``model.train_step(state, (x, regions,
    None))``: what lowering or compiling the training step needs."""
    from shaspec_tf.data.toy import toy_batch
    from shaspec_tf.training.schedules import make_optimizer

    model.compile(optimizer=make_optimizer("sgd", 1e-2), jit_compile=True)
    images, regions = toy_batch(np.random.default_rng(0), batch, tuple(crop))
    x = {"image": images, "modality_mask": np.ones((batch, len(model.modalities)), np.float32)}
    model._symbolic_build(data_batch=(x, regions, None))
    model.optimizer.build(model.trainable_variables)
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True, optimizer_variables=True,
                                 metrics_variables=True)
    return model, x, regions, state


def measure(preset: str, crop, batch: int, policy: str, remat: str, compile_step: bool, top: int,
            overrides: dict, norm_remat: str = "off", steps: int = 0, dump: str = "",
            with_residuals: bool = True) -> dict:
    import jax

    _norm_remat(norm_remat)
    model, x, regions, state = train_step_inputs(build(preset, policy, remat, overrides), batch, crop)
    start = time.perf_counter()
    lowered = jax.jit(model.train_step).lower(state, (x, regions, None))
    report = {"preset": preset, "crop": list(crop), "batch": batch, "policy": policy, "remat": remat,
              "norm_remat": norm_remat, "lower_s": time.perf_counter() - start}
    text = lowered.compiler_ir("stablehlo").operation.get_asm(enable_debug_info=True, large_elements_limit=16)
    report.update(analyse_module(text, top))
    if with_residuals:
        try:  # jax internals (make_jaxpr of linearize, source_info_util): versions may differ
            report["residuals"] = residuals(model, state, x, regions, top)
        except Exception as error:  # noqa: BLE001  reported, the rest goes on
            report["residuals"] = {"error": f"{type(error).__name__}: {error}"}
    if compile_step:
        start = time.perf_counter()
        compiled = lowered.compile()
        report["compile_s"] = time.perf_counter() - start
        analysis = compiled.memory_analysis()
        report["memory_mib"] = {k: getattr(analysis, f"{k}_size_in_bytes") / 2 ** 20
                                for k in ("temp", "argument", "output", "alias", "generated_code")
                                if hasattr(analysis, f"{k}_size_in_bytes")}
        optimized = compiled.as_text()
        report["optimized"] = census(optimized)
        if dump:
            os.makedirs(dump, exist_ok=True)
            name = f"{preset}-{policy}-{remat}-norm_{norm_remat}".replace(":", "_")
            with open(os.path.join(dump, name + ".lowered.mlir"), "w") as f:
                f.write(text)
            with open(os.path.join(dump, name + ".optimized.hlo"), "w") as f:
                f.write(optimized)
        if steps:
            times = []
            for _ in range(steps + 1):
                start = time.perf_counter()
                logs, _ = compiled(state, (x, regions, None))
                jax.block_until_ready(logs)
                times.append(time.perf_counter() - start)
            report["step_s"] = {"first": times[0], "median": float(np.median(times[1:])), "steps": steps}
    return report


def _summary(r: dict) -> str:
    c, a = r["converts"], r["converts"]["activations"]
    res = r.get("residuals") or {"error": "not measured (--no-residuals)"}
    lines = [f"{r['preset']} {r['crop']} batch {r['batch']} {r['policy']} remat={r['remat']} "
             f"norm_remat={r['norm_remat']}: "
             f"{c['count']} converts moving {c['mib_moved']:.1f} MiB ({a['count']} of activations, "
             f"{a['mib_moved']:.1f} MiB); convolutions {r['convolutions']}; "
             + (f"backward keeps {res['mib']:.1f} MiB {({k: round(v, 1) for k, v in res['mib_by_dtype'].items()})} "
                f"beside {res['weights_mib']:.1f} MiB of weights" if "mib" in res else f"residuals: {res['error']}")
             + (f"; compiled temp {r['memory_mib']['temp']:.1f} MiB (compile {r['compile_s']:.0f} s)"
                if "memory_mib" in r else "")
             + (f"; step {r['step_s']['median'] * 1e3:.1f} ms" if "step_s" in r else "")]
    if "optimized" in r:
        lines.append(f"    optimised module: {r['optimized']}")
    for g in c["by_source"]:
        lines.append(f"    {g['mib_moved']:9.2f} MiB  {g['count']:4d}x  {g['direction']:10s} {g['phase']:8s} "
                     f"{g['source']}")
    if "mib" in res:
        lines.append("    largest residual sources: " + ", ".join(f"{g['source']} {g['mib']:.1f} MiB"
                                                              for g in res["largest"][:6]))
        lines.append("    residuals by top-level layer: " + ", ".join(f"{k} {v:.1f} MiB"
                                                                 for k, v in res["by_layer_mib"].items()))
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--crop", default="32,64,64", help="D,H,W (divisible by 16, 32, 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--policy", default="float32,mixed_bfloat16", help="Keras dtype policies, comma-separated")
    parser.add_argument("--remat", default="none", help="none, encoders, all, layers:A+B, larger_than:N, full; "
                        "comma-separated")
    parser.add_argument("--norm-remat", default="off", help="off, low, all (comma-separated): instance norms "
                        "rematerialised on low-precision inputs or on all")
    parser.add_argument("--steps", type=int, default=0, help="with --compile: time this many compiled steps")
    parser.add_argument("--no-residuals", action="store_true", help="skip the saved-residuals analysis")
    parser.add_argument("--dump", default="", help="with --compile: write the lowered and optimised modules here")
    parser.add_argument("--compile", action="store_true", help="also compile: XLA's memory analysis (slow on CPU)")
    parser.add_argument("--official-parity", action="store_true", help="the official_parity=True variant")
    parser.add_argument("--top", type=int, default=12, help="source lines listed per configuration")
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.compile:
        os.environ.setdefault("XLA_FLAGS", FAST_CPU_COMPILE)
    sys.path.insert(0, REPO)
    import keras

    if keras.backend.backend() != "jax":
        parser.error("run under KERAS_BACKEND=jax (the step is lowered with jax.jit)")
    crop = [int(v) for v in args.crop.split(",")]
    if len(crop) != 3 or args.batch < 1:
        parser.error("--crop is D,H,W and --batch at least 1")
    overrides = {"official_parity": True} if args.official_parity else {}
    reports = []
    norm_remats = [v.strip() for v in args.norm_remat.split(",")]
    if not set(norm_remats) <= {"off", "low", "all"}:
        parser.error(f"--norm-remat takes off, low, all (comma-separated), got {args.norm_remat!r}")
    if (args.steps or args.dump) and not args.compile:
        parser.error("--steps and --dump need --compile")
    for remat in args.remat.split(","):
        for norm_remat in norm_remats:
            for policy in args.policy.split(","):
                report = measure(args.preset, crop, args.batch, policy.strip(), remat.strip(), args.compile, args.top,
                                 overrides, norm_remat, args.steps, args.dump, not args.no_residuals)
                print(_summary(report), flush=True)
                reports.append(report)
    if args.out:
        with open(args.out + ".partial", "w") as f:
            json.dump({"schema": "shaspec-hlo-casts 1", "reports": reports}, f, indent=2)
        os.replace(args.out + ".partial", args.out)
    return reports


if __name__ == "__main__":
    main()
