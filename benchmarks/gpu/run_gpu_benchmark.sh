#!/usr/bin/env bash
# The one prepared benchmark for the GPU host (JAX + PyTorch, no TensorFlow, no network): ours (Keras on JAX) and
# the official PyTorch ShaSpec, paper model, 80x160x160, batch 1, on the same GPU. See benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/run_gpu_benchmark.sh            # results under $OUT (default ./gpu_results)
#
# Needs, in the repository root: .whl/ (keras 3.12.4, namex 0.1.0, optree 0.20.0 wheels for cp312) and .official/
# (DualNet_SS.py, Res50.py, dsn.py, loss_Dual.py of github.com/billhhh/ShaSpec), both carried (git-ignored).
# Environment knobs: BENCH_STEPS (5), BENCH_WARMUP (2), BENCH_TIMEOUT (per measurement, s), BENCH_PLAN (default
# "official jit nojit"; any subset, in order), BENCH_NOJIT_STEPS (2), PYTHON (python3), BENCH_BUDGET_S (450: no
# measurement starts, or runs, past START + budget; the official runs must end by START + BENCH_OFFICIAL_S (170);
# the no-jit run only starts with 120 s left).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${BENCH_STEPS:-5}
WARMUP=${BENCH_WARMUP:-2}
TIMEOUT=${BENCH_TIMEOUT:-300}
PLAN=${BENCH_PLAN:-official jit nojit}
NOJIT_STEPS=${BENCH_NOJIT_STEPS:-2}
BUDGET=${BENCH_BUDGET_S:-450}
OFFICIAL_S=${BENCH_OFFICIAL_S:-170}
START=$(date +%s)
LOG="$OUT/gpu_benchmark.log"
log() { echo "$@" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

log "== $(date -u +%FT%TZ) host $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$LOG"

# 1. Keras and its two missing pure-Python/compiled dependencies, from the carried wheels.
if ! "$PY" -c "import keras" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || { log "pip install of .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    log "keras is missing and no .whl/ folder was carried"; exit 1
  fi
fi
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.util, jax, keras, torch
print("versions: jax", jax.__version__, "| keras", keras.__version__, "| torch", torch.__version__,
      "| tensorflow", "present" if importlib.util.find_spec("tensorflow") else "absent")
print("devices: jax", jax.devices(), "| torch", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")
EOF

# 2. The official code (carried as .official/, or given by OFFICIAL_SHASPEC_DIR).
OFFICIAL=${OFFICIAL_SHASPEC_DIR:-$PWD/.official}
OFFICIAL_ARGS=()
if [ -f "$OFFICIAL/DualNet_SS.py" ]; then OFFICIAL_ARGS=(--official "$OFFICIAL"); else log "no official code at $OFFICIAL: ours only"; fi

BENCH=(benchmarks/train_step_benchmark.py --backend jax --preset paper --crop 80,160,160 --batch 1
       --volume 155,240,240 --overlap 0.3333333333 --sw-batch-size 4 --infer-reps 2 --timeout "$TIMEOUT")
run() {  # name, then harness arguments
  local name=$1; shift
  log "== $name (t=$(elapsed) s): ${BENCH[*]} $*"
  "$PY" "${BENCH[@]}" "$@" --out "$OUT/$name.json" 2>&1 | tee -a "$LOG"
}

for part in $PLAN; do
  case $part in
    official)  # the official model alone first (fp32, bf16 autocast): PyTorch and JAX never share the GPU
      [ ${#OFFICIAL_ARGS[@]} -gt 0 ] && run official --skip ours,data --precision fp32,bf16 --steps "$STEPS" \
        --warmup "$WARMUP" "${OFFICIAL_ARGS[@]}" --deadline $(( START + OFFICIAL_S )) ;;
    jit)       # ours, XLA, fp32 and mixed_bfloat16; data loading (NumPy stand-in: no TensorFlow here)
      run ours_jit --jit --precision fp32,bf16 --steps "$STEPS" --warmup "$WARMUP" --data-batches 5 \
        --data-case-shape 128,192,160 --deadline $(( START + BUDGET )) ;;
    nojit)     # ours, op-by-op JAX, fp32, training only, if time remains
      if [ $(( BUDGET - $(elapsed) )) -ge 120 ]; then
        run ours_nojit --no-jit --precision fp32 --steps "$NOJIT_STEPS" --warmup 1 --random-steps "$NOJIT_STEPS" \
          --skip infer,data --deadline $(( START + BUDGET )) 
      else log "== ours_nojit skipped: $(elapsed) s used of the $BUDGET s budget"; fi ;;
    *) log "unknown plan entry $part" ;;
  esac
done

# 3. One table over every result, ratios ours/official last.
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
import glob, json, os, sys
sys.path.insert(0, "benchmarks")
import train_step_benchmark as tsb
merged = {"ours": {}, "official": {}}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    if os.path.basename(path) == "summary.json":
        continue
    report = json.load(open(path))
    name = os.path.basename(path)[:-5]
    print(f"--- {name}")
    print("\n".join(tsb.summary_lines(report)))
    for who in ("ours", "official"):
        for precision, entry in report.get(who, {}).items():
            key = precision if who == "official" or report["config"]["jit"] else f"{precision}_nojit"
            if key not in merged[who] or "error" not in entry.get("train", {}):
                merged[who][key] = entry
    merged.setdefault("config", report["config"])
    if report.get("data"):
        merged["data"] = report["data"]
merged["config"] = dict(merged.get("config", {}), preset="paper")
merged["ratios"] = tsb.compute_ratios(merged)
json.dump(merged, open(os.path.join(sys.argv[1], "summary.json"), "w"), indent=1)
print("=== ours (jit) / official, same GPU:")
for precision, r in merged["ratios"].items():
    print(f"{precision}: train step {tsb._fmt(r['train_step'], 2)}x, random-modality step "
          f"{tsb._fmt(r['train_step_random'], 2)}x, whole volume {tsb._fmt(r['whole_volume'], 2)}x, "
          f"peak memory {tsb._fmt(r['peak_memory'], 2)}x")
EOF
log "== done in $(elapsed) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
