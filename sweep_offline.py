"""Run a W&B-style hyperparameter sweep without W&B: the runner script, on an Optuna study.

Reads the same sweep.yaml as `wandb sweep`, samples runs with Optuna (grid, random, or TPE for
bayes; HyperbandPruner for early_terminate), launches each with exactly the arguments `wandb agent`
would pass, and records them in an Optuna study, so running the same command again continues it:

    python sweep_offline.py --config sweep.yaml --count 10 -- --data_dir data/inaturalist_12K --workers 4
    python sweep_offline.py --sweep_dir sweeps/parta-sweep --count 5      # continue it
    python sweep_offline.py --sweep_dir sweeps/parta-sweep --show         # leaderboard and best.yaml

Each run trains in SWEEP_DIR/runs/run-NNN, its output goes to SWEEP_DIR/logs/run-NNN.log, the study
to SWEEP_DIR/optuna.journal (or --storage: a database URL or a journal file on a shared filesystem),
the ranking to SWEEP_DIR/leaderboard.csv. Any number of runners may share one sweep, like
`wandb agent`s: one per GPU, a SLURM array, or many nodes on one database.

This file is the command line; in inat_classifier/sweep/, space.py maps the yaml to Optuna, commands.py
builds and checks a run's command, runner.py claims, trains and records runs, process.py runs one training
process, leaderboard.py reads and ranks the runs, storage.py keeps the study.
"""

from __future__ import annotations

from inat_classifier.sweep.process import INTERRUPTED  # the standard library only: quick

if __name__ == "__main__":  # first, before the slow imports: a `kill` or Ctrl-C meanwhile is one line (startup.py)
    from inat_classifier import startup

    startup.stop_quietly(INTERRUPTED)

import argparse
import importlib.util
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

from inat_classifier.cli import UserError, str2bool
from inat_classifier.startup import imports_done, raise_interrupt
from inat_classifier.storage import atomic_write_text, first_line_starts, refuse_foreign
from inat_classifier.sweep.commands import (
    HERE,
    OWN_PROGRAMS,
    check_metric,
    check_parameters,
    check_train_args,
    resolve_program,
)
from inat_classifier.sweep.database import DEFAULT_TIMEOUT_S, without_password
from inat_classifier.sweep.leaderboard import (
    LEADERBOARD_FILE,
    LEADERBOARD_START,
    best_run,
    print_leaderboard,
)
from inat_classifier.sweep.runner import (
    BEST_CONFIG_FILE,
    BEST_YAML_STARTS,
    Sweep,
    run_loop,
    sweep_runs,
    write_best_config,
)
from inat_classifier.sweep.space import check_config, load_config, metric_of, parse_parameters, plain
from inat_classifier.sweep.storage import (
    GRACE_PERIOD_S,
    HEARTBEATS_PER_GRACE,
    create_study,
    journal_path,
    load_study,
    open_storage,
    storage_errors,
    storage_name,
    sweep_config,
)

DEFAULT_CONFIG = "sweep.yaml"
# The runner's copy of the config in the sweep folder, a name of its own beside the user's sweep.yaml;
# sweeps started before it have the copy as sweep.yaml.
SWEEP_CONFIG, OLD_SWEEP_CONFIG = "sweep_config.yaml", "sweep.yaml"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Run the sweep of a W&B sweep.yaml offline on Optuna: sample runs (grid, random, bayes), "
        "train them one after another, rank them by the metric. Several runners (one per GPU or "
        "machine) may work on the same sweep at once.",
        usage="%(prog)s [options] [-- TRAIN_FLAGS ...]",
        epilog="Flags after -- go to every run unchanged, after the sweep's own, e.g. "
        "-- --data_dir data/inaturalist_12K --workers 4 (a searched parameter there is refused). Rerun "
        "with the same --sweep_dir to continue; without -- flags a continued sweep reuses the last ones.",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"sweep yaml, as for 'wandb sweep' (default: {DEFAULT_CONFIG} for a new sweep, "
        "the sweep's own copy when continuing one)",
    )
    parser.add_argument(
        "--sweep_dir",
        "--sweep-dir",
        default=None,
        help="folder of the sweep's runs, logs, leaderboard and (by default) its journal; an "
        "existing one is continued (default: sweeps/<name in the yaml, else its file name>)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="where the study is kept: a database URL (sqlite:///sweep.db, "
        "postgresql://user:pw@host/db, mysql://...) or a journal file on a shared "
        "filesystem (default: SWEEP_DIR/optuna.journal)",
    )
    parser.add_argument(
        "--study",
        default=None,
        help="the study's name in --storage (default: the sweep folder's name; a journal holding one study needs none)",
    )
    parser.add_argument(
        "--db_timeout",
        "--db-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a database --storage may take to connect or to answer one statement (and a SQLite "
        "write to wait for another process's lock) before the runner stops with one line (default: %(default)s)",
    )
    parser.add_argument("--count", type=int, default=10, help="number of runs to train now (default: %(default)s)")
    parser.add_argument(
        "--wandb",
        default="disabled",
        choices=("disabled", "offline"),
        help="W&B logging of every run: disabled, or offline into the run folder for a "
        "later 'wandb sync' (default: %(default)s)",
    )
    parser.add_argument(
        "--early_terminate",
        "--early-terminate",
        type=str2bool,
        default=True,
        metavar="BOOL",
        help="apply the yaml's early_terminate (Optuna's HyperbandPruner, fed "
        "each epoch's metric) while runs train (default: %(default)s)",
    )
    parser.add_argument(
        "--poll_s",
        type=float,
        default=5.0,
        help="seconds between looks at a running run's metrics.csv (default: %(default)s)",
    )
    parser.add_argument(
        "--stale_s",
        "--stale-s",
        type=int,
        default=GRACE_PERIOD_S,
        help="seconds without a heartbeat after which a running run counts as dead (its runner "
        "killed, its node lost) and the next runner continues it from last.pt; runners "
        f"beat {HEARTBEATS_PER_GRACE} times as often (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the sampler, for a reproducible sweep (default: none, random)"
    )
    parser.add_argument(
        "--max_failures",
        type=int,
        default=5,
        help="stop after this many failed runs in a row, like wandb agent; 0 = never (default: %(default)s)",
    )
    parser.add_argument(
        "--interpreter",
        default=sys.executable,
        help="python that runs the program, the ${interpreter} of the command (default: this one, %(default)s)",
    )
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        action="store_true",
        help="print the commands of the next --count proposals and train nothing",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="print the leaderboard and the best run's command, write best.yaml, and exit",
    )
    parser.add_argument(
        "--top", type=int, default=0, help="rows of the printed leaderboard; 0 = all (default: %(default)s)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="do not echo the runs' output (it is always in SWEEP_DIR/logs/run-NNN.log)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Our flags, then everything after the first `--` as args.train_args."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = get_args_parser().parse_args(argv)
    args.train_args = extra
    return args


def sweep_folder(args: argparse.Namespace, config: dict | None, config_path: Path | None) -> Path:
    """--sweep_dir, else sweeps/<the yaml's name, else its file name>, made safe as a folder name."""
    if args.sweep_dir:
        folder = Path(args.sweep_dir)
    else:
        config = config if config is not None else load_config(DEFAULT_CONFIG)
        name = str(config.get("name") or (config_path or Path(DEFAULT_CONFIG)).stem)
        folder = Path("sweeps") / ("".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "sweep")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--sweep_dir {folder}: is a file, not a folder")
    return folder


def existing_study(args: argparse.Namespace, sweep_dir: Path, writable: bool):
    """The sweep's study when it exists (None for a new sweep, or an empty journal a runner may start one in)."""
    journal = journal_path(sweep_dir, args.storage)
    if journal is not None and not journal.is_file():
        return None
    storage = open_storage(
        sweep_dir, args.storage, read_only=not writable, grace_s=args.stale_s, timeout_s=args.db_timeout
    )
    where = storage_name(sweep_dir, args.storage)
    if journal is not None:
        return load_study(storage, args.study, where, empty_ok=writable)
    import optuna

    name = args.study or sweep_dir.name
    return load_study(storage, name, where) if name in optuna.get_all_study_names(storage) else None


def half_made(study, writable: bool) -> bool:
    """A study whose creator was killed before it wrote the config: no config and no runs, even after the wait.

    A runner completes it with its own config (create_study) as if it were new.
    """
    return writable and sweep_config(study) is None and not study.trials


def open_sweep(args: argparse.Namespace, writable: bool) -> Sweep:
    """The sweep to show, dry-run or train: an existing study, or a new one (created only when writable)."""
    config_path = Path(args.config) if args.config else None
    config = load_config(config_path) if config_path else None
    sweep_dir = sweep_folder(args, config, config_path)
    study = existing_study(args, sweep_dir, writable)
    if study is not None and half_made(study, writable):
        study = None
    if study is not None:
        stored = sweep_config(study)
        where = f"study '{study.study_name}' in {storage_name(sweep_dir, args.storage)}"
        if stored is None:
            raise UserError(f"{where}: is not a sweep of sweep_offline.py (it has no sweep config)")
        check_config(stored, where)
        if config is not None and plain(config) != stored:
            copy = next((n for n in (SWEEP_CONFIG, OLD_SWEEP_CONFIG) if (sweep_dir / n).is_file()), SWEEP_CONFIG)
            raise UserError(
                f"{config_path} differs from the config the sweep in {sweep_dir} was started with "
                f"({sweep_dir / copy}); continue it without --config, or start a new "
                f"sweep with another --sweep_dir"
            )
        config, config_path = (
            stored,
            Path(study.user_attrs["config_file"]) if study.user_attrs.get("config_file") else None,
        )
    elif args.show:
        raise UserError(f"no sweep in {sweep_dir} (no {journal_path(sweep_dir, args.storage) or 'study there'})")
    else:
        config_path = config_path or Path(DEFAULT_CONFIG)
        config = config if config is not None else load_config(config_path)
    return Sweep(sweep_dir, plain(config), parse_parameters(config, str(config_path)), study, config_path)


def write_config_copy(sweep: Sweep) -> None:
    """SWEEP_DIR/sweep_config.yaml, the config the sweep starts with; a different file of that name is refused,
    and so is a leaderboard.csv or best.yaml the sweep would later replace."""
    text = __import__("yaml").safe_dump(sweep.config, sort_keys=False)
    copy = sweep.dir / SWEEP_CONFIG
    try:
        same = copy.read_text(encoding="utf-8", errors="replace") == text
    except FileNotFoundError:
        same = None
    except OSError:
        same = False
    if same is False:
        raise UserError(f"{copy}: already there, and not this sweep's config; move it away, or use another --sweep_dir")
    refuse_foreign(sweep.dir / LEADERBOARD_FILE, first_line_starts(LEADERBOARD_START), "a leaderboard")
    refuse_foreign(sweep.dir / BEST_CONFIG_FILE, first_line_starts(*BEST_YAML_STARTS), "a best.yaml")
    if same is None:  # a runner started alongside may have written the same text already
        atomic_write_text(copy, text, what="the sweep's config")


def new_study(args: argparse.Namespace, sweep: Sweep):
    """Create the sweep folder and its study (joining it when another runner just did)."""
    try:
        sweep.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{sweep.dir}: cannot create the sweep folder ({e.strerror})") from None
    write_config_copy(sweep)
    metric, goal = metric_of(sweep.config)
    attrs = {
        "config": sweep.config,
        "config_file": str(sweep.config_path.resolve()),
        "metric": metric,
        "goal": goal,
        "program": sweep.config["program"],
    }
    storage = open_storage(sweep.dir, args.storage, grace_s=args.stale_s, timeout_s=args.db_timeout)
    study = create_study(storage, args.study or sweep.dir.name, goal, attrs)
    if not study.metric_names:  # optuna-dashboard then names the value val_acc, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
    return study


def program_parser(program: str) -> argparse.ArgumentParser | None:
    """The argument parser of our own training script (building it has no side effects), to read the flags
    after -- exactly as the run will; None for any other program, whose code the runner never loads."""
    path = Path(program).resolve()
    if path.name not in OWN_PROGRAMS or path.parent != HERE:
        return None
    spec = importlib.util.spec_from_file_location(f"_sweep_program_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_args_parser()


def main(args: argparse.Namespace) -> int:
    """Show, dry-run or train the next --count runs of the sweep; the exit code (0, 1 many failures, 130 stopped)."""
    train_args = list(getattr(args, "train_args", []) or [])
    if args.count < 0:
        raise UserError(f"--count must be >= 0, got {args.count}")
    if not 0 < args.poll_s < float("inf"):  # NaN included
        raise UserError(f"--poll_s must be a number > 0, got {args.poll_s}")
    if args.stale_s < 2 * args.poll_s:
        raise UserError(
            f"--stale_s {args.stale_s} must be at least twice --poll_s ({args.poll_s}): a live "
            f"runner beats between polls"
        )
    if not 0 < args.db_timeout < float("inf"):
        raise UserError(f"--db_timeout must be a number > 0, got {args.db_timeout}")
    with storage_errors(without_password(args.storage) if args.storage else "(the sweep's journal)"):
        return open_and_run(args, train_args)


def open_and_run(args: argparse.Namespace, train_args: list[str]) -> int:
    """main's work once the flags are checked."""
    sweep = open_sweep(args, writable=not (args.show or args.dry_run))
    if args.show:
        return show(sweep, args.top)
    program = resolve_program(sweep.config["program"], sweep.config_path)
    check_metric(sweep.config, program)
    check_parameters(sweep.config)
    if not train_args and sweep.study is not None and sweep.study.user_attrs.get("train_args"):
        train_args = list(sweep.study.user_attrs["train_args"])  # a continued sweep keeps its data_dir, workers...
        print(f"[sweep] flags for every run, as last time: {' '.join(train_args)}")
    check_train_args(sweep.config, train_args, program, program_parser(program))
    sweep.program, sweep.train_args = program, train_args
    if args.dry_run:
        from inat_classifier.sweep.runner import dry_run

        return dry_run(args, sweep)
    if sweep.study is None:
        sweep.study = new_study(args, sweep)
    sweep.study.set_user_attr("train_args", train_args)
    with sigterm_interrupts():
        return run_loop(args, sweep)


def show(sweep: Sweep, top: int) -> int:
    """Print the leaderboard and the best run's command; write leaderboard.csv and best.yaml where allowed."""
    writable = os.access(sweep.dir, os.W_OK)
    runs = sweep_runs(sweep)
    print_leaderboard(sweep.dir, sweep.config, runs, top, write=writable)
    best = best_run(runs, sweep.metric[1])
    if best is not None:
        write_best_config(sweep, best, writable)
    return 0


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile: a `kill` of the runner stops the run as cleanly as Ctrl-C."""
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread: only it may set handlers
        previous_handler = None
    try:
        yield
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    imports_done()
    try:
        sys.exit(main(parse_args()))
    except UserError as e:  # cli.UserError, raised by the sweep modules too: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # at start-up, or again while stopping: one line, no traceback
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
