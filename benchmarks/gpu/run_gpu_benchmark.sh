#!/usr/bin/env bash
# The one prepared benchmark for the GPU host (JAX + PyTorch, no TensorFlow, no network): ours (Keras on JAX) and
# the official PyTorch ShaSpec side by side on the same card, inside BENCH_BUDGET_S (420 s) of device time
# including compilation; one summary.json that names the card. See benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/run_gpu_benchmark.sh            # results under $OUT (default ./gpu_results)
#   BENCH_PRESET=tiny BENCH_VOLUME=32,64,64 BENCH_JIT=0 bash benchmarks/gpu/run_gpu_benchmark.sh   # CPU dry run
#
# Needs, in the repository root: .whl/ (keras 3.12.4, namex 0.1.0, optree 0.20.0 wheels for cp312) when keras is
# not installed, and .official/ (DualNet_SS.py, Res50.py, dsn.py, loss_Dual.py of github.com/billhhh/ShaSpec).
# Knobs (environment): BENCH_PRESET (paper), BENCH_VOLUME (155,240,240), BENCH_CROP (the preset's), BENCH_STEPS (5),
# BENCH_WARMUP (2), BENCH_RANDOM_STEPS (3), BENCH_INFER_REPS (3), BENCH_SW_BATCH (4), BENCH_BUDGET_S (420),
# BENCH_OFFICIAL_S (150: the official fp32 part ends by then), BENCH_INFER_BF16_MIN_S (70: ours_bf16_infer starts
# only with that much left), BENCH_REMAT (encoders: ours_fp32_remat's remat option),
# BENCH_REMAT_MIN_S (120: ours_fp32_remat starts only with that much left), BENCH_BF16_MIN_S (200: official_bf16
# starts only with room for both bf16 parts), BENCH_OURS_BF16_MIN_S (130: ours_bf16's own minimum), BENCH_TIMEOUT
# (300 s per measurement), BENCH_PLAN, BENCH_CACHE_DIR (default: a new empty folder, removed at the end), BENCH_JIT
# (1; 0 for a quick CPU dry run), OFFICIAL_SHASPEC_DIR, PYTHON.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PRESET=${BENCH_PRESET:-paper}
VOLUME=${BENCH_VOLUME:-155,240,240}
CROP=${BENCH_CROP:-}
STEPS=${BENCH_STEPS:-5}
WARMUP=${BENCH_WARMUP:-2}
RANDOM_STEPS=${BENCH_RANDOM_STEPS:-3}
REPS=${BENCH_INFER_REPS:-3}
SW=${BENCH_SW_BATCH:-4}
TIMEOUT=${BENCH_TIMEOUT:-300}
BUDGET=${BENCH_BUDGET_S:-420}
OFFICIAL_S=${BENCH_OFFICIAL_S:-150}
BF16_MIN=${BENCH_BF16_MIN_S:-200}
OURS_BF16_MIN=${BENCH_OURS_BF16_MIN_S:-130}
INFER_BF16_MIN=${BENCH_INFER_BF16_MIN_S:-70}
REMAT=${BENCH_REMAT:-encoders}
REMAT_MIN=${BENCH_REMAT_MIN_S:-120}
PLAN=${BENCH_PLAN:-official_fp32 ours_fp32_cold ours_fp32_warm ours_fp32_infer ours_bf16_infer ours_fp32_remat \
official_bf16 ours_bf16}
START=$(date +%s)
LOG="$OUT/gpu_benchmark.log"
log() { echo "$@" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# The compilation cache of our runs: empty for the cold first step, reused by the warm one. Never under $OUT (its
# executables are large); removed at the end unless BENCH_CACHE_DIR names it.
if [ -n "${BENCH_CACHE_DIR:-}" ]; then CACHE=$BENCH_CACHE_DIR; mkdir -p "$CACHE"; else
  CACHE=$(mktemp -d "${TMPDIR:-/tmp}/shaspec-bench-cache.XXXXXX"); trap 'rm -rf "$CACHE"' EXIT; fi
if [ -n "$(ls -A "$CACHE" 2>/dev/null)" ]; then log "note: $CACHE is not empty: the 'cold' first step is not cold"; fi

log "== $(date -u +%FT%TZ) host $(hostname) preset $PRESET volume $VOLUME budget ${BUDGET}s plan: $PLAN"
GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
log "gpu: ${GPU_INFO:-none (nvidia-smi absent)}"

# 1. Keras and its two missing dependencies, from the carried wheels, when keras is not importable.
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
import importlib, importlib.util
versions = {}
for name in ("jax", "keras", "torch"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except ImportError:
        versions[name] = "not installed"
versions["tensorflow"] = "present" if importlib.util.find_spec("tensorflow") else "absent"
print("versions:", " | ".join(f"{k} {v}" for k, v in versions.items()))
import jax
print("devices: jax", jax.devices())
EOF

# 2. The official code (carried as .official/, or given by OFFICIAL_SHASPEC_DIR); the harness records a clear
#    "skipped: ..." when it or torch is missing.
OFFICIAL=${OFFICIAL_SHASPEC_DIR:-$PWD/.official}
BENCH=(benchmarks/train_step_benchmark.py --backend jax --preset "$PRESET" --batch 1 --volume "$VOLUME"
       --overlap 0.3333333333 --sw-batch-size "$SW" --infer-reps "$REPS" --timeout "$TIMEOUT")
[ -n "$CROP" ] && BENCH+=(--crop "$CROP")
[ "${BENCH_JIT:-1}" = 0 ] && BENCH+=(--no-jit)  # CPU dry runs only: XLA CPU compiles a 3D train step for minutes
run() {  # part name, then harness arguments
  local name=$1; shift
  log "== $name (t=$(elapsed) s): ${BENCH[*]} $*"
  "$PY" "${BENCH[@]}" "$@" --label "$name" --out "$OUT/$name.json" 2>&1 | tee -a "$LOG"
}
TRAIN=(--steps "$STEPS" --warmup "$WARMUP" --random-steps "$RANDOM_STEPS")

for part in $PLAN; do
  case $part in
    official_fp32)   # the official model first, alone on the card: training (all, then random modalities), volume
      run official_fp32 --skip ours,data --precision fp32 "${TRAIN[@]}" --official "$OFFICIAL" \
        --deadline $(( START + OFFICIAL_S )) ;;
    ours_fp32_cold)  # ours, XLA, fp32, an empty compilation cache: the cold first step, then the timed steps
      run ours_fp32_cold --skip infer,data --precision fp32 "${TRAIN[@]}" --compile-cache "$CACHE" \
        --deadline $(( START + BUDGET )) ;;
    ours_fp32_warm)  # a second process with the cache the cold one filled: the warm first step only
      run ours_fp32_warm --skip infer,data,random --precision fp32 --steps 1 --warmup 1 --compile-cache "$CACHE" \
        --deadline $(( START + BUDGET )) ;;
    ours_fp32_infer) # the whole volume through the device window (sliding_window_predict), fp32
      run ours_fp32_infer --skip train,data --precision fp32 --compile-cache "$CACHE" \
        --deadline $(( START + BUDGET )) ;;
    ours_bf16_infer) # the same window with the layers in bfloat16 (mixed_bfloat16, as precision="bf16"), if time
                     # remains: the route to half the official loop's time (its ratio is against the official fp32)
      if [ "$(left)" -lt "$INFER_BF16_MIN" ]; then log "== $part skipped: $(elapsed) s used of the $BUDGET s budget"
      else run ours_bf16_infer --skip train,data --precision bf16 --compile-cache "$CACHE" \
        --deadline $(( START + BUDGET )); fi ;;
    ours_fp32_remat) # ours, fp32, the encoders recomputed in the backward pass (remat): step time and peak memory,
                     # if time remains (its own compilation: the plain step's cache entry does not serve it)
      if [ "$(left)" -lt "$REMAT_MIN" ]; then log "== $part skipped: $(elapsed) s used of the $BUDGET s budget"
      else run ours_fp32_remat --skip infer,data --precision fp32 "${TRAIN[@]}" --remat "$REMAT" \
        --compile-cache "$CACHE" --deadline $(( START + BUDGET )); fi ;;
    official_bf16)   # bf16 training steps if time remains for both bf16 parts (official: autocast)
      if [ "$(left)" -lt "$BF16_MIN" ]; then log "== $part skipped: $(elapsed) s used of the $BUDGET s budget"
      else run official_bf16 --skip ours,data,infer --precision bf16 "${TRAIN[@]}" --official "$OFFICIAL" \
        --deadline $(( START + BUDGET )); fi ;;
    ours_bf16)       # ours with mixed_bfloat16 (its own compilation: the fp32 cache does not serve it)
      if [ "$(left)" -lt "$OURS_BF16_MIN" ]; then log "== $part skipped: $(elapsed) s used of the $BUDGET s budget"
      else run ours_bf16 --skip infer,data --precision bf16 "${TRAIN[@]}" --compile-cache "$CACHE" \
        --deadline $(( START + BUDGET )); fi ;;
    data)            # ours: batch production apart from the model (NumPy stand-in: no TensorFlow here)
      run data --skip train,infer,ours --data-batches 5 --data-case-shape 128,192,160 \
        --deadline $(( START + BUDGET )) ;;
    *) log "unknown plan entry $part" ;;
  esac
done

# 3. One summary: every part merged, the card named, ratios ours/official and the first steps cold and warm.
"$PY" benchmarks/bench_report.py "$OUT" --gpu-info "$GPU_INFO" 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
log "== done in $(elapsed) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
