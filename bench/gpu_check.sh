#!/usr/bin/env bash
# The GPU path, proven on a CUDA machine in one go (issue 19, point 5): installs the GPU stack
# from the lock, then runs, within ten minutes on one GPU,
#   1. vLLM (CUDA) greedy + log-prob parity against transformers, untied and tied checkpoints;
#   2. in-place hot-swaps (tied and untied) through the service's swapper, golden probes on every
#      swap, the last version's greedy output against a fresh engine        (bench/gpu_parity.py)
#   3. the generation (mixed lengths, vLLM service vs static batch), scoring (DPO-shaped traffic)
#      and DPO-step benches, and the hot-swap bench under load, all with small settings;
#   4. the training-memory rows of issue 20 (full fp32 vs bf16-mixed vs LoRA DPO, peak GPU memory).
# Every figure lands in $OUT (default ./gpu-check-out): one log per step, parity.json, summary.txt.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # from the repository root
#
# Install: a fresh virtual environment (VENV, default .venv-gpu) gets requirements/gpu.lock with
# --no-deps, as deploy/docker/Dockerfile.gpu installs it on the vLLM CUDA image, then this
# package. WHEELS=/dir installs offline from a wheelhouse (a machine without network access);
# SKIP_INSTALL=1 uses the python already on PATH (e.g. inside the rlhf-gpu image). Steps run
# with their own time limits; one failing does not stop the others; the exit status is 1 when
# any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
VENV=${VENV:-.venv-gpu}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record rc and time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && FAILED=1
  note "$(printf '%-22s rc=%-3s %4ss  (%s)' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*")"
  tail -n 25 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
}

note "gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"

# ---- 1. the GPU stack, from the lock -----------------------------------------------------------
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  PY=$(command -v python3)
else
  python3 -m venv "$VENV" || { note "python3 -m venv failed"; exit 1; }
  PY=$PWD/$VENV/bin/python
  PIP=("$PY" -m pip install --no-deps --disable-pip-version-check -q)
  [ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")
  step install 420 "${PIP[@]}" -r requirements/gpu.lock
  step install-rlhf 120 "${PIP[@]}" -e .
fi
step versions 60 "$PY" -c "import torch, vllm, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('vllm', vllm.__version__, 'transformers', transformers.__version__); assert torch.cuda.is_available()"

# Redis for the registry-following swap bench: a local one when none answers.
REDIS_PID=""
if ! "$PY" -c "import redis; redis.Redis(port=6379, socket_timeout=1).ping()" 2>/dev/null; then
  if command -v redis-server >/dev/null; then
    redis-server --port 6379 --save '' --appendonly no --daemonize no > "$OUT/redis.log" 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 50); do  # up to 5 s for it to answer
      "$PY" -c "import redis; redis.Redis(port=6379, socket_timeout=1).ping()" 2>/dev/null && break
      sleep 0.1
    done
  else
    note "no redis-server: the hot-swap-under-load bench will fail (parity and in-place swaps do not need it)"
  fi
fi

# ---- 2. parity and in-place hot-swaps (tied and untied, probes on every swap) -------------------
step parity-fp32 150 "$PY" bench/gpu_parity.py --size small --dtype float32 --swaps 4 --out "$OUT"
cp "$OUT/parity.json" "$OUT/parity-fp32.json" 2>/dev/null
step parity-bf16 150 "$PY" bench/gpu_parity.py --size small --dtype bfloat16 --swaps 4 --out "$OUT"
cp "$OUT/parity.json" "$OUT/parity-bf16.json" 2>/dev/null

# ---- 3. benches, small settings ----------------------------------------------------------------
step bench-swap 150 "$PY" bench/swap.py --backend vllm --size small --tie both --swaps 4 --clients 16
step bench-generation 150 "$PY" bench/generation.py --size small --workload mixed --backend vllm \
  --requests 64 --reps 1
step bench-scoring-dpo 90 "$PY" bench/scoring.py --workload dpo --size small --seconds 4 --warmup 1
step bench-dpo 90 "$PY" bench/dpo.py --size small --steps 6 --warmup 2
# issue 20's rows on the GPU: peak memory (torch.cuda.max_memory_allocated) of full fp32,
# bf16-mixed and LoRA DPO steps on the small policy, and the same at 2112 tokens a step
step bench-train-memory 120 "$PY" bench/train_memory.py --device cuda --timeout 60 \
  --configs float32,bf16-mixed,bfloat16,lora,float32@long,bf16-mixed@long,lora@long

[ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null
note "total $(( $(date +%s) - START ))s; failed steps: $FAILED"
exit $FAILED
