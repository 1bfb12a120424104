"""Reports of the benchmark harness: ratios ours / official, the device's name, the printed table, and the merge of
the GPU script's parts into one ``summary.json`` (``python benchmarks/bench_report.py OUT_DIR [--gpu-info TEXT]``).

A part is one run of ``train_step_benchmark.py`` (its own JSON in OUT_DIR). Parts are merged by precision; a part
whose ``label`` is ``warm`` (a second process with the compilation cache the ``cold`` part filled) only adds its
first-step figures, under ``first_step`` (any label ending in ``warm``). A part run with ``--remat`` (its
``config.remat`` is not ``none``) goes under ``ours_remat`` -> precision, apart from the plain ``ours``, and adds
``remat_*`` ratios: ``remat_train_step``, ``remat_train_step_random``, ``remat_peak_memory`` (ours with remat /
official) and ``remat_step_over_plain``, ``remat_memory_over_plain`` (ours with remat / ours without). Our bf16
whole volume (part ``ours_bf16_infer``) is also set against the official fp32 loop: ``whole_volume_ours_bf16`` in
the fp32 ratios (the official bf16 part times training only).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

SUMMARY = "summary.json"
SUMMARY_SCHEMA = 1


def _ratio(a, b):
    try:
        return float(a) / float(b) if a is not None and b else None
    except (TypeError, ValueError):
        return None


def _remat_ratios(report: dict, precision: str) -> dict:
    remat = report.get("ours_remat", {}).get(precision, {}).get("train", {})
    if not remat:
        return {}
    ours = report.get("ours", {}).get(precision, {}).get("train", {})
    theirs = report.get("official", {}).get(precision, {}).get("train", {})
    step = lambda e, k="all_modalities": e.get(k, {}).get("median_s")  # noqa: E731
    peak = lambda e: e.get("peak_memory", {}).get("bytes")  # noqa: E731
    return {"remat": remat.get("remat"), "remat_train_step": _ratio(step(remat), step(theirs)),
            "remat_train_step_random": _ratio(step(remat, "random_modalities"), step(theirs, "random_modalities")),
            "remat_peak_memory": _ratio(peak(remat), peak(theirs)),
            "remat_step_over_plain": _ratio(step(remat), step(ours)),
            "remat_memory_over_plain": _ratio(peak(remat), peak(ours))}


def compute_ratios(report: dict) -> dict:
    ratios = {}
    for precision, theirs in report.get("official", {}).items():
        ours = report.get("ours", {}).get(precision, {})
        o_tr, t_tr = ours.get("train", {}), theirs.get("train", {})
        o_in, t_in = ours.get("infer", {}), theirs.get("infer", {})
        ratios[precision] = {
            "train_step": _ratio(o_tr.get("all_modalities", {}).get("median_s"),
                                 t_tr.get("all_modalities", {}).get("median_s")),
            "train_step_random": _ratio(o_tr.get("random_modalities", {}).get("median_s"),
                                        t_tr.get("random_modalities", {}).get("median_s")),
            "whole_volume": _ratio(o_in.get("median_s"), t_in.get("median_s")),
            "peak_memory": _ratio(o_tr.get("peak_memory", {}).get("bytes"), t_tr.get("peak_memory", {}).get("bytes")),
            "peak_memory_kind": [o_tr.get("peak_memory", {}).get("kind"), t_tr.get("peak_memory", {}).get("kind")],
            "architecture_match": (report.get("config") or {}).get("preset") == "paper",
        }
        ratios[precision].update(_remat_ratios(report, precision))
    if "fp32" in ratios:
        ours_bf16 = report.get("ours", {}).get("bf16", {}).get("infer", {}).get("median_s")
        theirs_fp32 = report.get("official", {}).get("fp32", {}).get("infer", {}).get("median_s")
        ratios["fp32"]["whole_volume_ours_bf16"] = _ratio(ours_bf16, theirs_fp32)
    return ratios


def card_of(report: dict) -> str:
    """The device the measurements ran on, as the workers named it (a GPU's name before a CPU's)."""
    names = [entry.get("device") for who in ("ours", "official") for parts in report.get(who, {}).values()
             for entry in parts.values() if isinstance(entry, dict) and entry.get("device")]
    gpus = [n for n in names if not n.startswith("cpu")]
    return (gpus or names or [None])[0]


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(report: dict) -> list:
    config = report.get("config") or {}
    lines = [f"backend {report.get('backend')}, preset {config.get('preset')}, crop "
             f"{'x'.join(map(str, config.get('crop') or []))}, batch {config.get('batch')}, jit {config.get('jit')}"]
    header = (f"{'model':9} {'prec':5} {'device':40} {'step med':>9} {'min':>7} {'max':>7} {'rand med':>9} "
              f"{'finite':>6} {'peak GiB':>9} {'volume s':>9} {'tiles':>5}")
    lines.append(header)
    for who in ("ours", "ours_remat", "official"):
        for precision, entry in report.get(who, {}).items():
            tr, inf = entry.get("train", {}), entry.get("infer", {})
            if ("error" in tr or not tr) and ("error" in inf or not inf):
                lines.append(f"{who:9} {precision:5} error: {(tr or inf).get('error', 'not measured')[:80]}")
                continue
            al, rd = tr.get("all_modalities", {}), tr.get("random_modalities", {})
            peak = tr.get("peak_memory", {})
            lines.append(f"{who:9} {precision:5} {str(tr.get('device', inf.get('device', '?')))[:40]:40} "
                         f"{_fmt(al.get('median_s')):>9} {_fmt(al.get('min_s')):>7} {_fmt(al.get('max_s')):>7} "
                         f"{_fmt(rd.get('median_s')):>9} {str(tr.get('all_finite', '-')):>6} "
                         f"{_fmt(peak.get('gib'), 2):>9}{'*' if peak.get('kind') == 'process_max_rss' else ' '}"
                         f"{_fmt(inf.get('median_s')):>9} {str(inf.get('tiles', '-')):>5}")
            for part in ("train", "infer"):
                if "error" in entry.get(part, {}):
                    lines.append(f"    {part} error: {entry[part]['error'][:200]}")
    data = report.get("data")
    if data:
        if "error" in data:
            lines.append(f"data: error {data['error'][:200]}")
        else:
            lines.append(f"data ({data['source']}): {_fmt(data.get('median_s'), 4)} s/batch median, "
                         f"{_fmt(data.get('batches_per_s'), 1)} batches/s, first batch {_fmt(data['first_batch_s'])} s")
    if any(e.get("train", {}).get("peak_memory", {}).get("kind") == "process_max_rss"
           for who in ("ours", "official") for e in report.get(who, {}).values()):
        lines.append("* peak memory is the process' maximum resident set size (CPU), not device memory")
    for precision, r in report.get("ratios", {}).items():
        lines.append(f"ours/official {precision}: train step {_fmt(r['train_step'], 2)}x, random-modality step "
                     f"{_fmt(r['train_step_random'], 2)}x, whole volume {_fmt(r['whole_volume'], 2)}x, peak memory "
                     f"{_fmt(r['peak_memory'], 2)}x" + ("" if r["architecture_match"] else
                                                        " (ours is not the paper preset: not like for like)"))
        if r.get("remat"):
            lines.append(f"ours remat={r['remat']}/official {precision}: train step "
                         f"{_fmt(r['remat_train_step'], 2)}x, random-modality step "
                         f"{_fmt(r['remat_train_step_random'], 2)}x, peak memory {_fmt(r['remat_peak_memory'], 2)}x; "
                         f"over ours without remat: step {_fmt(r['remat_step_over_plain'], 2)}x, peak memory "
                         f"{_fmt(r['remat_memory_over_plain'], 2)}x")
    return lines


def _first_step(entry: dict) -> dict:
    train = entry.get("train", {}) if isinstance(entry, dict) else {}
    if "first_step_s" not in train:
        return {"error": train.get("error", "not measured")}
    startup = train.get("startup", {})
    return {"first_step_s": train["first_step_s"], "to_first_step_s": startup.get("to_first_step_s"),
            "cache_entries_before": startup.get("cache_entries_before"), "import_s": startup.get("import_s"),
            "build_s": startup.get("build_s"), "phases": startup.get("first_step_phases")}


def merge_parts(folder: str, gpu_info: str = None) -> dict:
    """One summary of every part JSON in ``folder`` (see the module docstring)."""
    merged = {"schema": SUMMARY_SCHEMA, "gpu_info": gpu_info, "parts": {}, "ours": {}, "official": {},
              "ours_remat": {}, "first_step": {"ours": {}, "official": {}}}
    host_cpu = None
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.basename(path)[:-5]
        if os.path.basename(path) == SUMMARY:
            continue
        with open(path) as f:
            report = json.load(f)
        label = report.get("label") or name
        merged["parts"][name] = {"label": label, "argv": report.get("argv"),
                                 "errors": [f"{who} {p} {part}: {e['error']}" for who in ("ours", "official")
                                            for p, parts in report.get(who, {}).items()
                                            for part, e in parts.items() if isinstance(e, dict) and "error" in e]}
        if report.get("official_error"):
            merged["official_error"] = report["official_error"]
        for key in ("backend", "config"):
            merged.setdefault(key, report.get(key))
        host_cpu = host_cpu or (report.get("host") or {}).get("cpu")
        remat = (report.get("config") or {}).get("remat", "none") != "none"
        for who in ("ours", "official"):
            for precision, parts in report.get(who, {}).items():
                if label.endswith("warm") and who == "ours":
                    merged["first_step"]["ours"].setdefault(precision, {})["warm"] = _first_step(parts)
                    continue
                slot = merged["ours_remat" if remat and who == "ours" else who].setdefault(precision, {})
                for part, entry in parts.items():
                    if part not in slot or ("error" in slot[part] and "error" not in entry):
                        slot[part] = entry
    for who in ("ours", "official"):
        for precision, parts in merged[who].items():
            if "train" in parts:
                key = "cold" if who == "ours" else "first"
                merged["first_step"][who].setdefault(precision, {})[key] = _first_step(parts)
    for who in ("ours", "official"):
        for precision, runs in merged["first_step"][who].items():
            merged["first_step"][who][precision] = {k: runs[k] for k in ("cold", "warm", "first") if k in runs}
    if merged.get("config") is None:
        merged["config"] = {"preset": None}
    merged["ratios"] = compute_ratios(merged)
    for precision, ratios in merged["ratios"].items():
        ours = merged["first_step"]["ours"].get(precision, {})
        theirs = merged["first_step"]["official"].get(precision, {}).get("first", {})
        for key in ("cold", "warm"):
            ratios[f"first_step_{key}"] = _ratio(ours.get(key, {}).get("first_step_s"), theirs.get("first_step_s"))
    merged["card"] = (gpu_info.split(",")[0].strip() if gpu_info else None) or card_of(merged) or host_cpu
    return merged


def first_step_lines(merged: dict) -> list:
    lines = []
    for who in ("ours", "official"):
        for precision, runs in merged["first_step"][who].items():
            for kind, entry in runs.items():
                name = f"first step {who} {precision}" + ("" if kind == "first" else f" {kind}")
                if "error" in entry:
                    lines.append(f"{name}: {entry['error'][:120]}")
                else:
                    phases = entry.get("phases") or {}
                    split = ", ".join(f"{k[:-2].replace('_', ' ')} {_fmt(v, 1)} s" for k, v in phases.items() if v)
                    lines.append(f"{name}: {_fmt(entry['first_step_s'], 1)} s (from process start "
                                 f"{_fmt(entry.get('to_first_step_s'), 1)} s)" + (f"; of it {split}" if split else ""))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the folder of the part JSONs; summary.json is written there")
    parser.add_argument("--gpu-info", default=None, help="the card as nvidia-smi names it (name, memory, driver)")
    args = parser.parse_args(argv)
    merged = merge_parts(args.folder, args.gpu_info or None)
    with open(os.path.join(args.folder, SUMMARY), "w") as f:
        json.dump(merged, f, indent=1)
    print(f"card: {merged['card']}")
    print("\n".join(summary_lines(merged) + first_step_lines(merged)))
    return merged


if __name__ == "__main__":
    main()
