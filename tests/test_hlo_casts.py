"""``benchmarks/hlo_casts.py``: its reading of lowered and optimised XLA modules, and one run on the tiny segmenter
under JAX (a child process) showing where a bfloat16 step casts and what its backward pass keeps;
``benchmarks/remat_memory.py``: its ratios and fit, and what the ``remat`` option saves in the compiled step."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import hlo_casts  # noqa: E402
import remat_memory  # noqa: E402

NORM = os.path.join(REPO, "shaspec_tf", "layers", "norm.py")
MODULE = f"""
    %0 = stablehlo.convert %arg1 : (tensor<1x8x8x8x4xbf16>) -> tensor<1x8x8x8x4xf32> loc(#loc7)
    %1 = stablehlo.convert %0 : (tensor<1x8x8x8x4xf32>) -> tensor<1x8x8x8x4xbf16> loc(#loc8)
    %2 = stablehlo.convert %arg0 : (tensor<3x3x3x4x4xf32>) -> tensor<3x3x3x4x4xbf16> loc(#loc9)
    %3 = stablehlo.convolution(%1, %2) dim_numbers = [b, 0, 1, 2, f]x[0, 1, 2, i, o]->[b, 0, 1, 2, f] : \
(tensor<1x8x8x8x4xbf16>, tensor<3x3x3x4x4xbf16>) -> tensor<1x8x8x8x4xbf16> loc(#loc9)
#loc1 = loc("{NORM}":40:0)
#loc2 = loc("/venv/site-packages/keras/src/backend/jax/core.py":268:0)
#loc3 = loc(callsite(#loc2 at #loc1))
#loc7 = loc("jit(step)/jvp(flair_encoder)/stem/norm/convert_element_type"(#loc3))
#loc8 = loc("jit(step)/transpose(jvp(flair_encoder))/stem/norm/convert_element_type"(#loc3))
#loc9 = loc("jit(step)/jvp(flair_encoder)/stem/conv/conv/convert_element_type"(#loc2))
"""


def test_converts_are_grouped_by_our_source_line_direction_and_phase():
    report = hlo_casts.analyse_module(MODULE, top=10)
    converts = report["converts"]
    assert converts["count"] == 3
    # the two activation casts (2048 elements, 6 bytes each way), not the kernel's
    assert converts["activations"]["count"] == 2
    assert abs(converts["activations"]["mib_moved"] - 2 * 2048 * 6 / 2 ** 20) < 1e-9
    groups = {(g["source"], g["direction"], g["phase"]): g["count"] for g in converts["by_source"]}
    ours = "shaspec_tf/layers/norm.py:40 <- keras/src/backend/jax/core.py:268"
    assert groups[(ours, "bf16->f32", "forward")] == 1 and groups[(ours, "f32->bf16", "backward")] == 1
    assert groups[("keras/src/backend/jax/core.py:268", "f32->bf16", "forward")] == 1
    assert report["convolutions"] == {"bf16xbf16": 1}


def test_the_optimised_module_census_counts_casts_layouts_and_cudnn_calls():
    text = """
  %convert.1 = f32[] convert(f32[] %a)
  convert.2 = f32[1,1,1,32,8]{4,3,2,1,0} convert(multiply.3), metadata={op_name="x = y"}
  %custom-call.1 = (bf16[1,80,160,160,64]{4,3,2,1,0}, u8[0]{0}) custom-call(bf16[1,80,160,160,4]{4,3,2,1,0} %p), \
custom_call_target="__cudnn$convForward"
  %fusion.3 = (f32[2]{0}, f32[3]{0}) fusion(f32[2] %a), kind=kLoop, calls=%fused
  %convolution.2 = bf16[1,2,2]{2,1,0} convolution(bf16[1,2,2] %a, bf16[3] %b), window={size=3}
  %transpose.1 = f32[2,3]{0,1} transpose(f32[3,2]{1,0} %x), dimensions={1,0}
  %copy.4 = f32[2,3]{1,0} copy(f32[2,3]{0,1} %transpose.1)"""
    assert hlo_casts.census(text) == {"convert": 2, "convolution bf16": 1, "copy": 1, "fusion": 1, "transpose": 1,
                                      "custom-call __cudnn$convForward bf16": 1}


@pytest.mark.slow
def test_tiny_segmenter_bf16_step_casts_around_every_instance_norm(tmp_path):
    """The finding of issue 16 on the tiny model: a mixed_bfloat16 step converts every instance norm's input to
    float32 and back (forward and backward), and float32 has no activation casts; before XLA's fusion, the
    backward pass of the bfloat16 step keeps float32 intermediates of the norms."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "hlo_casts.py"), "--crop", "32,32,32",
                           "--top", "40", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, KERAS_BACKEND="jax"))
    assert done.returncode == 0, done.stderr[-3000:]
    fp32, bf16 = json.loads(out.read_text())["reports"]
    assert (fp32["policy"], bf16["policy"]) == ("float32", "mixed_bfloat16")
    assert fp32["converts"]["activations"]["count"] == 0 and fp32["convolutions"] == {"f32xf32": 349}
    assert bf16["convolutions"] == {"bf16xbf16": 349}
    norm = [g for g in bf16["converts"]["by_source"] if g["source"].startswith("shaspec_tf/layers/norm.py")]
    phases = {(g["direction"], g["phase"]): g["count"] for g in norm}
    # 107 instance norms: input cast up and output cast down in the forward pass, and their transposes
    assert phases[("bf16->f32", "forward")] == phases[("f32->bf16", "forward")] == 107
    assert phases[("bf16->f32", "backward")] == phases[("f32->bf16", "backward")] == 107
    assert bf16["residuals"]["mib_by_dtype"]["float32"] > bf16["residuals"]["mib_by_dtype"]["bfloat16"]
    assert bf16["residuals"]["mib"] < fp32["residuals"]["mib"]
    kept = [g["source"] for g in bf16["residuals"]["largest"][:2]]
    assert all(s.startswith("shaspec_tf/layers/norm.py") and s.endswith("float32") for s in kept), kept
    assert {"shared_encoder", "flair_encoder", "decoder"} <= set(bf16["residuals"]["by_layer_mib"])


# -- benchmarks/remat_memory.py: what the segmenter's remat option saves ----------------------------------------------

def _report(crop, remat, temp, peak, kept, policy="float32"):
    return {"crop": crop, "voxels": int(np.prod(crop)), "policy": policy, "remat": remat, "kept_mib": kept,
            "memory_mib": {"temp": temp, "peak_estimate": peak}}


def test_remat_ratios_and_the_linear_fit_in_voxels():
    reports = [_report([32, 64, 64], "none", 100.0, 150.0, 80.0), _report([32, 64, 64], "encoders", 60.0, 110.0, 40.0),
               _report([64, 64, 64], "none", 180.0, 230.0, 160.0),
               _report([64, 64, 64], "encoders", 100.0, 150.0, 80.0)]
    remat_memory.add_ratios(reports)
    assert reports[1]["ratio"] == pytest.approx({"kept": 0.5, "temp": 0.6, "peak_estimate": 110 / 150})
    assert reports[0]["ratio"] == pytest.approx({"kept": 1.0, "temp": 1.0, "peak_estimate": 1.0})
    # temp = 20 + 80 * voxels / 131072 without remat, 20 + 40 * voxels / 131072 with: at 4x the small crop's voxels
    fitted = {e["remat"]: e for e in remat_memory.fit(reports, [64, 64, 128])}
    assert fitted["none"]["temp_mib"] == pytest.approx(340.0) and fitted["encoders"]["temp_mib"] == pytest.approx(180)
    assert fitted["encoders"]["ratio"]["temp"] == pytest.approx(180 / 340)
    assert fitted["encoders"]["from_crops"] == [[32, 64, 64], [64, 64, 64]]


@pytest.mark.slow
def test_recomputed_encoders_shrink_the_compiled_step_of_the_tiny_segmenter(tmp_path):
    """XLA's own memory analysis of the jitted train step (about 40 s: two compilations): with the encoders
    recomputed, the backward pass keeps less than half the bytes and the compiled step needs less temporary memory;
    the arguments (weights, optimiser state, batch) are the same."""
    out = tmp_path / "remat.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "remat_memory.py"), "--crop", "32,32,32",
                           "--policy", "float32", "--remat", "none,encoders", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, KERAS_BACKEND="jax"))
    assert done.returncode == 0, done.stderr[-3000:]
    plain, remat = json.loads(out.read_text())["reports"]
    assert (plain["remat"], remat["remat"]) == ("none", "encoders") and plain["params"] == remat["params"]
    assert remat["ratio"]["kept"] < 0.5
    assert remat["ratio"]["temp"] < 0.95 and remat["ratio"]["peak_estimate"] < 1.0
    assert remat["memory_mib"]["argument"] == pytest.approx(plain["memory_mib"]["argument"])
    assert remat["memory_mib"]["alias"] > 0  # the state is donated, as Keras' trainer does
