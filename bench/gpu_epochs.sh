#!/usr/bin/env bash
# Paper-profile training images/s on one GPU in fp32, TF32 and bf16, each eager and with --compile, then
# the calibration's estimate of a training image against two real epochs of `tfsearch train` (prepared for
# one lent H100, about 7 minutes; the six configurations at 20 steps, three of them compiling cold).
#   bash bench/gpu_epochs.sh [STEPS] [CATEGORY]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
category=${2:-stripes}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for precision in fp32 tf32 bf16; do
  for mode in eager compile; do
    flags=(--profile paper --device cuda --precision "$precision" --batch 8 --steps "$steps" --warmup 3)
    flags+=(--infer-images 4 --infer-batch 4 --category "$category")
    if [[ $mode == compile ]]; then
      flags+=(--compile)
    fi
    echo "== paper, $precision, $mode"
    python bench/train.py "${flags[@]}" | grep -E "train_images_per_second|first_step_seconds|peak_memory"
  done
done
echo "== the calibration's estimate (fp32, eager, measured now)"
python -m tfsearch.transfusion.calibration --profile paper --device cuda --precision fp32 --no-cache
echo "== two real epochs of tfsearch train (fp32)"
out=$(mktemp -d)
python -m tfsearch.cli train --dataset demo --category "$category" --profile paper --device cuda --precision fp32 \
  --epochs 2 --milestones 2 --out "$out/run" --quiet
python - "$out/run/history.csv" <<'PY'
import csv
import sys

for row in csv.DictReader(open(sys.argv[1])):
    seconds = 1 / float(row["images_per_second"])
    print(f"epoch {row['epoch']}: {seconds:.6g} s/image ({row['images_per_second']} images/s)")
PY
rm -rf "$out"
