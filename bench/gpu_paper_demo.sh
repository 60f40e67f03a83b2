#!/usr/bin/env bash
# The paper profile on a lent GPU: bf16 training on one realistic demo category for as many epochs as fit in
# a time budget, then its AUROC per milestone and defect kind. Training images/s, peak memory and inference
# s/image come first, from bench/train.py (the same network and image size on the demo's images).
#   bash bench/gpu_paper_demo.sh [CATEGORY] [BUDGET_S]       # marble and 400 s of training by default
#   DEVICE=cpu PROFILE=cpu PRECISION=fp32 bash bench/gpu_paper_demo.sh marble 20   # the plumbing, on a CPU
# It needs torch, numpy, scipy, scikit-learn, pandas, pillow, pyyaml and tqdm, not Ray, Optuna or W&B, and runs
# from the source tree (no install). About 2 minutes besides the budget. Files land in $OUT (a new temporary
# folder without it): speed.txt and the training run.
set -euo pipefail
out=$(realpath -m "${OUT:-$(mktemp -d)}")  # before the cd: a relative $OUT is the caller's
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# `tfsearch train` and `tfsearch evaluate` alone, so that Ray, Optuna and W&B are not imported
tfsearch() {
  python3 -c 'import sys; from tfsearch.cli import main
sys.exit(main(sys.argv[1:], modules=("tfsearch.cli.train", "tfsearch.cli.evaluate")))' "$@"
}
category=${1:-marble}
budget=${2:-400}
categories=$(python3 -c 'from tfsearch.data.demo_real import REALISTIC_CATEGORIES as c; print(" ".join(c))')
if [[ " $categories " != *" $category "* ]]; then
  echo "gpu_paper_demo.sh: CATEGORY $category: expected one of the realistic demo's: $categories" >&2
  exit 2
fi
if ! [[ $budget =~ ^[0-9]+$ ]] || ((budget < 1)); then
  echo "gpu_paper_demo.sh: BUDGET_S $budget: expected a whole number of seconds above 0" >&2
  exit 2
fi
device=${DEVICE:-cuda}
profile=${PROFILE:-paper}
precision=${PRECISION:-bf16}
run="$out/$profile-$category"
if [[ $device == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 bench/train.py --profile "$profile" --device "$device" --precision "$precision" --batch 8 \
  --steps 20 --warmup 3 --infer-images 16 --infer-batch 16 | tee "$out/speed.txt"
rate=$(awk -F': ' '/^train_images_per_second:/ {print $2}' "$out/speed.txt")
epochs=$(python3 - "$rate" "$budget" "$category" <<'EOF'
import sys

from tfsearch.data.demo import realistic_demo_root

rate, budget, category = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
images = len(list((realistic_demo_root() / category / "train" / "good").glob("*.png")))
print(max(2, int(budget * rate / images)))
EOF
)
middle=$((epochs / 2))
echo "training $epochs epochs of $profile on demo_real/$category ($budget s at $rate images/s)"
started=$(date +%s)
tfsearch train --dataset demo_real --category "$category" --profile "$profile" --epochs "$epochs" \
  --milestones "$middle,$epochs" --device "$device" --precision "$precision" --quiet --out "$run"
echo "training and milestone maps: $(($(date +%s) - started)) s"
for epoch in "$middle" "$epochs"; do
  tfsearch evaluate "$run" --epoch "$epoch" --device "$device" --precision "$precision"
done
