#!/usr/bin/env bash
# The GPU checks of the fused-segment work, as one script that fits in about
# ten minutes on one H100/H200: the GPU test module, then the benchmark rows
# the README quotes. Results land in benchmarks/results/ (and $OUT if set).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -m pip install -q -e ".[test]" >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
timeout 180 python -m pytest -q tests/execution/test_gpu_fused.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
# t=1000, LSTM(256) and GRU(256), batch 32, 32 features: cuDNN, fused, chunks.
for cell in lstm gru; do
  timeout 200 python benchmarks/memory_time.py --cell "$cell" --lengths 1000 \
    --schemes auto --budgets 0.05 --fused-budgets 0.1 0.05 --chunked --no-chen \
    --output "$out/memory_time_gpu_$cell" 2>&1 | tail -14
done
# t=12000, LSTM(2048), batch 128: cuDNN at t=1000 for the 12x reference, then
# t=12000 (cuDNN expected out of memory; the budgeted fused row must run).
timeout 200 python benchmarks/memory_time.py --lengths 1000 12000 --batch 128 \
  --units 2048 --schemes --budgets --fused-budgets 0.02 --no-chen --no-reference \
  --output "$out/memory_time_gpu_long" 2>&1 | tail -10
