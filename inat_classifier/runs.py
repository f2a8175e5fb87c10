"""Run folders: data, split and folder of a new or resumed run, args.json, split.json and metrics.csv."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from inat_classifier import dataset as data
from inat_classifier.checkpoint import EXPORT_NAMES, exported_format, load_checkpoint
from inat_classifier.cli import EPOCH_ROW, METRIC_FIELDS, RESULT_FILE, UserError, json_safe, on_failure, typed_flags
from inat_classifier.config_file import check_saved_flags
from inat_classifier.devices import Dist, broadcast, init_distributed, launched_rank, select_device
from inat_classifier.flags import check_common_args
from inat_classifier.folder_lock import LOCK_FILE, hold_folder, release_folder
from inat_classifier.images import photo_short_side
from inat_classifier.storage import atomic_write_text
from inat_classifier.training import amp_dtype, resumed_amp, saved_precision


@dataclass
class RunSetup:
    """What a training script needs before it builds its model: data, split, device and run folder."""

    args: argparse.Namespace
    run_dir: Path
    root: Path
    classes: list[str]
    train_samples: list
    val_samples: list
    split: dict
    resume: dict | None = None
    dist: Dist = field(default_factory=Dist)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    photo_sides: dict = field(default_factory=dict)  # short side of each photo, from its header; 0 unreadable

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


MACHINE_FLAGS = ("workers", "device", "wandb", "resume", "data_dir", "save_every")  # this machine's, on --resume
EXTENDABLE_FLAGS = ("epochs", "amp")  # typed with --resume, they continue the run further


def resume_args(args: argparse.Namespace, config: dict) -> argparse.Namespace:
    """The saved flags, keeping this invocation's machine-specific ones and a typed --epochs."""
    saved = dict(config)
    typed = typed_flags(args)
    for key in MACHINE_FLAGS:
        saved[key] = getattr(args, key)
    if "data_dir" not in typed and args.data_dir == data.DEFAULT_DATA_DIR:
        saved["data_dir"] = config["data_dir"]
    for key in sorted(typed - set(MACHINE_FLAGS)):
        value = json_safe({key: getattr(args, key)})[key]
        if key in EXTENDABLE_FLAGS:
            saved[key] = getattr(args, key)
        elif key in config and config[key] != value:
            print(f"note: --resume keeps the run's own --{key} {config[key]} (ignoring {value})")
    merged = vars(args).copy()
    merged.update(saved)
    return argparse.Namespace(**merged)


def read_run_json(path: Path, required: bool) -> Any:
    """args.json or split.json of a run folder (None when absent and not required); unreadable is one line."""
    if not required and not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e}); fix or remove it") from None


def saved_state(run_dir: Path) -> str:
    """'last': last.pt, --resume continues it; 'lost': epochs recorded (metrics.csv) but no last.pt;
    'none': no training state ever reached the disk (best.pt alone at most), so the run starts over."""
    if (run_dir / "last.pt").exists():
        return "last"
    return "lost" if (run_dir / "metrics.csv").exists() else "none"


def lost_state_error(run_dir: Path) -> UserError:
    """A folder whose recorded epochs have no last.pt: retraining in a new folder is what is left."""
    return UserError(
        f"{run_dir} has trained epochs (metrics.csv) but no last.pt to resume from: retrain its "
        f"flags in a new folder with --config {run_dir / 'args.json'}, or choose another --run_name"
    )


SAME_RUN_EXEMPT = {*MACHINE_FLAGS, *EXTENDABLE_FLAGS, "config"}  # may differ between args.json and last.pt


def check_same_run(last: Path, ckpt: dict, config: dict | None, split: dict | None) -> None:
    """last.pt must be this folder's: its flags and split those of the run's args.json and split.json."""
    if config is not None:
        differ = [
            f"{key} {ckpt['config'][key]!r} (args.json: {config[key]!r})"
            for key in sorted(config.keys() & ckpt["config"].keys() - SAME_RUN_EXEMPT)
            if config[key] is not None and config[key] != ckpt["config"][key]
        ]  # None: worked out later
        if differ:
            raise UserError(
                f"{last}: its flags are not those of {last.parent / 'args.json'}: {', '.join(differ)}; "
                f"it is another run's checkpoint: move it out of the folder"
            )
    if split is not None and split != ckpt["split"]:
        raise UserError(
            f"{last}: its split is not the one in {last.parent / 'split.json'}: it is another run's "
            f"checkpoint; move it out of the folder"
        )


def checked_resume(args: argparse.Namespace, config: dict, where: Path) -> argparse.Namespace:
    """resume_args, its merged flags in range as a new run's must be (e.g. a hand-edited epochs -3)."""
    merged = resume_args(args, config)
    try:
        check_common_args(merged)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return merged


def open_resumed(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, dict | None, dict, Path]:
    """--resume RUN: (its flags, last.pt, its split, the folder), held by this process; a run without
    training state on disk (stopped or failed before its first last.pt) has no last.pt (None) and starts over.

    What it reads is checked: args.json and last.pt's flags through `parser`'s types (the script's
    own), and last.pt against args.json and split.json.
    """
    run_dir = Path(args.resume)
    if run_dir.is_file():
        kind = exported_format(run_dir)
        what = f"a model exported as {EXPORT_NAMES[kind]}, which holds no training state" if kind else "a file"
        raise UserError(f"--resume {run_dir}: {what}; --resume takes a run folder and continues from its last.pt")
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    if launched_rank() == 0:  # under torchrun rank 0 holds it for all
        hold_folder(run_dir, make=False, hint="wait for it to end, or stop it, before resuming the run")
        on_failure(lambda interrupted: release_folder(run_dir))
    saved = read_run_json(run_dir / "args.json", required=False)
    config = None if saved is None else check_saved_flags(parser, saved, str(run_dir / "args.json"))
    state, last = saved_state(run_dir), run_dir / "last.pt"
    if state == "lost":
        raise lost_state_error(run_dir)
    if state == "none":
        if config is None:
            raise UserError(f"--resume {run_dir}: neither last.pt nor args.json is there to resume or start it over")
        split = read_run_json(run_dir / "split.json", required=True)
        print(
            f"{run_dir} has no last.pt yet (it stopped before one was saved): starting it over from epoch 1"
            + (" (its best.pt is replaced)" if (run_dir / "best.pt").exists() else "")
        )
        return checked_resume(args, config, run_dir / "args.json"), None, split, run_dir
    ckpt = load_checkpoint(last)
    if "optimizer" not in ckpt:
        raise UserError(f"{last}: has no training state to resume from")
    ckpt_config = check_saved_flags(parser, ckpt["config"], str(last))
    try:
        split = read_run_json(run_dir / "split.json", required=False)
    except UserError:
        split = None  # not needed: last.pt holds the split
    check_same_run(last, {**ckpt, "config": ckpt_config}, config, split)
    args = checked_resume(args, ckpt_config, last)
    if args.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {args.epochs} is fewer than the {ckpt['epoch']} epochs {run_dir} has trained")
    return args, ckpt, ckpt["split"], run_dir


def setup_run(
    args: argparse.Namespace, name: str, parser: argparse.ArgumentParser, validate: Callable[[int], Any] | None = None
) -> RunSetup:
    """Resolve data, split, device and run folder for a new run, or reload them for --resume.

    The script has checked the shared flags first (flags.check_common_args); every other check
    runs here before a new run's folder is created, `validate(num_classes)` on the model flags.
    `parser` is the script's own, to check a resumed run's saved flags with. The run folder is
    held by this process (folder_lock) until engine.report, or the end of the process.
    """
    ckpt, run_dir = None, None
    if args.resume:
        args, ckpt, split, run_dir = open_resumed(args, parser)
    device = select_device(args.device)
    dist = init_distributed(device)  # the backend follows the device
    if dist.world > 1 and args.batch_size % dist.world:
        raise UserError(
            f"--batch_size {args.batch_size} (the global batch) must be divisible by the {dist.world} processes"
        )
    if ckpt is not None:  # the run's own precision, not --amp auto worked out again on this machine
        args.amp, note = resumed_amp(saved_precision(ckpt), args.amp if "amp" in typed_flags(args) else None, device)
        if note and dist.main:
            print(note)
    amp_dtype(args.amp, device)  # e.g. --amp fp16 on a CPU: refused here, not after the folder exists
    root = fetch_data(args, dist)
    ds = data.discover(root)
    if run_dir is not None:
        if ckpt is not None and ckpt["class_names"] != ds.classes:
            raise UserError(f"classes in {root} differ from the run's: {ckpt['class_names']}")
        train_samples, val_samples = data.split_from_json(ds.root, split, ds.classes)
    else:
        train_idx, val_idx = data.stratified_split(ds.train, args.val_fraction, args.seed)
        split = data.split_to_json(ds.root, ds.train, train_idx, val_idx)
        train_samples = [ds.train[i] for i in train_idx]
        val_samples = [ds.train[i] for i in val_idx]
        if not val_samples:
            raise UserError("the validation split is empty; use --val_fraction > 0")
    sides = {path: photo_short_side(path) for path, _ in train_samples + val_samples}  # headers only
    data.check_trainable(ds.classes, train_samples, {p for p, side in sides.items() if not side}, root / "train")
    if run_dir is None:
        if validate is not None:
            validate(len(ds.classes))  # bad model flags fail before a run folder exists
        run_dir = broadcast(new_run_dir(args, name, split) if dist.main else None, dist)
    return RunSetup(args, run_dir, ds.root, ds.classes, train_samples, val_samples, split, ckpt, dist, device, sides)


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


RUN_START_FILES = {"split.json", "args.json", LOCK_FILE}  # what a run folder holds before its first checkpoint


def new_run_dir(args: argparse.Namespace, name: str, split: dict) -> Path:
    """Create and hold the run folder (unique unless --run_name) with split.json and args.json.

    A --run_name folder without training state (an earlier start stopped or failed before its
    first last.pt) is started again; a folder this process created is removed when the run fails
    before its first checkpoint. A folder another process holds is never touched.
    """
    if args.run_name:
        run_dir = Path(args.out_dir) / args.run_name
        hold_folder(run_dir, make=True, hint="wait for it to end, or choose another --run_name")
        state = saved_state(run_dir)
        if state != "none":
            release_folder(run_dir)
            raise (
                lost_state_error(run_dir)
                if state == "lost"
                else UserError(
                    f"run folder {run_dir} already exists; pass --resume {run_dir} to continue it, or choose "
                    f"another --run_name"
                )
            )
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            print(f"{run_dir} has no last.pt (an earlier start stopped before one was saved): starting it again")
    else:
        run_dir = unique_run_dir(Path(args.out_dir), f"{name}-{datetime.now():%Y%m%d-%H%M%S}")
        hold_folder(run_dir, make=False, hint="choose a --run_name")
    on_failure(lambda interrupted: release_folder(run_dir))  # hooks run last-first: after the clean-up
    on_failure(lambda interrupted: forget_unstarted(run_dir, interrupted))
    atomic_write_text(run_dir / "split.json", json.dumps(split))
    atomic_write_text(run_dir / "args.json", json.dumps(json_safe(vars(args)), indent=1))
    return run_dir


def forget_unstarted(run_dir: Path, interrupted: bool) -> str | None:
    """After an error, remove a run folder that holds nothing but its start files; after Ctrl-C, or when
    a best.pt has no last.pt beside it (a full disk), say how to start it again (cli.on_failure hook)."""
    if saved_state(run_dir) != "none":
        return None
    if any(run_dir.glob("*.pt")):
        return (
            f"({run_dir} has no last.pt to resume from: once that is fixed, the same command or --resume "
            f"{run_dir} starts it over from epoch 1)"
        )
    if interrupted:
        return f"({run_dir} has no checkpoint yet: the same command, or --resume {run_dir}, starts it over)"
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= RUN_START_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)
    return None


def write_result(run_dir: Path, state_epoch: int, best_val_acc: float, best_epoch: int) -> None:
    """Mark the run complete: result.json, written atomically, read by sweep runners."""
    result = json.dumps(
        {
            "epochs": state_epoch,
            "best_val_acc": best_val_acc,
            "best_epoch": best_epoch,
            "ended": datetime.now().isoformat(timespec="seconds"),
        }
    )
    atomic_write_text(run_dir / RESULT_FILE, result)


def epoch_line(row: dict, epochs: int) -> str:
    """The console line of an epoch row: every field of the schema (cli.EPOCH_ROW), in its order."""
    return "  ".join(shown.format(row[key], epochs=epochs) for key, shown in EPOCH_ROW.items())


def write_metrics_csv(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.csv from the history (idempotent, so a resume never duplicates rows).

    Every row must hold exactly the schema's fields (cli.EPOCH_ROW): a key added to the row but not
    to the schema would reach W&B and not the file, so it stops the run instead.
    """
    for row in history:
        if set(row) != set(METRIC_FIELDS):
            raise ValueError(f"the epoch row's keys {sorted(row)} differ from cli.EPOCH_ROW's {sorted(METRIC_FIELDS)}")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", text.getvalue())


def read_metrics_csv(path: str | Path) -> list[dict]:
    """metrics.csv rows, each number a float and the epoch an int; a cell that holds no number is left out
    (a sweep's program may log any columns)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            numbers = {}
            for key, value in row.items():
                try:
                    numbers[key] = float(value)
                except (TypeError, ValueError):
                    continue
            if "epoch" in numbers and numbers["epoch"].is_integer():
                numbers["epoch"] = int(numbers["epoch"])
            rows.append(numbers)
    return rows
