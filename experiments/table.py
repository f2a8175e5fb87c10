"""Print a Markdown results table from finished run folders (metrics.csv, eval.json, flags.txt, wall_s.txt).

python experiments/table.py runs/exp/parta-*        # one row per run folder, in the given order
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def row_of(run: Path) -> list[str]:
    """run | flags | best val_acc | test acc | test acc with flip TTA | s/epoch | training wall time."""
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{run}: metrics.csv has no epochs")
    times = [float(r["epoch_time"]) for r in rows]
    plain, tta = read_json(run / "eval.json"), read_json(run / "tta" / "eval.json")
    flags = (run / "flags.txt").read_text().strip() if (run / "flags.txt").is_file() else ""
    # wall_s.txt: the whole training command, timed by the experiment script (one-off decoding or
    # feature extraction included); without it, the sum of the epochs.
    wall = float((run / "wall_s.txt").read_text()) if (run / "wall_s.txt").is_file() else None
    train_time = f"{wall / 60:.1f} min" if wall is not None else f"{sum(times) / 60:.1f} min (epochs only)"

    def pct(d: dict | None) -> str:
        return f"{100 * d['accuracy']:.1f}" if d else "-"

    return [
        run.name,
        f"`{flags}`" if flags else "(defaults)",
        f"{100 * max(float(r['val_acc']) for r in rows):.1f}",
        pct(plain),
        pct(tta),
        f"{statistics.median(times):.1f}",
        train_time,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Markdown table of finished runs.")
    parser.add_argument(
        "runs", nargs="+", help="run folders (with metrics.csv; eval.json and tta/eval.json if evaluated)"
    )
    args = parser.parse_args(argv)
    header = ["run", "flags", "best val acc %", "test acc %", "test acc % (flip TTA)", "s/epoch (median)", "train time"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for run in map(Path, args.runs):
        if not (run / "metrics.csv").is_file():
            print(f"error: {run} has no metrics.csv (not a finished run folder)", file=sys.stderr)
            sys.exit(2)
        print("| " + " | ".join(row_of(run)) + " |")


if __name__ == "__main__":
    main()
