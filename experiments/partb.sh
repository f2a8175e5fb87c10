#!/usr/bin/env bash
# Part B, EfficientNet-Lite0 with the packaged ImageNet weights, 5 epochs at 224 px: head only vs the
# default fine-tuning recipe vs full fine-tuning at the default learning rates.
# Full fine-tuning on a 2-core CPU takes about a minute per 1,000 photos per epoch, so this trains on
# the first PER_CLASS photos of every class of train/ (symlinks) and tests on the whole held-out val/.
#   bash experiments/partb.sh [DATA_DIR] [OUT_DIR] [PER_CLASS]    (finished runs are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "${1:-data/imagenette}" && pwd)
OUT=${2:-runs/experiments-partb}
PER_CLASS=${3:-100}
SUB="$OUT/data-$PER_CLASS"
mkdir -p "$OUT"

if [ ! -d "$SUB" ]; then  # train: the first PER_CLASS photos of every class; val: all of it
  for dir in "$DATA"/train/*/; do
    cls=$(basename "$dir")
    mkdir -p "$SUB/train/$cls" "$SUB/val"
    files=("$dir"*)  # glob order is sorted
    for f in "${files[@]:0:$PER_CLASS}"; do ln -s "$f" "$SUB/train/$cls/"; done
    ln -s "$DATA/val/$cls" "$SUB/val/$cls"
  done
fi

run() {  # NAME FLAGS...
  local name=$1; shift
  if [ ! -f "$OUT/$name/eval.json" ]; then
    rm -rf "${OUT:?}/$name"
    local start=$SECONDS
    python train_partb.py --data_dir "$SUB" --model efficientnet_lite0 --weights packaged --epochs 5 \
      --wandb disabled --out_dir "$OUT" --run_name "$name" "$@"
    echo $((SECONDS - start)) > "$OUT/$name/wall_s.txt"
    python evaluate.py --ckpt "$OUT/$name/best.pt"
    echo "$*" > "$OUT/$name/flags.txt"
  fi
}

run head_only --freeze all
run recipe                                     # the defaults
run recipe_bn_trained --freeze_bn=False
run recipe_crop50 --crop_scale 0.5
run full_finetune --freeze none
run full_bn_trained --freeze none --freeze_bn=False
run full_crop50 --freeze none --crop_scale 0.5
python experiments/table.py "$OUT"/{head_only,recipe,recipe_bn_trained,recipe_crop50,full_finetune,full_bn_trained,full_crop50}
