#!/usr/bin/env bash
# Part A at 64 px for 10 epochs: the peers' recipe (yardstick), our defaults, and one change at a time.
# Every run is evaluated on the held-out split (plain and with flip TTA); the table is printed at the end.
#   bash experiments/parta.sh [DATA_DIR] [OUT_DIR]      (a finished run is skipped when run again)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/imagenette}
OUT=${2:-runs/experiments}
mkdir -p "$OUT"

run() {  # NAME FLAGS...
  local name=$1; shift
  if [ ! -f "$OUT/$name/tta/eval.json" ]; then
    rm -rf "${OUT:?}/$name"
    local start=$SECONDS
    python train_parta.py --data_dir "$DATA" --image_size 64 --epochs 10 --wandb disabled \
      --out_dir "$OUT" --run_name "$name" "$@"
    echo $((SECONDS - start)) > "$OUT/$name/wall_s.txt"
    python evaluate.py --ckpt "$OUT/$name/best.pt"
    python evaluate.py --ckpt "$OUT/$name/best.pt" --tta --out "$OUT/$name/tta"
    echo "$*" > "$OUT/$name/flags.txt"
  fi
}

# The peers' approach: 5 x 32 filters, ReLU, BN, dropout 0.3, dense 512, Adam 1e-3, no schedule,
# no label smoothing, no weight decay, no augmentation (their better variant).
run yardstick --filters 32 --filter_org 1 --pool flatten --dropout 0.3 --activation relu --optimizer adam --lr 1e-3 \
  --weight_decay 0 --scheduler none --warmup_epochs 0 --label_smoothing 0 --no-augment
# The previous defaults (32 filters doubling, flatten, crop scale 0.25, dropout 0.3), then one change
# at a time.
OLD=(--filters 32 --filter_org 2 --pool flatten --crop_scale 0.25 --dropout 0.3)
run old_defaults "${OLD[@]}"
run old_mixup "${OLD[@]}" --mixup 0.2
run old_lr3e-3 "${OLD[@]}" --lr 3e-3
run old_crop50 "${OLD[@]}" --crop_scale 0.5
run old_avgpool "${OLD[@]}" --pool avg
run old_wide "${OLD[@]}" --filters 64 --filter_org 1.5
# The changes that helped on val, added up: today's defaults are the last line.
run wide_crop50 --pool flatten --dropout 0.3
run wide_crop50_avg --dropout 0.3
run defaults
python experiments/table.py "$OUT"/{yardstick,old_defaults,old_mixup,old_lr3e-3,old_crop50,old_avgpool,old_wide} \
  "$OUT"/{wide_crop50,wide_crop50_avg,defaults}
