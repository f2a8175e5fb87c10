"""The command-line flags both training scripts share (data, optimisation, run folder, logging) and their checks."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from inat_classifier.cli import UserError, add_bool, add_flag, str2bool
from inat_classifier.config_file import CONFIG_HELP
from inat_classifier.dataset import DEFAULT_DATA_DIR


def add_training_args(
    parser: argparse.ArgumentParser, defaults: dict[str, Any], default_notes: dict[str, str] | None = None
) -> None:
    """The data, optimisation, run and logging flags shared by both training scripts.

    `defaults` sets a script's own defaults; `default_notes` explains defaults that the script
    decides later (None in `defaults`), e.g. Part B's image size from the chosen weights.
    """
    d, notes = defaults, default_notes or {}
    add_flag(parser.add_argument_group("config file"), "config", default=None, metavar="FILE", help=CONFIG_HELP)
    g = parser.add_argument_group("data")
    add_flag(
        g,
        "data_dir",
        default=DEFAULT_DATA_DIR,
        help="dataset root holding train/<class>/ and a held-out val/ or test/ (default: %(default)s)",
    )
    add_flag(
        g,
        "download",
        type=download_choice,
        default="auto",
        nargs="?",
        const="yes",
        metavar="auto|yes|no",
        help="fetch nature_12K.zip when the data folder is missing: auto = only into the default "
        "--data_dir (a first run), never into one you typed; yes = into any; no = never "
        "(default: %(default)s; --download alone means yes)",
    )
    add_flag(
        g,
        "data_url",
        default=None,
        help="where --download fetches the archive from (default: $INAT12K_URL when set, for a mirror, "
        "else the official nature_12K.zip)",
    )
    add_flag(
        g,
        "val_fraction",
        type=float,
        default=0.2,
        help="fraction of every class of train/ held out for validation (default: %(default)s)",
    )
    add_flag(
        g,
        "image_size",
        type=int,
        default=d.get("image_size", 224),
        help=f"input size in pixels, square (default: {notes.get('image_size', '%(default)s')})",
    )
    add_bool(
        g,
        "augment",
        d.get("augment", False),
        "random resized crop, horizontal flip and colour jitter on training images",
        notes.get("augment"),
    )
    add_flag(
        g,
        "crop_scale",
        type=float,
        default=d.get("crop_scale", 0.25),
        help="smallest area fraction the random resized crop keeps; higher = milder augmentation "
        "(default: %(default)s)",
    )
    add_flag(g, "batch_size", type=int, default=d.get("batch_size", 64), help="batch size (default: %(default)s)")
    add_flag(
        g,
        "workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data loading processes (default: %(default)s, the number of cores up to 8)",
    )
    add_flag(
        g,
        "cache",
        default="auto",
        metavar="auto|off|DIR",
        help="decode every image once to a memory-mapped uint8 array; auto keeps it in $INAT_CACHE_DIR or "
        "~/.cache/inat-classifier, off decodes the same rows every epoch in --workers processes "
        "(the same training either way; batches are augmented on the device) (default: %(default)s)",
    )

    g = parser.add_argument_group("optimisation")
    add_flag(g, "epochs", type=int, default=d.get("epochs", 10), help="training epochs (default: %(default)s)")
    add_flag(
        g,
        "optimizer",
        default=d.get("optimizer", "adamw"),
        choices=("adam", "adamw", "sgd"),
        help="optimizer (default: %(default)s)",
    )
    add_flag(g, "lr", type=float, default=d.get("lr", 1e-3), help="peak learning rate (default: %(default)s)")
    add_flag(
        g,
        "weight_decay",
        type=float,
        default=d.get("weight_decay", 0.05),
        help="weight decay, not applied to biases and norm layers (default: %(default)s)",
    )
    add_flag(g, "momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    add_flag(
        g,
        "scheduler",
        default=d.get("scheduler", "cosine"),
        choices=("cosine", "onecycle", "step", "none"),
        help="learning-rate schedule, stepped every batch (default: %(default)s)",
    )
    add_flag(
        g,
        "warmup_epochs",
        type=float,
        default=d.get("warmup_epochs", 1.0),
        help="linear warm-up from lr/100 over this many epochs (default: %(default)s)",
    )
    add_flag(
        g,
        "label_smoothing",
        type=float,
        default=d.get("label_smoothing", 0.1),
        help="label smoothing of the cross-entropy loss (default: %(default)s)",
    )
    add_flag(
        g,
        "class_weights",
        default="none",
        choices=("none", "balanced"),
        help="cross-entropy weights per class: balanced = n_samples / (n_classes x count) of the training split, "
        "as scikit-learn's, for imbalanced datasets (default: %(default)s)",
    )
    add_flag(
        g,
        "sampler",
        default="random",
        choices=("random", "balanced"),
        help="epoch order: random = every training photo once; balanced = as many draws, with replacement, each "
        "class equally likely, for imbalanced datasets (default: %(default)s)",
    )
    add_flag(
        g,
        "accum_steps",
        type=int,
        default=1,
        help="batches whose gradients add up to one optimizer step (gradient accumulation: the "
        "effective batch is batch_size x accum_steps; the schedule counts optimizer steps) "
        "(default: %(default)s)",
    )
    add_flag(
        g, "grad_clip", type=float, default=0.0, help="clip the gradient norm to this; 0 = off (default: %(default)s)"
    )
    add_flag(
        g,
        "mixup",
        type=float,
        default=d.get("mixup", 0.0),
        help="MixUp with this Beta alpha on training batches; 0 = off (default: %(default)s)",
    )
    add_flag(
        g,
        "cutmix",
        type=float,
        default=d.get("cutmix", 0.0),
        help="CutMix with this Beta alpha (one of MixUp/CutMix per batch when both are on); 0 = off "
        "(default: %(default)s)",
    )
    add_flag(
        g,
        "ema",
        type=float,
        default=d.get("ema", 0.0),
        help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
        "validate and save it; 0 = off (default: %(default)s)",
    )
    add_bool(
        g,
        "lr_find",
        False,
        "sweep the LR exponentially over a few hundred steps, save lr_find.png, "
        "print a suggestion, restore the model and exit",
    )
    add_flag(
        g,
        "patience",
        type=int,
        default=0,
        help="stop after this many epochs without a better val_acc; 0 = never (default: %(default)s)",
    )
    add_flag(g, "seed", type=int, default=42, help="random seed for the split, init and batches (default: %(default)s)")
    add_flag(
        g,
        "amp",
        default="auto",
        choices=("auto", "fp16", "bf16", "off"),
        help="mixed precision: auto = bf16 autocast on CUDA GPUs that have it (compute capability 8+), fp16 "
        "autocast + GradScaler on older ones, off elsewhere (default: %(default)s)",
    )
    add_flag(
        g,
        "device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: %(default)s)",
    )
    add_bool(
        g, "channels_last", True, "channels-last memory format (faster convolutions on recent GPUs and on x86 CPUs)"
    )
    add_bool(g, "compile", False, "torch.compile the model (faster steps after a one-off compile)")

    g = parser.add_argument_group("run folder and logging")
    add_flag(g, "out_dir", default="runs", help="parent folder of run folders (default: %(default)s)")
    add_flag(g, "run_name", default=None, help="run folder name (default: built from the hyperparameters and time)")
    add_flag(g, "resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    add_flag(
        g,
        "save_every",
        type=int,
        default=0,
        help="also write last.pt every N batches, for very long epochs; 0 = end of epoch only (default: %(default)s)",
    )
    add_flag(
        g,
        "wandb",
        default="auto",
        choices=("auto", "online", "offline", "disabled"),
        help="W&B logging: auto = online when an API key is configured, else offline (default: %(default)s)",
    )
    add_flag(g, "wandb_project", default=d.get("wandb_project", "inat12k"), help="W&B project (default: %(default)s)")
    add_flag(g, "wandb_entity", default=None, help="W&B entity (team or user); default: your default entity")


def download_choice(value: str) -> str:
    """auto, yes or no; also the booleans wandb agent passes (--download=True is yes)."""
    v = str(value).strip().lower()
    if v in ("auto", "yes", "no"):
        return v
    try:
        return "yes" if str2bool(v) else "no"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, yes or no, got '{value}'") from None


MAX_SEED = 2**32 - 1  # numpy's range; the per-epoch seeds (seed * 1000 + epoch) stay in torch's 64 bits
MAX_IMAGE_SIZE = 2048  # beyond any photo of these datasets; larger sizes only exhaust memory


def check_common_args(args: argparse.Namespace) -> None:
    """Every shared flag in range (NaN and inf refused, naming the flag), before anything is created."""
    check_counts(args)
    if args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if not 0 < args.crop_scale <= 1:
        raise UserError(f"--crop_scale must be in (0, 1], got {args.crop_scale}")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.image_size is not None and args.image_size > MAX_IMAGE_SIZE:
        raise UserError(f"--image_size must be <= {MAX_IMAGE_SIZE}, got {args.image_size}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, {MAX_SEED}], got {args.seed}")
    if args.ema and not 0 < args.ema < 1:
        raise UserError(f"--ema must be in (0, 1), got {args.ema}")
    check_run_name(args.run_name)


def check_counts(args: argparse.Namespace) -> None:
    """Finite numbers, counts of at least 1 and amounts of at least 0, naming the flag."""
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
    for name in ("epochs", "batch_size", "image_size", "accum_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("patience", "save_every", "warmup_epochs", "weight_decay", "grad_clip", "mixup", "cutmix", "momentum"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")


def check_run_name(name: str | None) -> None:
    """--run_name is one folder inside --out_dir: no path separators, no '..'."""
    if name is None:
        return
    if not name.strip() or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise UserError(f"--run_name must be a plain folder name inside --out_dir (no '/' or '..'), got '{name}'")
