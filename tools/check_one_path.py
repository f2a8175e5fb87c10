"""Checks that every image goes through the one batch pipeline, on any device (tools/gpu_check.sh runs them).

python tools/check_one_path.py cache-off OUT_DIR TRAINING_COMMAND...
    trains twice with the same flags, through the decoded cache and with --cache off, and
    requires the same epoch rows (float tolerance);
python tools/check_one_path.py evaluate RUN_DIR DATA_DIR DEVICE
    requires `evaluate.py --split val` on the run's best.pt to give the validation accuracy the
    run logged for its best epoch.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc")


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def run(command: list[str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"FAIL {' '.join(command[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")


def cache_off(out_dir: Path, command: list[str]) -> None:
    """The same training through the decoded cache and with --cache off: the same epoch rows."""
    runs = {"cached": [], "decoded": ["--cache", "off"]}
    for name, extra in runs.items():
        run([*command, *extra, "--out_dir", str(out_dir), "--run_name", f"one-path-{name}"])
    cached, decoded = (rows(out_dir / f"one-path-{name}") for name in runs)
    for a, b in zip(cached, decoded, strict=True):
        for key in COMPARED:
            if not math.isclose(float(a[key]), float(b[key]), rel_tol=1e-5, abs_tol=1e-6):
                sys.exit(f"FAIL epoch {a['epoch']} {key}: {a[key]} through the cache, {b[key]} with --cache off")
    print(
        f"PASS the same {len(cached)} epoch(s) with --cache off as through the cache "
        f"(train_loss {float(cached[-1]['train_loss']):.6f})"
    )


def evaluate_val(run_dir: Path, data_dir: str, device: str) -> None:
    """evaluate.py --split val on best.pt gives the best epoch's logged val_acc."""
    history = rows(run_dir)
    best = max(history, key=lambda r: float(r["val_acc"]))
    config = json.loads((run_dir / "args.json").read_text()) if (run_dir / "args.json").exists() else {}
    batch = str(config.get("batch_size", 64))
    with tempfile.TemporaryDirectory() as tmp:
        run(
            [
                sys.executable,
                "evaluate.py",
                "--ckpt",
                str(run_dir / "best.pt"),
                "--split",
                "val",
                "--data_dir",
                data_dir,
                "--device",
                device,
                "--batch_size",
                batch,
                "--out",
                tmp,
            ]
        )
        result = json.loads((Path(tmp) / "eval.json").read_text())
    logged, evaluated, n = float(best["val_acc"]), float(result["accuracy"]), int(result["n"])
    # On a GPU, cuDNN may pick other kernels in another process: bf16 rounding can move one image.
    allowed = 1.5 / n if device.startswith("cuda") else 1e-9
    if abs(logged - evaluated) > allowed:
        sys.exit(
            f"FAIL evaluate.py --split val gives {evaluated:.4f}, the run logged {logged:.4f} (epoch {best['epoch']})"
        )
    print(
        f"PASS evaluate.py --split val gives the same accuracy as the run logged for epoch {best['epoch']}: "
        f"{evaluated:.4f} of {n} images"
    )


def main(argv: list[str]) -> None:
    try:
        if len(argv) >= 3 and argv[0] == "cache-off":
            return cache_off(Path(argv[1]), argv[2:])
        if len(argv) == 4 and argv[0] == "evaluate":
            return evaluate_val(Path(argv[1]), argv[2], argv[3])
    except (OSError, KeyError, ValueError) as e:  # a run folder without its files, a damaged metrics.csv
        sys.exit(f"FAIL {type(e).__name__}: {e}")
    print(
        "error: usage: check_one_path.py cache-off OUT_DIR COMMAND... | evaluate RUN_DIR DATA_DIR DEVICE",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
