"""Command-line plumbing shared by every script: the one UserError, flag helpers, the one-line-error runner."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

# The columns of every run's metrics.csv (written by runs.write_metrics_csv): what a sweep's metric can name.
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time")


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit 2, no traceback."""


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
    """A flag under both spellings, --name_with_underscores and --name-with-hyphens."""
    group.add_argument(*spellings(name), dest=name, **kwargs)


def add_bool(group, name: str, default: bool | None, help: str, default_text: str | None = None) -> None:
    """`--name`, `--name=False` (as wandb agent passes it), and `--no-name`.

    default_text describes a default that is decided later (default None), e.g. by a recipe.
    """
    shown = default_text if default_text is not None else default
    group.add_argument(*spellings(name), dest=name, type=str2bool, nargs="?", const=True,
                       default=default, metavar="BOOL",
                       help=f"{help} (default: {shown}; --no-{name} turns it off)")
    group.add_argument(*dict.fromkeys([f"--no-{name}", f"--no-{name.replace('_', '-')}", f"--no_{name}"]),
                       dest=name, action="store_false", help=argparse.SUPPRESS)


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
