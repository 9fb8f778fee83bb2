#!/usr/bin/env bash
# Prepared GPU benchmark (never a test requirement): bf16 vs fp32 MAE and CLIP steps on one CUDA GPU.
#   bash benchmarks/gpu/run.sh            # from the repository root, with .venv set up (make setup)
# Writes benchmarks/results/gpu/{mae,clip}.json. MAE: medfm vs lightly vs MONAI at identical ViT-Tiny 192x12,
# 64 px, patch 8, mask 0.75, same decoder, batch 256; the JSON has FLOPs per step (FlopCounterMode) and the
# matmul peak measured in the same process, so MFU = flops_per_step * steps_per_s / peak.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" benchmarks/bench_mae.py --device cuda --precision both --batch-size "${MAE_BATCH:-256}" \
  --steps "${MAE_STEPS:-30}" --warmup 5 --out "$OUT/mae.json"
"$PY" benchmarks/bench_clip.py --device cuda --batch "${CLIP_BATCH:-256}" --chunk 64 --steps "${CLIP_STEPS:-10}" \
  --precisions 32,bf16-mixed --out "$OUT/clip.json"
echo "results in $OUT"
