"""Where a sweep's runs are recorded: an Optuna study in a journal file inside the sweep folder, or in a database.

The journal file needs no server and no `flock` (Optuna locks it with a symlink, which works on
NFS, Lustre and GPFS), so runners on many nodes of a shared filesystem can share it. A database
URL (`sqlite:///`, `postgresql://`, `mysql://`) suits many nodes without a shared filesystem.
A storage that fails is one line (`storage_errors`). A running run's trial names the processes that
train it, so a runner on the same machine continues it as soon as they have ended; elsewhere its
heartbeat tells.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from inat_classifier.cli import UserError
from inat_classifier.storage import HOST
from inat_classifier.sweep.database import DEFAULT_TIMEOUT_S, engine_kwargs, with_driver, without_password

JOURNAL_NAME = "optuna.journal"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql")

# A running run without a heartbeat for GRACE_PERIOD_S is stale (its runner was killed or its node
# lost) and is continued by the next runner; runners beat HEARTBEATS_PER_GRACE times per period.
GRACE_PERIOD_S = 120
HEARTBEATS_PER_GRACE = 6
# Runners started together: the one that loses the race to create the sweep waits this long for the
# winner to write the study and its config.
CREATION_WAIT_S = 10.0


def is_database_url(storage: str) -> bool:
    """Whether --storage names a database (SQLAlchemy URL, driver suffix allowed) rather than a journal file."""
    scheme = storage.split("://", 1)[0] if "://" in storage else ""
    return scheme.split("+", 1)[0] in DATABASE_SCHEMES


def journal_path(sweep_dir: Path | None, storage: str | None) -> Path | None:
    """The journal file a sweep uses (None for a database)."""
    if storage is None:
        return Path(sweep_dir) / JOURNAL_NAME
    if is_database_url(storage):
        return None
    return Path(storage[len("file://") :] if storage.startswith("file://") else storage)


def storage_name(sweep_dir: Path | None, storage: str | None) -> str:
    """The storage for messages: the journal file, or the database URL without its password."""
    return (
        without_password(storage)
        if storage is not None and is_database_url(storage)
        else str(journal_path(sweep_dir, storage))
    )


def open_storage(
    sweep_dir: Path | None,
    storage: str | None,
    read_only: bool = False,
    grace_s: int = GRACE_PERIOD_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
):
    """The Optuna storage of a sweep; read_only never writes (a read-only folder, --show, the report)."""
    import optuna

    path = journal_path(sweep_dir, storage)
    if path is None:
        return _database(storage, grace_s, timeout_s)
    if path.is_dir():
        raise UserError(f"--storage {path}: is a folder; give a journal file or a database URL")
    if read_only and not path.is_file():
        raise UserError(f"{path}: no sweep journal here")
    if not read_only and ((path.exists() and not os.access(path, os.W_OK)) or not os.access(path.parent, os.W_OK)):
        raise UserError(f"{path.parent}: not writable; a sweep records its runs there (--show only reads)")
    from optuna.storages.journal import JournalStorage

    from inat_classifier.sweep.journal import SweepJournal, journal_failure

    try:
        return JournalStorage(SweepJournal(path, read_only))
    except OSError as e:
        raise journal_failure(path, e, 0) from None
    except (optuna.exceptions.StorageInternalError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an Optuna sweep journal ({type(e).__name__})") from None


def _database(url: str, grace_s: int, timeout_s: float):
    import optuna
    import sqlalchemy.exc

    given, url = url, with_driver(url)
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs(url, timeout_s),
                    heartbeat_interval=max(1, grace_s // HEARTBEATS_PER_GRACE),
                    grace_period=grace_s,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
                )
        except ImportError as e:
            raise UserError(f"--storage {without_password(given)}: needs its database driver ({e.name or e})") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            if attempt == 2:  # runners starting together race to create the tables: the loser tries again
                raise UserError(
                    f"--storage {without_password(given)}: cannot create the study tables ({type(e).__name__})"
                ) from None
            time.sleep(1.0 + attempt)
        except Exception as e:  # sqlalchemy's errors: a refused connection, a wrong password, not a study schema
            raise UserError(
                f"--storage {without_password(given)}: cannot open the database ({failure_text(e)})"
            ) from None


def failure_text(error: BaseException) -> str:
    """What a storage error says, in one short line: the driver's own error where Optuna wrapped it."""
    while error.__cause__ is not None and type(error).__name__ == "StorageInternalError":
        error = error.__cause__
    cause = getattr(error, "orig", None) or error  # sqlalchemy's wrapper of the driver's error
    text = " ".join(str(cause).split())[:200]
    if "database is locked" in text:
        text += " (by another process, for longer than --db_timeout)"
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def is_storage_error(error: BaseException) -> bool:
    """Whether an error came from the storage (a database driver, SQLAlchemy, Optuna's storage layer)."""
    import optuna

    if isinstance(error, optuna.exceptions.StorageInternalError):
        return True
    module = type(error).__module__.split(".")[0]
    return module in ("sqlalchemy", "psycopg2", "psycopg", "sqlite3", "MySQLdb", "pymysql")


@contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """A storage error inside the block as one line (UserError) naming the storage."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if not is_storage_error(e):
            raise
        raise UserError(f"the sweep's storage {where} failed ({failure_text(e)})") from None


def load_study(storage, name: str | None, where: str, empty_ok: bool = False):
    """The study `name` in storage; without a name, the storage's only study; None for an empty one if empty_ok."""
    import optuna

    deadline = time.monotonic() + CREATION_WAIT_S
    while True:
        try:
            names = optuna.get_all_study_names(storage)
        except Exception as e:  # a journal or database that is not a study, or one that failed
            if is_storage_error(e):
                raise UserError(f"{where}: cannot read the sweep ({failure_text(e)})") from None
            raise UserError(f"{where}: not an Optuna sweep storage ({type(e).__name__})") from None
        if names or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # an empty journal: a runner started alongside is creating the study in it
    if not names:
        if empty_ok:
            return None
        raise UserError(f"{where}: has no sweep yet (no study in it)")
    if name is None:
        if len(names) != 1:
            raise UserError(f"{where}: holds {len(names)} studies ({', '.join(names)}); pick one with --study")
        name = names[0]
    if name not in names:
        raise UserError(f"{where}: has no study '{name}' (it has: {', '.join(names)})")
    return optuna.load_study(study_name=name, storage=storage)


def open_study(
    sweep_dir: Path | None,
    storage: str | None,
    study: str | None,
    read_only: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
):
    """An existing sweep's study, from its folder's journal or from --storage (with --study)."""
    where = storage_name(sweep_dir, storage)
    with storage_errors(where):
        return load_study(open_storage(sweep_dir, storage, read_only=read_only, timeout_s=timeout_s), study, where)


def create_study(storage, name: str, direction: str, attrs: dict):
    """The sweep's study, created with its config (or joined: another runner may have just created it)."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    if "config" not in study.user_attrs:
        for key, value in sorted(attrs.items(), key=lambda item: item[0] == "config"):
            study.set_user_attr(key, value)  # "config" last: a runner that sees it sees the rest
    return study


def sweep_config(study) -> dict | None:
    """The config the study's sweep was started with (None: not a sweep of ours).

    A runner started alongside the one creating the sweep may open the study between its
    creation and its config being written: an empty study without a config gets CREATION_WAIT_S
    to gain one.
    """
    deadline = time.monotonic() + CREATION_WAIT_S
    while True:
        config = study.user_attrs.get("config")
        if isinstance(config, dict) or study.trials or time.monotonic() > deadline:
            return config if isinstance(config, dict) else None
        time.sleep(0.1)


def is_database(storage) -> bool:
    import optuna

    return isinstance(storage, optuna.storages.RDBStorage)


class Heartbeat:
    """A running run's sign of life: Optuna's own heartbeat on a database, a trial attribute in a journal.

    Optuna has heartbeats for database storages only; the journal gets the same bound from a
    `heartbeat` user attribute (a timestamp, appended to the journal like any other write).
    """

    def __init__(self, study, trial, grace_s: float = GRACE_PERIOD_S) -> None:
        self.study, self.trial, self.last = study, trial, 0.0
        self.interval = grace_s / HEARTBEATS_PER_GRACE

    def beat(self, now: float | None = None) -> None:
        """Record a heartbeat, at most every grace_s / HEARTBEATS_PER_GRACE seconds."""
        now = time.time() if now is None else now
        if now - self.last < self.interval:
            return
        self.last = now
        if is_database(self.study._storage):
            self.study._storage.record_heartbeat(self.trial._trial_id)
        else:
            self.trial.set_user_attr("heartbeat", now)


def requeue(study, trial_id: int) -> None:
    """Queue a failed run to be continued: a WAITING trial with its parameters, attributes and history
    (Optuna's RetryHeartbeatStaleTrialCallback, which database storages call themselves)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    retry(study, study._storage.get_trial(trial_id))


# ----------------------------------------------------------------------------- who trains a run
def this_machine() -> str | None:
    """This host, boot and PID namespace: where a process ID names one process (None off Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{HOST}/{boot}/{namespace}"


def started_at(pid: int) -> int | None:
    """When process pid started (clock ticks since boot; None: no such process): a reused pid differs."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def trainers(trial_number: int, pids: list[int]) -> dict | None:
    """The processes that train a trial's run (its runner, its training process), as a trial attribute.

    The trial's number is in it: a run queued again copies its attributes to a new trial.
    """
    machine = this_machine()
    processes = [[p, started_at(p)] for p in pids]
    return {"trial": trial_number, "machine": machine, "processes": processes} if machine else None


def trainers_gone(trial) -> bool:
    """Whether every process that trained the trial's run has ended: on this machine only (elsewhere no one
    can tell: the heartbeat does)."""
    record = trial.user_attrs.get("trainers")
    if not isinstance(record, dict) or record.get("trial") != trial.number or record.get("machine") != this_machine():
        return False
    return all(started_at(pid) != start for pid, start in record.get("processes", []))


def fail_stale_runs(study, grace_s: float = GRACE_PERIOD_S, now: float | None = None) -> list[int]:
    """Mark running runs whose runner stopped (its processes on this machine ended, or it stopped beating) FAIL
    and queue each to continue; their trial numbers.

    Several runners may look at once: only the one whose FAIL lands queues the retry.
    """
    import optuna
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
        beats = not is_database(study._storage) and now - last > grace_s
        if not (beats or trainers_gone(t)):
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another runner was first
            continue
        requeue(study, t._trial_id)
        failed.append(t.number)
    if is_database(study._storage):
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        optuna.storages.fail_stale_trials(study)  # Optuna's heartbeat check; its callback queues the retry
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        failed += [n for n in running if states[n] == TrialState.FAIL]
    return failed
