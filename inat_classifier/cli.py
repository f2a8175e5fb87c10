"""Command-line plumbing shared by every script: the one UserError, flag helpers, the one-line-error runner."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from inat_classifier.startup import INTERRUPTED, imports_done, leave_torchrun_process, work_done

# What a run folder holds that sweep runners read (written by runs.py; here for the lower layers too):
# The epoch row, its one schema: metrics.csv's columns in order, W&B's keys, and how the console line
# shows each (runs.epoch_line). A row with another key is refused when metrics.csv is written.
EPOCH_ROW = {
    "epoch": "epoch {:>3}/{epochs}",
    "train_loss": "train_loss {:.4f}",
    "train_acc": "train_acc {:.4f}",
    "val_loss": "val_loss {:.4f}",
    "val_acc": "val_acc {:.4f}",
    "lr": "lr {:.2e}",
    "epoch_time": "{:.1f}s",
}
METRIC_FIELDS = tuple(EPOCH_ROW)  # metrics.csv
RESULT_FILE = "result.json"  # written once a run has trained all its epochs (or stopped early)


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


def mark_typed(namespace: argparse.Namespace, dest: str) -> None:
    namespace._typed_flags = getattr(namespace, "_typed_flags", frozenset()) | {dest}


class StoreTyped(argparse._StoreAction):
    """argparse's store, noting that the flag was typed (see `typed_flags`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        mark_typed(namespace, self.dest)


class StoreFalseTyped(argparse._StoreFalseAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        mark_typed(namespace, self.dest)


def typed_flags(args: argparse.Namespace) -> frozenset[str]:
    """The flags typed on the command line, as opposed to defaults (e.g. --epochs on --resume)."""
    return getattr(args, "_typed_flags", frozenset())


def add_flag(group, name: str, **kwargs) -> None:
    """A flag under both spellings, --name_with_underscores and --name-with-hyphens."""
    group.add_argument(*spellings(name), dest=name, **({"action": StoreTyped} | kwargs))


def add_bool(group, name: str, default: bool | None, help: str, default_text: str | None = None) -> None:
    """`--name`, `--name=False` (as wandb agent passes it), and `--no-name`.

    default_text describes a default that is decided later (default None), e.g. by a recipe.
    """
    shown = default_text if default_text is not None else default
    group.add_argument(
        *spellings(name),
        dest=name,
        action=StoreTyped,
        type=str2bool,
        nargs="?",
        const=True,
        default=default,
        metavar="BOOL",
        help=f"{help} (default: {shown}; --no-{name} turns it off)",
    )
    group.add_argument(
        *dict.fromkeys([f"--no-{name}", f"--no-{name.replace('_', '-')}", f"--no_{name}"]),
        dest=name,
        action=StoreFalseTyped,
        help=argparse.SUPPRESS,
    )


FAILURE_HOOKS: list[Callable[[bool], str | None]] = []  # see on_failure


def on_failure(hook: Callable[[bool], str | None]) -> None:
    """Run hook(interrupted) when the script stops on an error or Ctrl-C/SIGTERM; it may return a hint.

    E.g. a run folder created moments before a one-line error is removed again.
    """
    FAILURE_HOOKS.append(hook)


def fail(message: str, code: int, interrupted: bool = False) -> None:
    hints = [h for h in (hook(interrupted) for hook in reversed(FAILURE_HOOKS)) if h]
    FAILURE_HOOKS.clear()
    print(" ".join([message, *hints]), file=sys.stderr, flush=True)
    sys.exit(code)


def is_out_of_host_memory(error: RuntimeError) -> bool:
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text


def run_cli(
    main: Callable[[argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    parse: Callable[[argparse.ArgumentParser, list[str] | None], argparse.Namespace] | None = None,
) -> None:
    """Parse and run; bad input becomes one 'error:' line and exit code 2, never a traceback.

    Ctrl-C or SIGTERM at any moment (the training loop has its own, gentler handler) ends with
    one line and exit code 130, after `finally` blocks removed their temp files. `parse` replaces
    parser.parse_args, e.g. config_file.parse_args; a UserError from it is one line too. A torchrun
    process ends without the interpreter's teardown (startup.leave_torchrun_process says why).
    """
    try:
        parse_and_run(main, parser, argv, parse)
    except SystemExit as e:  # one-line errors, and the training loop's own exits (130 stopped, 2 NaN loss)
        leave_torchrun_process(e.code if isinstance(e.code, int) else int(e.code is not None))
        raise
    leave_torchrun_process(0)


def parse_and_run(
    main: Callable[[argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    parse: Callable[[argparse.ArgumentParser, list[str] | None], argparse.Namespace] | None,
) -> None:
    """run_cli's work: every failure it knows is one line through `fail` (SystemExit with its code)."""
    try:
        args = parse(parser, argv) if parse else parser.parse_args(argv)
    except UserError as e:
        fail(f"error: {e}", 2)
    try:
        imports_done()
    except ValueError:  # not the main thread
        pass
    try:
        main(args)
    except (UserError, ValueError, OSError) as e:  # OSError: unwritable folders, vanished files
        fail(f"error: {e}", 2)
    except torch.cuda.OutOfMemoryError:
        fail("error: out of GPU memory; lower --batch_size or --image_size, or use --amp fp16/bf16", 2)
    except RuntimeError as e:
        if not is_out_of_host_memory(e):
            raise
        fail("error: out of memory; lower --batch_size, --image_size or --workers", 2)
    except KeyboardInterrupt:
        fail(INTERRUPTED, 130, True)
    try:
        work_done()
    except ValueError:  # not the main thread
        pass


def json_safe(config: dict) -> dict:
    """Flags as plain JSON types, so they load with weights_only=True and dump to args.json."""
    out = {}
    for k, v in config.items():
        if k.startswith("_"):  # bookkeeping such as cli's record of typed flags
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (bool, int, float, str)) else str(x) for x in v]
        else:
            out[k] = str(v)
    return out
