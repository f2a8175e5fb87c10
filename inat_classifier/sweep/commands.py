"""The command of a sweep's run, as `wandb agent` builds it, and the checks of what it is given.

Nothing here starts a process. The run commands come from wandb's own helpers, so a run gets exactly
the argv `wandb agent` would pass it; the flags after `--` are read as the program's own parser reads
them, so that none of them sets a searched parameter or a flag the runner manages.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
from pathlib import Path

from inat_classifier.cli import METRIC_FIELDS, UserError
from inat_classifier.sweep.leaderboard import searched_params
from inat_classifier.sweep.space import metric_of

DEFAULT_SWEEP_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # as wandb agent
# Flags the runner sets itself on every run; passing them after `--` would break the bookkeeping.
MANAGED_FLAGS = ("out_dir", "run_name", "resume", "wandb")
HERE = Path(__file__).resolve().parents[2]  # the repository root, where the training scripts are
OWN_PROGRAMS = ("train_parta.py", "train_partb.py")  # their metrics.csv has exactly METRIC_FIELDS


# ----------------------------------------------------------------------------- command line
def sweep_command_args(run_config: dict) -> dict:
    """wandb's own helper: the argument formats `wandb agent` fills ${args}, ${args_no_hyphens}... with."""
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:
        raise UserError("sweep_offline.py builds run commands with wandb's helper; pip install wandb") from None
    return create_sweep_command_args({"args": run_config})


def build_command(
    config: dict, run_config: dict, interpreter: str, program: str | None = None, args_json_file: str | None = None
) -> list[str]:
    """The command `wandb agent` runs for this config (wandb_agent.Agent._command_run), except that
    ${interpreter} is `interpreter` (the agent uses whatever 'python' is on PATH)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    command = create_sweep_command([str(c) for c in (config.get("command") or DEFAULT_SWEEP_COMMAND)])
    sweep_vars = sweep_command_args(run_config)
    sweep_vars["interpreter"] = [interpreter]
    sweep_vars["program"] = [program or config["program"]]
    sweep_vars["args_json_file"] = [args_json_file] if args_json_file else []
    if platform.system() != "Windows":
        sweep_vars["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for chunk in command:
        if chunk.startswith("${") and chunk.endswith("}"):
            out += [str(v) for v in (sweep_vars.get(chunk[2:-1]) or [])]
        else:
            out.append(chunk)
    return out


def run_command(
    config: dict,
    proposal: dict,
    program: str,
    runs_dir: Path,
    name: str,
    interpreter: str,
    wandb: str,
    train_args: list[str],
    args_json_file: str | None = None,
) -> list[str]:
    """The agent's command, then the runner's bookkeeping flags, then the -- flags (last, so they win)."""
    command = build_command(config, proposal, interpreter, program, args_json_file)
    return command + ["--out_dir", str(runs_dir), "--run_name", name, "--wandb", wandb, *train_args]


def resolve_program(program: str, config_path: Path | None) -> str:
    """The program as written when it exists here (as wandb agent runs it), else next to the config."""
    if Path(program).is_file():
        return program
    for base in filter(None, (config_path.parent if config_path else None, HERE)):
        if (base / program).is_file():
            return str((base / program).resolve())
    raise UserError(
        f"program '{program}' of the sweep config not found in {Path.cwd()}; run from the folder that holds it"
    )


def check_metric(config: dict, program: str) -> None:
    """Refuse a metric that our own training scripts never log (a typo would rank nothing)."""
    metric, _ = metric_of(config)
    if Path(program).name in OWN_PROGRAMS and metric not in METRIC_FIELDS:
        raise UserError(
            f"metric '{metric}' is not logged by {Path(program).name}: its metrics.csv has "
            f"{', '.join(METRIC_FIELDS)}; fix metric.name in the yaml"
        )


class ParseStop(Exception):
    """argparse gave up (an error, or --help): its message."""


def parsed_dests(parser: argparse.ArgumentParser, args: list[str]) -> tuple[set[str], list[str]]:
    """The dests `args` set when `parser` reads them (prefixes, --flag=value, --no-flag included), and the
    arguments it does not know; ParseStop with argparse's message where it gives up."""
    unset = object()  # argparse leaves a dest that is present in the namespace alone unless an argument sets it
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})

    def stop(status: int = 0, message: str | None = None) -> None:
        raise ParseStop((message or "it prints its help and exits").strip())

    parser.exit, parser.error = stop, lambda message: stop(2, message)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        parsed, unknown = parser.parse_known_args(args, namespace)
    return {k for k, v in vars(parsed).items() if v is not unset and not k.startswith("_")}, unknown


def flags_read(parser: argparse.ArgumentParser, args: list[str], program: str) -> dict[str, str]:
    """{dest: the argument that sets it} for `args` read by the program's own parser; an argument it does
    not know, or one it rejects, is a UserError."""
    try:
        _, unknown = parsed_dests(parser, args)
    except ParseStop as e:
        raise UserError(f"the flags after -- are rejected by {program}: {e}") from None
    if unknown:
        raise UserError(f"'{unknown[0]}' after -- is not a flag of {program}")
    found: dict[str, str] = {}
    for end in range(1, len(args) + 1):  # the argument that sets a dest: the last flag of the shortest prefix
        try:
            dests, _ = parsed_dests(parser, args[:end])
        except ParseStop:  # a flag still waiting for its value
            continue
        flag = next((a for a in reversed(args[:end]) if a.startswith("-")), args[end - 1])
        found.update({d: flag for d in dests if d not in found})
    return found


def flags_guessed(args: list[str], names: set[str]) -> dict[str, str]:
    """{name: the argument} for the flags among `args` that an argparse program may read as one of `names`:
    --name, --name=value, --no-name, and (argparse's default abbreviations) any prefix of a name."""
    found: dict[str, str] = {}
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        if not arg.startswith("--") or not key:
            continue
        for candidate in {key, key.removeprefix("no_")} - {""}:
            for name in sorted(names):
                if name.startswith(candidate):
                    found.setdefault(name, arg)
    return found


def check_train_args(config: dict, extra: list[str], program: str, parser: argparse.ArgumentParser | None) -> None:
    """Refuse a flag after -- that the program reads as a searched parameter (the run would train with a value
    the sweep never records) or as a flag the runner sets on every run; `parser` is the program's own, when
    known, else every --name the program may take for one (an abbreviation included) counts."""
    searched, name = set(searched_params(config)), Path(program).name
    watched = searched | set(MANAGED_FLAGS)
    found = flags_read(parser, extra, name) if parser is not None else flags_guessed(extra, watched)
    for dest, arg in found.items():
        key = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
        sets = "sets" if parser is not None or dest in (key, key.removeprefix("no_")) else "may set (as a prefix)"
        if dest in MANAGED_FLAGS:
            raise UserError(
                f"'{arg}' after -- {sets} '{dest}', which is set by the sweep runner itself "
                f"(use --sweep_dir / --wandb of sweep_offline.py)"
            )
        if dest in searched:
            raise UserError(
                f"'{arg}' after -- {sets} '{dest}', which the sweep searches; remove it, or make it "
                f"a fixed 'value:' in the sweep yaml"
            )


def check_parameters(config: dict) -> None:
    """Refuse a parameter the runner sets itself: the run would get the runner's value, the study the yaml's."""
    for name in config["parameters"]:
        if str(name).replace("-", "_") in MANAGED_FLAGS:
            raise UserError(
                f"parameters.{name}: the sweep runner sets --{name} of every run itself; remove it from the yaml"
            )
