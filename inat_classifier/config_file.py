"""`--config FILE`: a YAML file or a run's args.json sets the training flags' defaults; typed flags win.

Parsing runs twice, as in timm's train.py: the first pass finds --config, its values become the
parser's defaults (each through its flag's own argparse type and choices), the second pass lets every
typed flag win. Values from the file are defaults, not typed flags: `cli.typed_flags` does not list them.
"""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path
from typing import Any

import yaml

from inat_classifier.cli import UserError

# Never taken from a file: a run's args.json names its own folder, so a reproduction makes a new one.
IGNORED_KEYS = ("config", "run_name", "resume")
# Written into args.json by the scripts, though no flag: worked out again from the flags on every start.
DERIVED_KEYS = ("use_cache",)  # train_partb.resolve_recipe

CONFIG_HELP = (
    "a YAML file of flag: value lines, or a finished run's args.json, whose values become the "
    "defaults; flags typed on the command line win. Keys take _ or - spellings. run_name and "
    "resume are never read from it, so a new run folder is made under its out_dir; data_dir, "
    "out_dir and every other flag come from the file unless typed "
    "(e.g. --config runs/<run>/args.json --epochs 30 retrains a run longer)"
)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv with the flags of its --config FILE as defaults, so typed flags win over the file."""
    first = parser.parse_args(argv)  # typing mistakes are argparse's own errors, as without --config
    if first.config is None:
        return first
    parser.set_defaults(**config_defaults(parser, first.config))
    return parser.parse_args(argv)


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The flags FILE sets, by dest, each value converted as the command line would convert it."""
    actions = flag_actions(parser)
    defaults = {}
    for key, value in read_config(path).items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in IGNORED_KEYS or dest in DERIVED_KEYS:
            continue
        if dest not in actions:
            raise UserError(f"--config {path}: '{key}' is not a flag of this script")
        defaults[dest] = convert(actions[dest], value, f"--config {path}: {key}")
    return defaults


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The action that parses each flag's value, by dest (--config and --help aside)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # the first action of a dest parses its value (--no-X comes later)
        if action.option_strings and action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    return actions


def check_saved_flags(parser: argparse.ArgumentParser, config: dict, where: str) -> dict[str, Any]:
    """A run's saved flags (its args.json, a checkpoint's config) as this script would have parsed them.

    Each value goes through its flag's own type and choices, so a hand edit ("filters": "sixteen")
    or a run of the other training script (a flag this one lacks) is one line naming `where` and the key.
    """
    actions = flag_actions(parser)
    checked = {}
    for key, value in config.items():
        if key == "config" or key in DERIVED_KEYS:  # a path, or worked out by the script itself
            checked[key] = value
        elif key not in actions:
            raise UserError(f"{where}: '{key}' is not a flag of {parser.prog} (a run of another script?)")
        else:
            checked[key] = convert(actions[key], value, f"{where}: {key}")
    return checked


# A flags file or a sweep yaml is a few KiB. The limits keep a hostile or mistaken file (a photo passed as
# --config, a "billion laughs" of nested aliases that expands a 500-byte file into gigabytes when its
# values are read) from eating the machine's memory: the size is checked before reading, and anchors
# and aliases (&name, *name), which no flags file needs, are refused while the YAML is composed.
MAX_CONFIG_BYTES = 1 << 20


class AliasRefused(yaml.YAMLError):
    """An alias in a file read by NoAliasLoader."""


class NoAliasLoader(yaml.SafeLoader):
    """yaml's SafeLoader that refuses the first alias (*name) it meets, before anything is built from it."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(
                f"anchors and aliases are not read here (*{event.anchor} on line {event.start_mark.line + 1}); "
                f"write the values out"
            )
        return super().compose_node(parent, index)


def read_bounded_text(path: Path, where: str) -> str:
    """A config file's text: a regular file of at most MAX_CONFIG_BYTES, UTF-8 (else one line naming `where`)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{where}: not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise UserError(
                f"{where}: {st.st_size / 2**20:.1f} MiB is far more than a config file holds "
                f"(at most {MAX_CONFIG_BYTES // 2**20} MiB read); is it the right file?"
            )
        with open(path, "rb") as f:
            return f.read(MAX_CONFIG_BYTES + 1).decode()
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file in UTF-8; a config is YAML or JSON text") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None


def load_yaml(text: str) -> Any:
    """yaml.safe_load without aliases (NoAliasLoader); raises yaml.YAMLError."""
    return yaml.load(text, Loader=NoAliasLoader)


def read_config(path: str) -> dict:
    """FILE's mapping of flag names to values: JSON for a .json file, YAML otherwise."""
    file = Path(path)
    text = read_bounded_text(file, f"--config {path}")
    kind = "JSON" if file.suffix.lower() == ".json" else "YAML"
    try:
        content = json.loads(text) if kind == "JSON" else load_yaml(text)
    except AliasRefused as e:
        raise UserError(f"--config {path}: {e}") from None
    except (ValueError, yaml.YAMLError) as e:
        raise UserError(f"--config {path}: not valid {kind} ({' '.join(str(e).split())})") from None
    if content is None:  # an empty YAML file
        return {}
    if not isinstance(content, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got a {type(content).__name__}")
    return content


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from the file through the flag's own type and choices, as if typed (a list as its nargs takes it)."""
    if value is None:
        if action.default is None:
            return None
        raise UserError(f"{where}: needs a value, got null")
    if isinstance(value, dict):
        raise UserError(f"{where}: expected a value, got a mapping")
    if isinstance(value, list) and (action.nargs in ("+", "*") or isinstance(action.nargs, int)):
        return [convert_one(action, str(v), where) for v in value]
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)  # e.g. kernel_size [7, 5, 3]
    return convert_one(action, text, where)


def convert_one(action: argparse.Action, text: str, where: str) -> Any:
    """One command-line word through the flag's type, then its choices."""
    kind = action.type or str
    try:
        out = kind(text)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {getattr(kind, '__name__', 'a valid value')}, got '{text}'") from None
    if action.choices is not None and out not in action.choices:
        raise UserError(f"{where}: '{text}' is not one of {', '.join(map(str, action.choices))}")
    return out
