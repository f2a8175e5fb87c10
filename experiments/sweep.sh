#!/usr/bin/env bash
# Two runners share one 12-run bayes sweep of Part A (experiments/imagenette_sweep.yaml). One is
# killed with kill -9 midway and started again: its run goes stale and is continued from last.pt.
# Then the sweep report goes to OUT/report.
#   bash experiments/sweep.sh [DATA_DIR] [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/imagenette}
OUT=${2:-runs/imagenette-sweep}
COMMON=(--sweep_dir "$OUT" --count 12 --quiet --stale_s 60)
TRAIN=(-- --data_dir "$DATA" --workers 1 --cache "$OUT/cache")
start=$SECONDS
python sweep_offline.py --config experiments/imagenette_sweep.yaml "${COMMON[@]}" "${TRAIN[@]}" > "$OUT.a.log" 2>&1 &
A=$!
sleep 5
python sweep_offline.py --config experiments/imagenette_sweep.yaml "${COMMON[@]}" "${TRAIN[@]}" > "$OUT.b.log" 2>&1 &
B=$!
# kill -9 runner A once the sweep has 4 run folders (A is then mid-run), and start it again
until [ "$(ls "$OUT/runs" 2>/dev/null | wc -l)" -ge 4 ]; do sleep 5; done
sleep 20
kill -9 $A
echo "killed runner A (pid $A) after $((SECONDS - start)) s"
sleep 5
python sweep_offline.py "${COMMON[@]}" > "$OUT.a2.log" 2>&1 &
A2=$!
wait $B $A2
echo "sweep done in $((SECONDS - start)) s"
python sweep_offline.py --sweep_dir "$OUT" --show
python visualize.py sweep --sweep_dir "$OUT" --out "$OUT/report"
