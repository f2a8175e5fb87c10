"""The training loop shared by Part A and Part B: flags, run folders, AMP steps, checkpoints, logging.

Scripts call `add_training_args` for the common flags, `setup_run` to get the data and run folder,
then `fit` with their model; `load_checkpoint` is the one safe way to read a checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import netrc
import os
import pickle
import random
import signal
import sys
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

import data
from data import UserError

CHECKPOINT_FORMAT = "inat-classifier/1"
CHECKPOINT_KEYS = ("model_state", "spec", "class_names", "image_size", "mean", "std", "config")
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time")


# ----------------------------------------------------------------------------- flags
def str2bool(value: str | bool) -> bool:
    """Parse what `wandb agent` and people pass: True/False, true/false, 1/0, yes/no."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "t", "1", "yes", "y", "on"):
        return True
    if v in ("false", "f", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0, yes/no), got '{value}'")


def spellings(name: str) -> list[str]:
    """`--batch_size` and its hyphen spelling `--batch-size`."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return names


def add_flag(group, name: str, **kwargs) -> None:
    group.add_argument(*spellings(name), dest=name, **kwargs)


def add_bool(group, name: str, default: bool, help: str) -> None:
    """`--name`, `--name=False` (as wandb agent passes it), and `--no-name`."""
    group.add_argument(*spellings(name), dest=name, type=str2bool, nargs="?", const=True,
                       default=default, metavar="BOOL",
                       help=f"{help} (default: {default}; --no-{name} turns it off)")
    group.add_argument(*dict.fromkeys([f"--no-{name}", f"--no-{name.replace('_', '-')}", f"--no_{name}"]),
                       dest=name, action="store_false", help=argparse.SUPPRESS)


def add_training_args(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The data, optimisation, run and logging flags shared by both training scripts."""
    d = defaults
    g = parser.add_argument_group("data")
    add_flag(g, "data_dir", default=data.DEFAULT_DATA_DIR,
             help="dataset root holding train/<class>/ and a held-out val/ or test/ (default: %(default)s)")
    add_bool(g, "download", False, "download nature_12K.zip first when --data_dir is missing")
    add_flag(g, "val_fraction", type=float, default=0.2,
             help="fraction of every class of train/ held out for validation (default: %(default)s)")
    add_flag(g, "image_size", type=int, default=d.get("image_size", 224),
             help="input size in pixels, square (default: %(default)s)")
    add_bool(g, "augment", d.get("augment", False),
             "random resized crop, horizontal flip and colour jitter on training images")
    add_flag(g, "crop_scale", type=float, default=d.get("crop_scale", 0.25),
             help="smallest area fraction the random resized crop keeps; higher = milder augmentation "
                  "(default: %(default)s)")
    add_flag(g, "batch_size", type=int, default=d.get("batch_size", 64), help="batch size (default: %(default)s)")
    add_flag(g, "workers", type=int, default=min(8, os.cpu_count() or 1),
             help="data loading processes (default: %(default)s, the number of cores up to 8)")
    add_flag(g, "cache", default="auto", metavar="auto|off|DIR",
             help="decode every image once to a memory-mapped uint8 array and augment batches on the device; "
                  "auto keeps it in $INAT_CACHE_DIR or ~/.cache/inat-classifier, off decodes JPEGs every "
                  "epoch with PIL (default: %(default)s)")

    g = parser.add_argument_group("optimisation")
    add_flag(g, "epochs", type=int, default=d.get("epochs", 10), help="training epochs (default: %(default)s)")
    add_flag(g, "optimizer", default=d.get("optimizer", "adamw"), choices=("adam", "adamw", "sgd"),
             help="optimizer (default: %(default)s)")
    add_flag(g, "lr", type=float, default=d.get("lr", 1e-3), help="peak learning rate (default: %(default)s)")
    add_flag(g, "weight_decay", type=float, default=d.get("weight_decay", 0.05),
             help="weight decay, not applied to biases and norm layers (default: %(default)s)")
    add_flag(g, "momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    add_flag(g, "scheduler", default=d.get("scheduler", "cosine"), choices=("cosine", "onecycle", "step", "none"),
             help="learning-rate schedule, stepped every batch (default: %(default)s)")
    add_flag(g, "warmup_epochs", type=float, default=d.get("warmup_epochs", 1.0),
             help="linear warm-up from lr/100 over this many epochs (default: %(default)s)")
    add_flag(g, "label_smoothing", type=float, default=d.get("label_smoothing", 0.1),
             help="label smoothing of the cross-entropy loss (default: %(default)s)")
    add_flag(g, "grad_clip", type=float, default=0.0, help="clip the gradient norm to this; 0 = off (default: %(default)s)")
    add_flag(g, "mixup", type=float, default=d.get("mixup", 0.0),
             help="MixUp with this Beta alpha on training batches; 0 = off (default: %(default)s)")
    add_flag(g, "cutmix", type=float, default=d.get("cutmix", 0.0),
             help="CutMix with this Beta alpha (one of MixUp/CutMix per batch when both are on); 0 = off (default: %(default)s)")
    add_flag(g, "ema", type=float, default=d.get("ema", 0.0),
             help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                  "validate and save it; 0 = off (default: %(default)s)")
    add_bool(g, "lr_find", False, "sweep the LR exponentially over a few hundred steps, save lr_find.png, "
             "print a suggestion, restore the model and exit")
    add_flag(g, "patience", type=int, default=0,
             help="stop after this many epochs without a better val_acc; 0 = never (default: %(default)s)")
    add_flag(g, "seed", type=int, default=42, help="random seed for the split, init and batches (default: %(default)s)")
    add_flag(g, "amp", default="auto", choices=("auto", "fp16", "bf16", "off"),
             help="mixed precision: auto = fp16 autocast + GradScaler on CUDA, off elsewhere (default: %(default)s)")
    add_flag(g, "device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: %(default)s)")
    add_bool(g, "channels_last", True, "channels-last memory format (faster convolutions on recent GPUs and "
             "on x86 CPUs)")
    add_bool(g, "compile", False, "torch.compile the model (faster steps after a one-off compile)")

    g = parser.add_argument_group("run folder and logging")
    add_flag(g, "out_dir", default="runs", help="parent folder of run folders (default: %(default)s)")
    add_flag(g, "run_name", default=None, help="run folder name (default: built from the hyperparameters and time)")
    add_flag(g, "resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    add_flag(g, "save_every", type=int, default=0,
             help="also write last.pt every N batches, for very long epochs; 0 = end of epoch only (default: %(default)s)")
    add_flag(g, "wandb", default="auto", choices=("auto", "online", "offline", "disabled"),
             help="W&B logging: auto = online when an API key is configured, else offline (default: %(default)s)")
    add_flag(g, "wandb_project", default=d.get("wandb_project", "inat12k"), help="W&B project (default: %(default)s)")
    add_flag(g, "wandb_entity", default=None, help="W&B entity (team or user); default: your default entity")


def check_common_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if not 0 < args.crop_scale <= 1:
        raise UserError(f"--crop_scale must be in (0, 1], got {args.crop_scale}")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    for name in ("patience", "save_every", "warmup_epochs", "weight_decay", "grad_clip", "mixup", "cutmix"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
            argv: list[str] | None = None) -> None:
    """Parse and run; bad input becomes one 'error:' line and exit code 2, never a traceback."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except (UserError, ValueError, OSError) as e:  # OSError: unwritable folders, vanished files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; lower --batch_size or --image_size, or use --amp fp16/bf16", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- device, AMP
def select_device(name: str = "auto") -> torch.device:
    device = _resolve_device(name)
    if device.type == "cpu":
        data.keep_freed_memory()  # about 2x faster CPU steps and batches: no page faults per batch
    return device


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # under torchrun, each process takes its own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available on this machine")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    if mode == "fp16":
        if device.type == "cpu":
            raise UserError("--amp fp16 needs a GPU; use --amp bf16 or off on CPU")
        return torch.float16
    return torch.bfloat16 if mode == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ----------------------------------------------------------------------------- optimisation
def param_groups_with_decay(named_params: Iterable[tuple[str, nn.Parameter]], lr: float,
                            weight_decay: float, name: str) -> list[dict]:
    """Split parameters so biases and norm weights (1-d) get no weight decay."""
    decay, no_decay = [], []
    for _, p in named_params:
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": name + "_no_decay"})
    return groups


def build_optimizer(groups: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=args.lr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of each group's base LR at a given optimizer step."""
    if warmup > 0 and step < warmup:
        return 0.01 + 0.99 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":  # x0.1 at 1/3 and 2/3 of training
        return 0.1 ** int(3 * progress if progress < 1 else 2)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int):
    total = max(1, args.epochs * steps_per_epoch)
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=max(0.05, min(0.5, args.warmup_epochs / max(1, args.epochs))),
            cycle_momentum=args.optimizer == "sgd")
    warmup = int(args.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, args.scheduler))


# ----------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file, fsync, then rename: a crash mid-write never breaks `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict:
    """Load one of our checkpoints safely (weights_only); any other file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a PyTorch checkpoint, or truncated (no zip archive structure)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unsupported content"
        raise UserError(f"{path}: refused to load: it holds objects beyond weights and plain data "
                        f"(not one of our checkpoints, or unsafe): {reason[:150]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt): "
                        f"{str(e).splitlines()[0][:150] if str(e) else type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by this tool (no '{CHECKPOINT_FORMAT}' format tag)")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint, it lacks {', '.join(missing)}")
    with zipfile.ZipFile(path) as zf:  # torch.load does not check the CRCs torch.save wrote
        bad = zf.testzip()
    if bad is not None:
        raise UserError(f"{path}: corrupt checkpoint (bad CRC in {bad})")
    return ckpt


def load_weights(model: nn.Module, state: dict, path: str | Path) -> None:
    """Load a state dict, turning architecture or class-set mismatches into one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"{path}: weights do not fit the model (other architecture or class set): {detail[:200]}") from None


def json_safe(config: dict) -> dict:
    """Flags as plain JSON types, so they load with weights_only=True and dump to args.json."""
    out = {}
    for k, v in config.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (bool, int, float, str)) else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) when launched by torchrun."""
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
        if use_nccl:
            torch.cuda.set_device(local_rank)
        td.init_process_group("nccl" if use_nccl else "gloo")
    return Dist(rank, world, local_rank)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all processes (identity without torchrun)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's value of obj on every process."""
    if dist.world == 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- run setup
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
    root = data.ensure_data(args.data_dir, args.download)
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


# ----------------------------------------------------------------------------- loaders
def open_cache(setup: RunSetup, image_size: int) -> tuple[data.DecodedCache, dict] | None:
    """The decoded-image cache over all of train/ (both sides of any split), or None with --cache off."""
    args = setup.args
    if args.cache == "off":
        return None
    cache_dir = data.default_cache_dir() if args.cache == "auto" else Path(args.cache)
    samples = sorted(set(setup.train_samples) | set(setup.val_samples))
    size = data.cache_size(image_size, args.augment)
    cache = data.open_decoded_cache([p for p, _ in samples], size, cache_dir, args.workers)
    return cache, {s: i for i, s in enumerate(samples)}


def make_image_loader(setup: RunSetup, samples: list, image_size: int, mean, std, device: torch.device,
                      train: bool, cached: tuple | None, shard: bool = True):
    """Batches of one split: from the decoded cache (device-side augmentation) or decoded with PIL.

    shard=False gives every process all the samples (e.g. to compute a complete feature cache).
    """
    args, dist = setup.args, (setup.dist if shard else Dist())
    augment = train and args.augment
    batch = setup.rank_batch_size if shard else args.batch_size
    drop_last = train and len(samples) > args.batch_size
    # Training shards are padded to equal length (as DistributedSampler); validation shards are
    # not, so every validation image is counted exactly once over all processes.
    sampler = data.EpochSampler(len(samples), args.seed, shuffle=train, rank=dist.rank, world=dist.world, pad=train)
    if cached is not None:
        cache, pos = cached
        return data.DeviceLoader(cache, [pos[s] for s in samples], [label for _, label in samples],
                                 batch, image_size, mean, std, device, augment=augment,
                                 sampler=sampler, seed=args.seed, drop_last=drop_last,
                                 channels_last=getattr(args, "channels_last", False), crop_scale=args.crop_scale)
    train_tf, eval_tf = data.build_transforms(image_size, augment, mean, std, args.crop_scale)
    ds = data.ImageListDataset(samples, train_tf if train else eval_tf)
    return data.make_loader(ds, batch, False, args.workers, sampler=sampler,
                            pin_memory=device.type == "cuda", drop_last=drop_last, seed=args.seed)


def image_loaders(setup: RunSetup, image_size: int, mean, std, device: torch.device):
    """Train and val loaders (train shuffled, and augmented with --augment)."""
    cached = open_cache(setup, image_size)
    return (make_image_loader(setup, setup.train_samples, image_size, mean, std, device, True, cached),
            make_image_loader(setup, setup.val_samples, image_size, mean, std, device, False, cached))


# ----------------------------------------------------------------------------- logging
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


def plot_curves(histories: dict[str, list[dict]], out: Path) -> None:
    """Loss and accuracy per epoch, train dashed and val solid, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (label, hist) in enumerate(histories.items()):
        color = f"C{i % 10}"
        epochs = [h["epoch"] for h in hist]
        prefix = f"{label} " if len(histories) > 1 else ""
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(epochs, [h[f"train_{key}"] for h in hist], "--o", color=color, ms=3, label=f"{prefix}train")
            ax.plot(epochs, [h[f"val_{key}"] for h in hist], "-o", color=color, ms=3, label=f"{prefix}val")
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    candidates = [os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc"]
    for path in filter(None, candidates):
        try:
            hosts = netrc.netrc(str(path)).hosts
        except (OSError, netrc.NetrcParseError):
            continue
        if any("wandb" in h for h in hosts):
            return True
    return False


class WandbLogger:
    """W&B that never prompts and needs no account: auto picks online only when a key exists."""

    @classmethod
    def off(cls) -> "WandbLogger":
        logger = cls.__new__(cls)
        logger.run = None
        return logger

    def __init__(self, args: argparse.Namespace, run_dir: Path, name: str, config: dict) -> None:
        self.run = None
        mode = args.wandb
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            if mode == "auto":
                print("W&B: wandb is not installed; logging only to metrics.csv")
                return
            raise UserError(f"--wandb {mode} needs the wandb package (pip install wandb), or use --wandb disabled")
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE")
            if env_mode in ("online", "offline", "disabled", "dryrun", "run"):
                mode = {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)
            elif wandb_api_key_configured():
                mode = "online"
            else:
                mode = "offline"
                print(f"W&B: no API key configured, logging offline to {run_dir / 'wandb'} "
                      f"(upload later with 'wandb sync {run_dir / 'wandb'}/offline-run-*')")
        if mode == "disabled":
            return
        self.wandb = wandb
        kwargs = dict(project=args.wandb_project, entity=args.wandb_entity, name=name,
                      config=config, dir=str(run_dir))
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # no key, no network: never lose the run over logging
            if mode != "online":
                raise UserError(f"W&B could not start in {mode} mode: {str(e).splitlines()[0][:200]}") from None
            print(f"W&B: online logging failed ({str(e).splitlines()[0][:150]}); logging offline instead")
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None and path.exists():
            self.run.log({key: self.wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ----------------------------------------------------------------------------- loop
def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal (or with TQDM_FORCE set) of rank 0; silent in logs, CI and other ranks."""
    from tqdm import tqdm

    quiet = (not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") is None) or os.environ.get("RANK", "0") != "0"
    return tqdm(iterable, dynamic_ncols=True, disable=quiet, **kwargs)


def say(message: str) -> None:
    """Print without breaking the progress bars."""
    from tqdm import tqdm

    tqdm.write(message)
    sys.stdout.flush()


class StopRequested:
    """Turns Ctrl-C / SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt ...", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signum is not None


class NonFiniteLoss(Exception):
    pass


def set_train_mode(model: nn.Module) -> None:
    """train(), but every frozen part (all its parameters frozen) stays in eval mode.

    Frozen batch norm keeps its running statistics, and a frozen body runs deterministically
    (no dropout or stochastic depth), exactly as when its features are cached.
    """
    model.train()
    for m in model.modules():
        if m is model:
            continue
        flags = [p.requires_grad for p in m.parameters()]
        if flags and not any(flags):
            m.eval()


@dataclass
class TrainState:
    """Everything that changes while training and is saved in last.pt."""

    epoch: int = 0  # completed epochs
    history: list = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    batches_done: int = 0  # within the current epoch, when saved mid-epoch
    partial: dict = field(default_factory=dict)  # running sums of the current epoch


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) on the device; reports the unreadable files a PIL batch skipped. None if nothing is left."""
    if len(batch) == 3:
        x, y, bad = batch
        for path, reason in bad:
            data.BAD_IMAGES.report(path, reason)
    else:
        x, y = batch
    if x is None:
        return None
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class StepExtras:
    """Optional per-step additions: batch mixing (MixUp/CutMix) and a weight EMA."""

    mix: Callable | None = None
    ema: nn.Module | None = None


def build_mix(args: argparse.Namespace, num_classes: int) -> Callable | None:
    """torchvision's MixUp / CutMix on whole batches (soft targets), or None."""
    if not (args.mixup > 0 or args.cutmix > 0):
        return None
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + \
            ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else [])
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def build_ema(model: nn.Module, decay: float) -> nn.Module | None:
    if decay <= 0:
        return None
    if not decay < 1:
        raise UserError(f"--ema must be in (0, 1), got {decay}")
    from torch.optim.swa_utils import AveragedModel

    def ema(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        # Warm-up (as timm does): early on the average follows the model closely, so short runs
        # are not validated on weights still dominated by the random initialisation.
        d = torch.clamp((1 + n) / (10 + n), max=decay).to(averaged.dtype)
        return averaged * d + current * (1 - d)

    return AveragedModel(model, avg_fn=ema, use_buffers=True)


class EmaWeights:
    """Within the block, the model holds the EMA's weights (for validation and checkpoints)."""

    def __init__(self, model: nn.Module, ema: nn.Module | None) -> None:
        self.model, self.ema, self.backup = model, ema, None

    def __enter__(self):
        if self.ema is not None:
            self.backup = [t.detach().clone() for t in self.tensors(self.model)]
            for dst, src in zip(self.tensors(self.model), self.tensors(self.ema.module)):
                dst.data.copy_(src.data)
        return self

    def __exit__(self, *exc) -> None:
        if self.backup is not None:
            for dst, src in zip(self.tensors(self.model), self.backup):
                dst.data.copy_(src)

    @staticmethod
    def tensors(m: nn.Module) -> list[torch.Tensor]:
        return list(m.parameters()) + [b for b in m.buffers() if b.dtype.is_floating_point]


def check_finite_weights(model: nn.Module, epoch: int, step: int) -> None:
    """Never save weights an overflowing update made NaN/inf as a 'good' checkpoint."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]  # BN statistics too
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        raise NonFiniteLoss(f"weights became non-finite at epoch {epoch}, batch {step}")


def train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, device, dtype,
                    epoch: int, args, state: TrainState, stop: StopRequested,
                    save_mid_epoch: Callable[[int, dict], None], extras: StepExtras | None = None) -> dict:
    """One pass over the training data; returns train_loss and train_acc."""
    extras = extras or StepExtras()
    set_train_mode(model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sums = {"loss": 0.0, "correct": 0.0, "seen": 0, **state.partial}
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen_since_sync, step = 0, state.batches_done
    t0, t_seen = time.perf_counter(), 0
    bar = progress(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, total=len(loader))

    # The first batch with a non-finite loss, tracked on the device so no step waits for it.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def sync(batch_idx: int) -> None:
        nonlocal seen_since_sync
        ls, cs, bad = loss_sum.item(), correct.item(), int(first_bad.item())
        failed = bad >= 0 or not math.isfinite(ls)
        if world > 1:  # every process must stop together, or the others wait forever
            failed = all_reduce_sum([float(failed)], device)[0] > 0
        if failed:
            raise NonFiniteLoss(f"loss became {ls} at epoch {epoch}, batch {bad if bad >= 0 else batch_idx}")
        sums["loss"] += ls
        sums["correct"] += cs
        sums["seen"] += seen_since_sync
        loss_sum.zero_(), correct.zero_()
        seen_since_sync = 0

    for batch in bar:
        moved = to_device(batch, device)
        if moved is None:  # every image of the batch was unreadable
            continue
        x, y = moved
        if extras.mix is not None:
            x, y = extras.mix(x, y)  # soft targets; accuracy below counts the dominant class
        with autocast(device, dtype):
            out = model(x)
            loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if extras.ema is not None:
            extras.ema.update_parameters(model)
        loss_d = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_d), step + 1, first_bad)
        loss_sum += loss_d * y.shape[0]
        correct += (out.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
        seen_since_sync += y.shape[0]
        t_seen += y.shape[0]
        step += 1
        checkpoint_due = bool(args.save_every) and step % args.save_every == 0
        if world > 1:
            # Processes agree on stopping only at shared points, so no collective is left waiting.
            stopping = (step % 20 == 0 or checkpoint_due) and all_reduce_sum([float(bool(stop))], device)[0] > 0
        else:
            stopping = bool(stop)
        if step % 20 == 0 or stopping or checkpoint_due:
            sync(step)
            bar.set_postfix(loss=f"{sums['loss'] / max(1, sums['seen']):.3f}",
                            acc=f"{sums['correct'] / max(1, sums['seen']):.3f}",
                            img_s=f"{t_seen / (time.perf_counter() - t0):.0f}")
        if stopping or checkpoint_due:
            check_finite_weights(model, epoch, step)
            save_mid_epoch(step, dict(sums))
            if stopping:
                stop.signum = stop.signum or signal.SIGTERM
                bar.close()
                return {}
    sync(step)
    check_finite_weights(model, epoch, step)
    bar.close()
    loss, correct_total, seen = all_reduce_sum([sums["loss"], sums["correct"], float(sums["seen"])], device)
    return {"train_loss": loss / max(1, seen), "train_acc": correct_total / max(1, seen)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None = None,
             criterion: nn.Module | None = None, return_outputs: bool = False) -> dict:
    """Loss and accuracy over a loader (each sample once); optionally the probabilities and targets."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n, probs, targets = 0, [], []
    for batch in loader:
        moved = to_device(batch, device)
        if moved is None:
            continue
        x, y = moved
        with autocast(device, dtype):
            out = model(x)
        out = out.float()
        loss_sum += criterion(out, y).double() * y.shape[0]
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
        if return_outputs:
            probs.append(out.softmax(1).cpu())
            targets.append(y.cpu())
    total_loss, total_correct, n = all_reduce_sum([loss_sum.item(), float(correct.item()), float(n)], device)
    n = int(n)
    result = {"loss": total_loss / max(1, n), "acc": total_correct / max(1, n), "n": n}
    if return_outputs:
        result["probs"] = torch.cat(probs) if probs else torch.zeros(0)
        result["targets"] = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return result


def checkpoint_payload(meta: dict, model: nn.Module, state: TrainState) -> dict:
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # a snapshot, not live tensors
    return {**meta, "format": CHECKPOINT_FORMAT, "model_state": weights, "epoch": state.epoch,
            "metrics": state.history, "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch}


def lr_range_test(model: nn.Module, loader, optimizer, criterion, device: torch.device, dtype,
                  start: float = 1e-7, end: float = 10.0, steps: int = 200, scaler=None) -> tuple[list, list, float]:
    """Exponentially increase the LR step by step, recording the smoothed loss; restores everything.

    Returns (lrs, losses, suggestion); see suggest_lr.
    """
    import copy

    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    base = [g["lr"] for g in optimizer.param_groups]  # keep the groups' LR ratios
    lrs, losses, smooth, best = [], [], None, math.inf
    set_train_mode(model)
    gamma = (end / start) ** (1 / max(1, steps - 1))
    if len(loader) == 0:
        raise UserError("--lr_find: the training loader is empty (lower --batch_size)")
    batches = iter(loader)
    try:
        for i in range(steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            moved = to_device(batch, device)
            if moved is None:
                continue
            x, y = moved
            lr = start * gamma**i
            for g, b in zip(optimizer.param_groups, base):
                g["lr"] = lr * b / base[0]
            with autocast(device, dtype):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:  # fp16 needs loss scaling here as in training
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            smooth = 0.98 * (smooth or 0.0) + 0.02 * loss.item()
            corrected = smooth / (1 - 0.98 ** (len(losses) + 1))  # debiased running mean
            lrs.append(lr)
            losses.append(corrected)
            best = min(best, corrected)
            if not math.isfinite(corrected) or corrected > 4 * best:
                break  # diverged: the rest of the range tells nothing
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
    suggestion = suggest_lr(lrs, losses)
    return lrs, losses, suggestion


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the LR at the lowest smoothed loss: the classic, robust rule of thumb."""
    if not lrs:
        return float("nan")
    return lrs[losses.index(min(losses))] / 10


def run_lr_finder(model, loader, optimizer, criterion, device, dtype, run_dir: Path, main: bool,
                  scaler=None) -> float:
    lrs, losses, suggestion = lr_range_test(model, loader, optimizer, criterion, device, dtype, scaler=scaler)
    if main:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.plot(lrs, losses)
        ax.axvline(suggestion, color="C3", ls="--", label=f"suggestion {suggestion:.1e}")
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "lr_find.png")
        plt.close(fig)
        print(f"LR finder: suggested --lr {suggestion:.1e} (plot: {run_dir / 'lr_find.png'}); model restored")
    return suggestion


def wrap_ddp(model: nn.Module, setup: RunSetup, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the currently trainable parameters (identity without torchrun)."""
    if setup.dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def fit(setup: RunSetup, model: nn.Module, train_loader, val_loader, param_groups: list[dict],
        meta: dict, device: torch.device, save_model: nn.Module | None = None,
        on_epoch_start: Callable[[int], bool] | None = None) -> TrainState:
    """Train with AMP, validate, checkpoint and log every epoch; resumable and interruptible.

    `model` is what runs on each batch; `save_model` (default `model`) is what the checkpoints
    hold, e.g. the full network when only its head trains on cached features. `meta` (spec, class
    names, normalisation, image size, split, config) goes into every checkpoint.
    `on_epoch_start(epoch)` returns True when it changed which parameters train.
    Under torchrun, rank 0 alone writes checkpoints, metrics and W&B.
    """
    args, run_dir, main = setup.args, setup.run_dir, setup.dist.main
    save_model = save_model or model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    # Checkpoints keep the plain module's state; only the steps run through the compiled one.
    compiled = torch.compile(model) if getattr(args, "compile", False) else model
    dtype = amp_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = build_optimizer(param_groups, args)
    if getattr(args, "lr_find", False):
        run_lr_finder(model, train_loader, optimizer, criterion, device, dtype, run_dir, main, scaler)
        finish_distributed()
        return TrainState()
    scheduler = build_scheduler(optimizer, args, len(train_loader))
    extras = StepExtras(build_mix(args, len(meta["class_names"])), build_ema(model, getattr(args, "ema", 0.0)))
    state = TrainState()
    if setup.resume is not None:
        ck = setup.resume
        load_weights(save_model, ck.get("train_state", ck["model_state"]), run_dir / "last.pt")
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        if extras.ema is not None and "ema" in ck:
            extras.ema.load_state_dict(ck["ema"])
        state = TrainState(ck["epoch"], ck["metrics"], ck["best_val_acc"], ck["best_epoch"],
                           ck.get("batches_done", 0), ck.get("partial", {}))
        print(f"resuming {run_dir} after epoch {state.epoch}"
              + (f", batch {state.batches_done}" if state.batches_done else ""))
    logger = WandbLogger(args, run_dir, run_dir.name, meta["config"]) if main else WandbLogger.off()
    meta = {**meta, "config": json_safe(meta["config"])}

    def save_last(batches_done: int = 0, partial: dict | None = None) -> None:
        if not main:
            return
        with EmaWeights(model, extras.ema):
            payload = checkpoint_payload(meta, save_model, state)
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       scaler=scaler.state_dict(), rng=rng_state(), batches_done=batches_done,
                       partial=partial or {})
        if getattr(train_loader, "generator", None) is not None:
            payload["loader_rng"] = train_loader.generator.get_state()
        if extras.ema is not None:
            payload["ema"] = extras.ema.state_dict()
            payload["train_state"] = {k: v.detach().clone() for k, v in save_model.state_dict().items()}
        atomic_torch_save(payload, run_dir / "last.pt")

    def end_of_epoch(epoch: int, row: dict, bad: int) -> bool:
        """Record the epoch (rank 0 writes files and logs); True when val_acc improved."""
        state.history.append(row)
        state.epoch = epoch
        improved = row["val_acc"] > state.best_val_acc
        if improved:
            state.best_val_acc, state.best_epoch = row["val_acc"], epoch
        if main:
            if improved:
                with EmaWeights(model, extras.ema):  # the weights that were validated
                    atomic_torch_save(checkpoint_payload(meta, save_model, state), run_dir / "best.pt")
            save_last()
            write_metrics_csv(run_dir, state.history)
            plot_curves({run_dir.name: state.history}, run_dir / "curves.png")
            logger.log({**row, "skipped_images": bad}, step=epoch)
            say(f"epoch {epoch:>3}/{args.epochs}  train_loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f}  "
                f"val_acc {row['val_acc']:.4f}  lr {row['lr']:.2e}  {row['epoch_time']:.1f}s"
                + (f"  ({bad} unreadable images skipped)" if bad else "") + ("  *" if improved else ""))
        return improved

    step_model = wrap_ddp(compiled, setup, device)
    try:
        with StopRequested() as stop:
            for epoch in progress(range(state.epoch + 1, args.epochs + 1), desc="epochs", initial=state.epoch,
                                  total=args.epochs):
                if on_epoch_start is not None and on_epoch_start(epoch):
                    step_model = wrap_ddp(compiled, setup, device)  # DDP must see newly trainable weights
                sampler = getattr(train_loader, "sampler", None)
                if isinstance(sampler, data.EpochSampler):
                    sampler.set_epoch(epoch, state.batches_done * setup.rank_batch_size)
                generator = getattr(train_loader, "generator", None)
                if state.batches_done and setup.resume is not None:
                    # Resumed mid-epoch: the saved RNG states continue the epoch where it stopped.
                    if generator is not None and "loader_rng" in setup.resume:
                        generator.set_state(setup.resume["loader_rng"])
                else:
                    # Per-epoch seeds make a resumed run draw the same augmentations and dropout.
                    torch.manual_seed(args.seed * 1000 + epoch + 7919 * setup.dist.rank)
                    if generator is not None:
                        generator.manual_seed(args.seed * 1000 + epoch + 7919 * setup.dist.rank)
                t0 = time.perf_counter()
                train = train_one_epoch(step_model, train_loader, optimizer, scheduler, scaler, criterion,
                                        device, dtype, epoch, args, state, stop, save_last, extras)
                if stop:
                    raise KeyboardInterrupt
                state.batches_done, state.partial = 0, {}
                with EmaWeights(model, extras.ema):
                    val = evaluate(step_model, val_loader, device, dtype, criterion)
                row = {"epoch": epoch, **train, "val_loss": val["loss"], "val_acc": val["acc"],
                       "lr": optimizer.param_groups[0]["lr"], "epoch_time": time.perf_counter() - t0}
                end_of_epoch(epoch, row, data.BAD_IMAGES.take_epoch_count())
                if args.patience and epoch - state.best_epoch >= args.patience:
                    print(f"early stop: no better val_acc for {args.patience} epochs")
                    break
    except KeyboardInterrupt:
        logger.finish()
        if main:
            print(f"interrupted: progress is in {run_dir / 'last.pt'}; continue with --resume {run_dir}",
                  file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as e:
        logger.finish()
        last_good = run_dir / "last.pt"
        raise UserError(f"{e}; stopped instead of training on garbage. Last good checkpoint: "
                        f"{last_good if last_good.exists() else 'none yet'} (try a lower --lr or --grad_clip)") from None
    except Exception:  # never leave a W&B run open on an unexpected error
        logger.finish()
        raise
    if state.best_val_acc >= 0 and logger.run is not None:
        logger.run.summary["best_val_acc"] = state.best_val_acc
    logger.log_image("curves", run_dir / "curves.png")
    logger.finish()
    finish_distributed()
    return state


def report(setup: RunSetup, state: TrainState) -> None:
    """The closing lines of a training script (rank 0 only)."""
    if setup.dist.main and not getattr(setup.args, "lr_find", False):
        print(f"run folder: {setup.run_dir}")
        print(f"best val_acc: {state.best_val_acc:.4f} (epoch {state.best_epoch})")


def finish_distributed() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()
