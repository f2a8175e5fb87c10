"""Run folders: data, split and folder of a new or resumed run, args.json, split.json and metrics.csv."""
from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import data
from checkpoint import json_safe, load_checkpoint
from cli import METRIC_FIELDS, UserError
from devices import Dist, broadcast, init_distributed
from flags import check_common_args


@dataclass
class RunSetup:
    """What a training script needs before it builds its model: data, split and run folder."""

    args: argparse.Namespace
    run_dir: Path
    root: Path
    classes: list[str]
    train_samples: list
    val_samples: list
    split: dict
    resume: dict | None = None
    dist: Dist = field(default_factory=Dist)

    @property
    def rank_batch_size(self) -> int:
        """--batch_size is the global batch; each torchrun process takes its share."""
        return max(1, self.args.batch_size // self.dist.world)


def unique_run_dir(out_dir: Path, name: str) -> Path:
    """A new folder that no other process (sweep agent) can also get: mkdir is atomic."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = out_dir / (name if i == 0 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder under {out_dir}")


def resume_args(args: argparse.Namespace, ckpt: dict) -> argparse.Namespace:
    """The saved flags, keeping only this invocation's machine-specific ones."""
    saved = dict(ckpt["config"])
    for key in ("workers", "device", "wandb", "resume", "data_dir", "save_every"):
        saved[key] = getattr(args, key)
    if args.data_dir == data.DEFAULT_DATA_DIR:
        saved["data_dir"] = ckpt["config"]["data_dir"]
    merged = vars(args).copy()
    merged.update(saved)
    return argparse.Namespace(**merged)


def setup_run(args: argparse.Namespace, name: str,
              validate: Callable[[int], Any] | None = None) -> RunSetup:
    """Resolve data, split and run folder for a new run, or reload them for --resume.

    `validate(num_classes)` may raise on bad model flags before any folder is created.
    """
    check_common_args(args)
    dist = init_distributed()
    if dist.world > 1 and args.batch_size % dist.world:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) must be divisible by the "
                        f"{dist.world} processes")
    ckpt = None
    if args.resume:
        last = Path(args.resume) / "last.pt"
        ckpt = load_checkpoint(last)
        if "optimizer" not in ckpt:
            raise UserError(f"{last}: has no training state to resume from")
        args = resume_args(args, ckpt)
        run_dir = Path(args.resume)
    root = fetch_data(args, dist)
    ds = data.discover(root)
    if ckpt is not None:
        if ckpt["class_names"] != ds.classes:
            raise UserError(f"classes in {root} differ from the run's: {ckpt['class_names']}")
        split = ckpt["split"]
        train_samples, val_samples = data.split_from_json(ds.root, split, ds.classes)
    else:
        train_idx, val_idx = data.stratified_split(ds.train, args.val_fraction, args.seed)
        split = data.split_to_json(ds.root, ds.train, train_idx, val_idx)
        train_samples = [ds.train[i] for i in train_idx]
        val_samples = [ds.train[i] for i in val_idx]
        if not val_samples:
            raise UserError("the validation split is empty; use --val_fraction > 0")
        if validate is not None:
            validate(len(ds.classes))  # bad model flags fail before a run folder exists
        run_dir = broadcast(new_run_dir(args, name, split) if dist.main else None, dist)
    return RunSetup(args, run_dir, ds.root, ds.classes, train_samples, val_samples, split, ckpt, dist)


def fetch_data(args: argparse.Namespace, dist: Dist) -> Path:
    """The data root (downloaded first if needed, by rank 0 alone under torchrun)."""
    error = None
    if dist.main:
        try:
            data.ensure_data(args.data_dir, args.download, args.data_url)
        except UserError as e:
            error = str(e)
    error = broadcast(error, dist)  # the others wait for the download, and fail with its error
    if error is not None:
        raise UserError(error)
    return data.resolve_data_dir(args.data_dir)


def new_run_dir(args: argparse.Namespace, name: str, split: dict) -> Path:
    """Create the run folder (unique unless --run_name) with split.json and args.json."""
    if args.run_name:
        run_dir = Path(args.out_dir) / args.run_name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"run folder {run_dir} already exists; pass --resume {run_dir} to continue "
                            f"it, or choose another --run_name")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = unique_run_dir(Path(args.out_dir), f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
    (run_dir / "split.json").write_text(json.dumps(split))
    (run_dir / "args.json").write_text(json.dumps(json_safe(vars(args)), indent=1))
    return run_dir


RESULT_FILE = "result.json"  # written when a run has trained all its epochs (or stopped early): it is complete


def write_result(run_dir: Path, state_epoch: int, best_val_acc: float, best_epoch: int) -> None:
    """Mark the run complete: result.json, written atomically, read by sweep runners."""
    tmp = run_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps({"epochs": state_epoch, "best_val_acc": best_val_acc, "best_epoch": best_epoch,
                               "ended": datetime.now().isoformat(timespec="seconds")}))
    os.replace(tmp, run_dir / RESULT_FILE)


def read_result(run_dir: Path) -> dict | None:
    """The run's result.json, or None while it is incomplete (or the file is damaged)."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def write_metrics_csv(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.csv from the history (idempotent, so a resume never duplicates rows)."""
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, run_dir / "metrics.csv")


def read_metrics_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
