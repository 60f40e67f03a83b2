#!/usr/bin/env bash
# Paper-profile training throughput and memory on a GPU, fp32 and bf16 (one prepared run for a lent GPU).
#   bash bench/gpu.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for precision in fp32 bf16; do
  python bench/train.py --profile paper --device cuda --precision "$precision" --batch 8 \
    --steps "$steps" --warmup 3 --infer-images 16 --infer-batch 16
done
python bench/train.py --profile paper --device cuda --precision bf16 --channels-last --batch 8 \
  --steps "$steps" --warmup 3 --infer-images 16 --infer-batch 16
