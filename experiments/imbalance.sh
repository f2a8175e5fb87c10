#!/usr/bin/env bash
# Class imbalance: an imbalanced copy of a dataset (every class cut to KEEP training photos, one class to a
# tenth of that), Part A trained small and short with each balancing flag, evaluated on the whole held-out
# split; prints the cut class's recall and macro F1 per run.
#   bash experiments/imbalance.sh [DATA_DIR] [OUT_DIR] [CLASS] [KEEP]   (a finished run is skipped when run again)
# The copy is symbolic links to DATA_DIR's photos (nothing there is changed).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/imagenette}
OUT=${2:-runs/experiments-imbalance}
CLASS=${3:-french_horn}
KEEP=${4:-200}
PYTHON=${PYTHON:-python}
COPY="$OUT/data"
mkdir -p "$OUT"

link_photos() {  # FROM_DIR TO_DIR COUNT: symbolic links to the first COUNT photos of FROM_DIR, by name
  local photos
  mkdir -p "$2"
  mapfile -t photos < <(find "$(cd "$1" && pwd)" -maxdepth 1 -type f | sort)
  for p in "${photos[@]:0:$3}"; do ln -s "$p" "$2/"; done
}
if [ ! -d "$COPY/val" ]; then
  for dir in "$DATA"/train/*/; do
    name=$(basename "$dir")
    n=$KEEP; [ "$name" = "$CLASS" ] && n=$((KEEP / 10))
    link_photos "$dir" "$COPY/train/$name" "$n"
  done
  for dir in "$DATA"/val/*/; do link_photos "$dir" "$COPY/val/$(basename "$dir")" 100000; done
fi
$PYTHON data.py stats --data_dir "$COPY" | grep "class balance"

run() {  # NAME FLAGS...
  local name=$1; shift
  if [ ! -f "$OUT/$name/eval.json" ]; then
    rm -rf "${OUT:?}/$name"
    local start=$SECONDS
    $PYTHON train_parta.py --data_dir "$COPY" --image_size 64 --epochs 4 --filters 16 --filter_org 2 \
      --conv_layers 4 --dense_neurons 128 --wandb disabled --out_dir "$OUT" --run_name "$name" "$@"
    echo $((SECONDS - start)) > "$OUT/$name/wall_s.txt"
    $PYTHON evaluate.py --ckpt "$OUT/$name/best.pt" > /dev/null
    echo "$*" > "$OUT/$name/flags.txt"
  fi
}

run plain
run class_weights --class_weights balanced
run sampler --sampler balanced

$PYTHON - "$OUT" "$CLASS" <<'EOF'
import json, sys
from pathlib import Path
out, cls = Path(sys.argv[1]), sys.argv[2]
print(f"| run | flags | {cls} recall % | macro F1 % | accuracy % | train time |")
print("| --- | --- | --- | --- | --- | --- |")
for name in ("plain", "class_weights", "sampler"):
    m = json.loads((out / name / "eval.json").read_text())
    flags = (out / name / "flags.txt").read_text().strip()
    wall = float((out / name / "wall_s.txt").read_text())
    print(f"| {name} | {f'`{flags}`' if flags else '(none)'} | {100 * m['per_class'][cls]['accuracy']:.1f} "
          f"| {100 * m['macro_f1']:.1f} | {100 * m['accuracy']:.1f} | {wall / 60:.1f} min |")
EOF
