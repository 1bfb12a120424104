"""The training-step benchmark harness (benchmarks/train_step_benchmark.py) runs and writes the documented JSON."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import train_step_benchmark as tsb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite_number(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_tile_starts_come_from_the_package_and_crops_match():
    import itertools

    from shaspec_tf.inference import window_starts
    from shaspec_tf.models.presets import SEGMENTER_PRESETS

    assert not hasattr(tsb, "window_starts")  # no copy of the rule: the driver hands the tiles to the workers
    tiles = tsb.tile_starts((155, 240, 240), (80, 160, 160), 1 / 3)
    assert len(tiles) == 12 and tiles[0] == [0, 0, 0] and tiles[-1] == [75, 80, 80]
    for volume, roi in [((40, 20, 96), (32, 32, 48)), ((32, 70, 155), (32, 64, 80))]:
        expected = [list(t) for t in itertools.product(*(window_starts(v, r, 1 / 3) for v, r in zip(volume, roi)))]
        assert tsb.tile_starts(volume, roi, 1 / 3) == expected
    for preset, crop in tsb.PRESET_CROPS.items():
        assert tuple(crop) == tuple(SEGMENTER_PRESETS[preset]["crop_size"])


def test_random_masks_keep_at_least_one_modality():
    masks = np.stack([tsb.random_masks(np.random.default_rng(i), 3) for i in range(50)])
    assert masks.shape == (50, 3, 4) and set(np.unique(masks)) <= {0.0, 1.0}
    assert masks.sum(-1).min() >= 1 and masks.sum(-1).max() == 4


def _check_train(entry):
    for key in tsb.TRAIN_KEYS:
        assert key in entry, key
    for run in ("all_modalities", "random_modalities"):
        assert entry[run]["n"] == 1
        for key in ("median_s", "min_s", "max_s"):
            assert _finite_number(entry[run][key]) and entry[run][key] > 0
    assert len(entry["losses"]) == 1 + 1 + 1 and all(math.isfinite(v) for v in entry["losses"])
    assert entry["all_finite"] is True
    assert entry["peak_memory"]["kind"] == "process_max_rss" and entry["peak_memory"]["bytes"] > 0
    startup = entry["startup"]
    assert set(tsb.STARTUP_KEYS) <= set(startup) and startup["compile_cache"] is None
    assert startup["to_first_step_s"] > startup["first_step_s"] == entry["first_step_s"] > 0


def _run(tmp_path, backend, *extra, env=None):
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_step_benchmark.py"), "--backend", backend,
           "--preset", "tiny", "--steps", "1", "--random-steps", "1", "--warmup", "1", "--no-jit",
           "--volume", "32,80,64", "--infer-reps", "1", "--data-batches", "2", "--data-cases", "1",
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_harness_on_jax_without_tensorflow_writes_the_documented_json(tmp_path):
    """The GPU host's situation: Keras on JAX with TensorFlow not importable; training, inference and (NumPy)
    data loading all run, each in its own subprocess, and the package never imports TensorFlow."""
    pytest.importorskip("jax")
    report, stdout = _run(tmp_path, "jax", env={tsb.BLOCK_TF_ENV: "1"})
    assert report["schema"] == tsb.SCHEMA and report["backend"] == "jax"
    assert report["config"]["crop"] == [32, 64, 64] and report["host"]["tensorflow_blocked"] is True
    entry = report["ours"]["fp32"]
    _check_train(entry["train"])
    assert entry["train"]["backend"] == "jax" and entry["train"]["params"] > 0
    # the first step's split as JAX reports it: every phase named, tracing at least once, within the step's time
    phases = entry["train"]["startup"]["first_step_phases"]
    assert set(phases) == set(tsb.JAX_PHASES.values()) and all(v >= 0 for v in phases.values())
    assert 0 < phases["trace_s"] <= sum(phases.values()) <= entry["train"]["first_step_s"]
    infer = entry["infer"]
    for key in tsb.INFER_KEYS:
        assert key in infer, key
    assert infer["tiles"] == 2 and infer["output_finite"] is True and _finite_number(infer["median_s"])
    data = report["data"]
    for key in tsb.DATA_KEYS:
        assert key in data, key
    assert data["source"] == "numpy" and _finite_number(data["median_s"])
    assert report["official"] == {} and report["ratios"] == {}
    assert "ours      fp32" in stdout


@pytest.mark.tensorflow
def test_harness_on_tensorflow_times_the_tf_data_pipeline(tmp_path):
    report, _ = _run(tmp_path, "tensorflow", "--skip", "infer", "--data-case-shape", "40,72,72")
    _check_train(report["ours"]["fp32"]["train"])
    assert "first_step_phases" not in report["ours"]["fp32"]["train"]["startup"]  # JAX's events only
    assert "infer" not in report["ours"]["fp32"]
    assert report["data"]["source"] == "tfdata" and report["data"]["n"] == 2
    assert _finite_number(report["data"]["median_s"]) and report["data"]["case_shape"] == [40, 72, 72]


def test_ratios_and_summary_with_an_official_entry():
    train = lambda s: {"all_modalities": {"median_s": s}, "random_modalities": {"median_s": 2 * s},  # noqa: E731
                       "peak_memory": {"bytes": 100, "gib": 1e-7, "kind": "device_peak_bytes_in_use"}}
    report = {"backend": "jax", "config": {"preset": "paper", "crop": [80, 160, 160], "batch": 1, "jit": True},
              "ours": {"fp32": {"train": train(0.5), "infer": {"median_s": 2.0, "tiles": 12}}},
              "official": {"fp32": {"train": train(0.4), "infer": {"median_s": 1.0, "tiles": 12}}}}
    report["ratios"] = tsb.compute_ratios(report)
    r = report["ratios"]["fp32"]
    assert r["train_step"] == pytest.approx(1.25) and r["whole_volume"] == pytest.approx(2.0)
    assert r["peak_memory"] == pytest.approx(1.0) and r["architecture_match"] is True
    assert tsb.summary_lines(report)[-1].startswith("ours/official fp32: train step 1.25x")


def test_the_gpu_script_parses():
    script = os.path.join(REPO, "benchmarks", "gpu", "run_gpu_benchmark.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def _part(label, who, precision, train=None, infer=None, device="gpu: NVIDIA H200", remat=None):
    parts = {}
    if train is not None:
        parts["train"] = {"device": device, "first_step_s": train[0], "startup": {"to_first_step_s": train[1]},
                          "all_modalities": {"median_s": train[2]}, "random_modalities": {"median_s": train[2]},
                          "peak_memory": {"bytes": train[3], "kind": "device_peak_bytes_in_use"}}
    if infer is not None:
        parts["infer"] = {"device": device, "median_s": infer, "tiles": 12}
    config = {"preset": "paper", "crop": [80, 160, 160], "batch": 1, "jit": True}
    if remat:
        config["remat"] = remat
        parts["train"]["remat"] = remat
    return {"label": label, "backend": "jax", "config": config,
            "host": {"cpu": "cpu: test x2"}, "ours": {}, "official": {}, who: {precision: parts}}


def test_report_merges_the_gpu_parts_with_first_steps_cold_and_warm(tmp_path):
    from benchmarks import bench_report

    parts = {"official_fp32": _part("official_fp32", "official", "fp32", (44.0, 60.0, 0.4, 100), 0.4),
             "ours_fp32_cold": _part("ours_fp32_cold", "ours", "fp32", (88.0, 100.0, 0.2, 60)),
             "ours_fp32_warm": _part("ours_fp32_warm", "ours", "fp32", (4.0, 9.0, 0.3, 50)),
             "ours_fp32_infer": _part("ours_fp32_infer", "ours", "fp32", infer=0.2)}
    parts["ours_fp32_warm"]["ours"]["fp32"]["train"]["startup"]["first_step_phases"] = {
        "trace_s": 2.5, "lower_s": 1.0, "xla_compile_s": 0.0, "cache_load_s": 0.3}
    for name, report in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    merged = bench_report.main([str(tmp_path), "--gpu-info", "NVIDIA H200, 143771 MiB, 570.1"])
    assert merged["card"] == "NVIDIA H200"
    assert merged == json.loads((tmp_path / "summary.json").read_text())
    first = merged["first_step"]
    assert first["ours"]["fp32"]["cold"]["first_step_s"] == 88.0
    assert first["ours"]["fp32"]["warm"] == {"first_step_s": 4.0, "to_first_step_s": 9.0, "cache_entries_before": None,
                                             "import_s": None, "build_s": None,
                                             "phases": {"trace_s": 2.5, "lower_s": 1.0, "xla_compile_s": 0.0,
                                                        "cache_load_s": 0.3}}
    assert ("first step ours fp32 warm: 4.0 s (from process start 9.0 s); of it trace 2.5 s, lower 1.0 s, cache "
            "load 0.3 s") in bench_report.first_step_lines(merged)
    assert first["official"]["fp32"]["first"]["first_step_s"] == 44.0
    # the warm part adds only its first step: the train figures are the cold part's
    assert merged["ours"]["fp32"]["train"]["all_modalities"]["median_s"] == 0.2
    r = merged["ratios"]["fp32"]
    assert r["train_step"] == pytest.approx(0.5) and r["whole_volume"] == pytest.approx(0.5)
    assert r["peak_memory"] == pytest.approx(0.6) and r["first_step_cold"] == pytest.approx(2.0)
    assert r["first_step_warm"] == pytest.approx(4.0 / 44.0) and r["architecture_match"] is True
    assert set(merged["parts"]) == set(parts) and all(p["errors"] == [] for p in merged["parts"].values())
    assert r["whole_volume_ours_bf16"] is None  # no bf16 window measured
    # our bf16 window is set against the official fp32 loop (the official bf16 part times training only)
    (tmp_path / "ours_bf16_infer.json").write_text(json.dumps(_part("ours_bf16_infer", "ours", "bf16", infer=0.15)))
    again = bench_report.merge_parts(str(tmp_path))
    assert again["ratios"]["fp32"]["whole_volume_ours_bf16"] == pytest.approx(0.375)
    assert again["ratios"]["fp32"]["whole_volume"] == pytest.approx(0.5)
    # without nvidia-smi the card is the device the workers named
    assert bench_report.merge_parts(str(tmp_path))["card"] == "gpu: NVIDIA H200"


def test_report_keeps_the_remat_part_apart_with_its_own_ratios(tmp_path):
    from benchmarks import bench_report

    parts = {"official_fp32": _part("official_fp32", "official", "fp32", (44.0, 60.0, 0.4, 100), 0.4),
             "ours_fp32_cold": _part("ours_fp32_cold", "ours", "fp32", (88.0, 100.0, 0.2, 90)),
             "ours_fp32_remat": _part("ours_fp32_remat", "ours", "fp32", (95.0, 110.0, 0.25, 50), remat="encoders")}
    for name, report in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    merged = bench_report.merge_parts(str(tmp_path))
    # the plain figures stay the plain part's; the remat part has its own slot
    assert merged["ours"]["fp32"]["train"]["all_modalities"]["median_s"] == 0.2
    assert merged["ours_remat"]["fp32"]["train"]["all_modalities"]["median_s"] == 0.25
    assert merged["first_step"]["ours"]["fp32"]["cold"]["first_step_s"] == 88.0
    r = merged["ratios"]["fp32"]
    assert r["train_step"] == pytest.approx(0.5) and r["peak_memory"] == pytest.approx(0.9)
    assert r["remat"] == "encoders"
    assert r["remat_train_step"] == pytest.approx(0.625) and r["remat_peak_memory"] == pytest.approx(0.5)
    assert r["remat_step_over_plain"] == pytest.approx(1.25) and r["remat_memory_over_plain"] == pytest.approx(50 / 90)
    lines = bench_report.summary_lines(merged)
    assert any(line.startswith("ours_remat fp32") for line in lines)
    assert lines[-1] == ("ours remat=encoders/official fp32: train step 0.62x, random-modality step 0.62x, peak "
                         "memory 0.50x; over ours without remat: step 1.25x, peak memory 0.56x")


def test_gpu_script_runs_the_remat_part_only_with_time_left(tmp_path):
    """The gate of ours_fp32_remat: with less than BENCH_REMAT_MIN_S left of the budget it is logged as skipped and
    nothing runs (the other gated parts, the bf16 pair, work the same way)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BENCH_PLAN="ours_fp32_remat", BENCH_BUDGET_S="100",
               BENCH_REMAT_MIN_S="120", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu", "run_gpu_benchmark.sh")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (out / "gpu_benchmark.log").read_text()
    assert "== ours_fp32_remat skipped: " in log and "--remat" not in log
    assert not (out / "ours_fp32_remat.json").exists()


def test_official_part_says_why_it_was_skipped(tmp_path):
    code = tmp_path / "official"
    code.mkdir()
    no_code = tsb.main(["--backend", "jax", "--preset", "tiny", "--skip", "ours,data", "--official", str(code)])
    assert no_code["official_error"].startswith("skipped: no official code (DualNet_SS.py) in ")
    (code / "DualNet_SS.py").write_text("")
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    report = tsb.main(["--backend", "jax", "--preset", "tiny", "--skip", "ours,data,infer", "--precision", "fp32,bf16",
                       "--official", str(code), "--official-python", str(no_torch), "--out", str(tmp_path / "r.json")])
    assert report["official_error"].startswith("skipped: torch not installed")
    assert report["official"] == {p: {"train": {"error": report["official_error"]}} for p in ("fp32", "bf16")}
    assert json.loads((tmp_path / "r.json").read_text())["official_error"] == report["official_error"]


@pytest.mark.slow  # about 25 s: the script starts Python and JAX several times
def test_gpu_script_dry_run_writes_one_summary(tmp_path):
    """The script's plumbing on this machine: the official part (no code here) is recorded as skipped, the parts are
    merged into summary.json with a card, and nothing is left in the script's temporary compilation cache."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BENCH_PRESET="tiny", BENCH_VOLUME="32,64,64",
               BENCH_PLAN="official_fp32", OFFICIAL_SHASPEC_DIR=str(tmp_path / "none"), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu", "run_gpu_benchmark.sh")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["official_error"].startswith("skipped: no official code")
    assert summary["card"] and summary["parts"]["official_fp32"]["label"] == "official_fp32"
    assert summary["config"]["preset"] == "tiny" and summary["config"]["volume"] == [32, 64, 64]
    assert "== done in" in (out / "gpu_benchmark.log").read_text()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("shaspec-bench-cache")]


def test_phantom_study_scores_regions_over_subsets_and_each_subset_over_regions():
    from benchmarks import phantom_brats_learning as pbl
    from shaspec_tf.models.presets import SEGMENTER_PRESETS

    def dice(et, wt, tc):
        return {"ET": {"dice": et, "hd95": 1.0}, "WT": {"dice": wt, "hd95": 2.0}, "TC": {"dice": tc, "hd95": None}}

    summary = {"t1": dice(0.2, 0.5, 0.3), "flair": dice(0.4, 0.9, 0.5), "mean": dice(9, 9, 9)}
    scores = pbl.scores_of(summary, ["t1", "flair"])
    assert scores["ET"] == pytest.approx(30.0) and scores["WT"] == pytest.approx(70.0)
    assert scores["t1"] == pytest.approx(100 / 3, abs=1e-4) and scores["mean"] == pytest.approx(140 / 3, abs=1e-4)
    args = type("A", (), dict(preset="tiny", steps=4, crop=(16, 32, 32), warmup_steps=1,
                              dedicated=list(pbl.DEDICATED), runs=None))()
    runs = pbl.runs(args)
    assert [r.name for r in runs[:5]] == ["shaspec", "baseline", "linear-fusion", "encoded-absent", "zeros-absent"]
    assert [r.subsets for r in runs[5:]] == [(s,) for s in pbl.DEDICATED] and runs[0].subsets is None
    assert all(r.options["regime"] == "dedicated" and "warmup_steps" not in r.options for r in runs[5:])
    # every run names absent_features, so that a work folder of models trained before the option never resumes
    assert all(r.options["model_options"]["absent_features"] in ("zeros", "detached", "encoded") for r in runs)
    # the ablations are ShaSpec with one option changed, trained as ShaSpec is
    default = runs[0].options["model_options"]
    assert default == {"absent_features": SEGMENTER_PRESETS["small"]["absent_features"]}  # the library's default
    assert runs[2].subsets is None and runs[2].options == dict(runs[0].options,
                                                               model_options=dict(default, fusion_kernel=1))
    assert runs[3].options == dict(runs[0].options, model_options={"absent_features": "encoded"})
    assert runs[4].options == dict(runs[0].options, model_options={"absent_features": "zeros"})
    args.runs = ["encoded-absent", "shaspec"]
    assert [r.name for r in pbl.runs(args)] == ["shaspec", "encoded-absent"]
    # on request only: the T1-dedicated model under the other absent routes, trained as dedicated-t1 is
    args.runs = ["dedicated-t1", "dedicated-t1-encoded"]
    dedicated, encoded = pbl.runs(args)
    assert encoded.options == dict(dedicated.options, model_options={"absent_features": "encoded"})
    assert encoded.subsets == ("t1",)
    args.runs = ["shaspc"]
    with pytest.raises(SystemExit, match="unknown run"):
        pbl.runs(args)


def test_study_statistics_and_paired_verdicts():
    from benchmarks import study

    mean, std = study.mean_std([90.0, 92.0, 94.0])
    assert mean == pytest.approx(92.0) and std == pytest.approx(2.0)       # sample standard deviation (n - 1)
    better = study.paired([95.0, 96.0, 97.0, 95.5, 96.5], [90.0, 92.0, 91.0, 90.5, 91.0])
    assert better["verdict"] == "better" and better["p"] < 0.05 and better["diff_mean"] == pytest.approx(5.1)
    noisy = study.paired([95.0, 90.0, 96.0, 89.0, 93.0], [93.0, 93.0, 92.0, 94.0, 91.0])
    assert noisy["verdict"] == "tie" and noisy["p"] > 0.05
    assert study.paired([90.0, 91.0], [92.0, 93.0])["verdict"] == "worse"   # the same difference on every seed
    assert study.paired([90.0], [80.0])["verdict"] == "tie"                # one seed decides nothing


def test_a_study_resumes_from_its_results_and_tables_them(tmp_path):
    from benchmarks import study

    runs = [study.Run("ref", {"drop_rate": 1.0}, label="reference"),
            study.Run("other", {"drop_rate": 0.0}),
            study.Run("dedicated", {"subset": "a"}, subsets=("a",))]
    calls = []

    def fake(run, seed, folder):
        calls.append((run.name, seed))
        base = {"ref": 90.0, "other": 80.0, "dedicated": 85.0}[run.name] + seed
        return {"a": base, "a+b": base + 5} if run.subsets is None else {"a": base}

    work = str(tmp_path / "work")
    first = study.run_study(runs[:2], [0, 1, 2], work, fake, log=lambda m: None)
    assert len(calls) == 6 and first["ref"][2] == {"a": 92.0, "a+b": 97.0}
    calls.clear()
    again = study.run_study(runs, [0, 1, 2], work, fake, log=lambda m: None)     # only the new run trains
    assert calls == [("dedicated", 0), ("dedicated", 1), ("dedicated", 2)] and again["other"] == first["other"]
    renamed = [study.Run("same-options", {"drop_rate": 0.0})]                    # results follow the options
    assert study.run_study(renamed, [0], work, fake, log=lambda m: None)["same-options"][0] == first["other"][0]
    summary = study.summarise(again, runs, reference="ref")
    assert summary["runs"]["dedicated"]["a"]["mean"] == pytest.approx(86.0) and "a+b" not in summary["paired"][
        "dedicated"]
    assert summary["paired"]["other"]["a"]["verdict"] == "better"
    lines = study.markdown_table(summary, runs, ["a", "a+b"])
    assert lines[2].startswith("| **reference** | 91.00 ± 1.00 | 96.00 ± 1.00 |")
    assert "(▲ +10.00)" in lines[3] and lines[4].endswith("| 86.00 ± 1.00 (▲ +5.00) |  |")
    study.plot_study(summary, runs, ["a", "a+b"], str(tmp_path / "study.png"), "test")
    import matplotlib.image

    assert matplotlib.image.imread(str(tmp_path / "study.png")).shape[2] in (3, 4)
