#!/usr/bin/env bash
# Prepared checks for a lent GPU (H100 / H200), run from the repository root:
#   bash bench/gpu.sh            # writes logs and figures under $OUT (default ./bench_gpu_out)
# Sized for one device call: every step has its own time limit and the whole script
# stops starting steps after BUDGET_S seconds (default 540, under the device tool's
# 600 s per call and its 15 min per session), most valuable first:
# 1. the fused-kernel tests on CUDA (real Triton kernels, compiled dropout, flash SDPA),
# 2. bench/throughput.py on a GPT-2 1.3B-class model (24 layers, hidden 2048, 16 heads,
#    seq 2048, bf16) against the hand-written baseline (the issue's MFU target),
# 3. the kernel paths table at those shapes, then the same model with every fused op
#    forced onto its reference (what fusion buys end to end),
# 4. the rest of the test suite with CUDA visible (whatever fits in the time left).
# FULL=1 adds a training.compile=true run (long: compiling 24 layers).
# Every step's output goes to its own log; a failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_gpu_out}
mkdir -p "$OUT"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PY=${PYTHON:-.venv/bin/python}
else
  PY=${PYTHON:-python3}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET

START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log, record the exit code
  local name=$1 limit=$2; shift 2
  local left=$(( START + BUDGET_S - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/summary.txt"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 )) s; last line: $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
}

{
  date -u; hostname; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton absent"
  git log -1 --oneline 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step test_fused_kernels 90 $PY -m pytest -q -x tests/test_fused_kernels.py -p no:cacheprovider

GPT13B=(model.num_layers=24 model.hidden_size=2048 model.num_attention_heads=16
        model.seq_length=2048 tokenizer.vocab_size=50257 training.precision=bf16
        training.device=cuda training.micro_batch_size=4 training.global_batch_size=8)
step throughput_1.3b 150 $PY bench/throughput.py configs/bench_cpu.yaml "${GPT13B[@]}" --iters 3 --rounds 3
step kernels_1.3b 60 $PY bench/throughput.py configs/bench_cpu.yaml "${GPT13B[@]}" --kernels --iters 5 --rounds 2
MEGATRON_FUSED_KERNELS=reference step throughput_1.3b_reference_kernels 90 \
  $PY bench/throughput.py configs/bench_cpu.yaml "${GPT13B[@]}" --iters 3 --rounds 1 --no-baseline
step adamw 30 $PY bench/adamw.py --layers 24 --hidden 2048 --vocab 50304 --seq 2048
if [ "${FULL:-0}" = 1 ]; then
  step throughput_1.3b_compile 300 $PY bench/throughput.py configs/bench_cpu.yaml "${GPT13B[@]}" \
    training.compile=true --iters 3 --rounds 1 --no-baseline
fi
step test_suite 300 $PY -m pytest -q -x tests --ignore=tests/test_fused_kernels.py -p no:cacheprovider
echo "results in $OUT ($(( $(date +%s) - START )) s)"
