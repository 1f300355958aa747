#!/usr/bin/env bash
# Everything a lent GPU session runs, in one call (the device tool's `run`, timeout_s about 560):
#   bash benchmarks/gpu_session.sh
# 1. benchmarks/gpu.py (kernel checks, rates, timings, block sweep), budget 340 s (SIGTERM at
#    400 s, SIGKILL 15 s later if that goes unheeded, e.g. inside a CUDA call; gpu.py saves its
#    JSON atomically after each timing and, with its summary, on SIGTERM);
# 2. the embedded default training for 5 epochs on the GPU (autocast, device selection and the
#    training loop on CUDA, which no CPU test reaches): SIGTERM at 75 s, SIGKILL 5 s later.
# Worst case: 400 + 15 + 75 + 5 = 495 s plus a few seconds (nvidia-smi, one torch import,
# copies), well under 540 s.
# Results land under $OUT (the only folder the device tool brings back; at most 8 files come
# back, so the run dir stays in /tmp and only its summary and metrics are copied), else
# /tmp/gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/machine.txt" 2>&1
timeout -k 15 400 python3 benchmarks/gpu.py --budget-s 340 --out "$out/gpu.json" 2>&1 \
    | tee "$out/gpu.log"
echo "gpu.py exit ${PIPESTATUS[0]}" | tee -a "$out/machine.txt"
run=$(mktemp -d /tmp/gpu_train.XXXX)
timeout -k 5 75 python3 -m moesaic train --set epochs=5 --set progress=False --set plots=False \
    --run-dir "$run" 2>&1 | tee "$out/train.log" | tail -n 25
echo "train exit ${PIPESTATUS[0]}" | tee -a "$out/machine.txt"
cp "$run/summary.json" "$out/train_summary.json" 2>/dev/null
cp "$run/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null
cat "$out/machine.txt"
