"""Where a sweep's runs are recorded: an Optuna study in a journal file inside the sweep folder, or in a database.

The journal file needs no server and no `flock` (Optuna locks it with a symlink, which works on
NFS, Lustre and GPFS), so runners on many nodes of a shared filesystem can share it. A database
URL (`sqlite:///`, `postgresql://`, `mysql://`) suits many nodes without a shared filesystem.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cli import UserError

JOURNAL_NAME = "optuna.journal"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql")

# A runner records a heartbeat every HEARTBEAT_INTERVAL_S; a running run whose last one is older than
# GRACE_PERIOD_S is stale (its runner was killed or its node lost) and is continued by the next runner.
HEARTBEAT_INTERVAL_S = 20
GRACE_PERIOD_S = 120


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
    return Path(storage[len("file://"):] if storage.startswith("file://") else storage)


def open_storage(sweep_dir: Path | None, storage: str | None, read_only: bool = False):
    """The Optuna storage of a sweep; read_only reads a copy of the journal (a read-only folder, --show)."""
    import optuna
    from optuna.storages import journal

    path = journal_path(sweep_dir, storage)
    if path is None:
        return _database(storage)
    if path.is_dir():
        raise UserError(f"--storage {path}: is a folder; give a journal file or a database URL")
    if read_only:
        if not path.is_file():
            raise UserError(f"{path}: no sweep journal here")
        copy = Path(tempfile.mkdtemp(prefix="sweep-show-")) / JOURNAL_NAME
        shutil.copyfile(path, copy)
        path = copy
    elif (path.exists() and not os.access(path, os.W_OK)) or not os.access(path.parent, os.W_OK):
        raise UserError(f"{path.parent}: not writable; a sweep records its runs there (--show only reads)")
    try:
        return journal.JournalStorage(journal.JournalFileBackend(str(path)))
    except (optuna.exceptions.StorageInternalError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an Optuna sweep journal ({type(e).__name__})") from None


def _database(url: str):
    import optuna

    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
                                          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    except ImportError as e:
        raise UserError(f"--storage {url.split('://')[0]}://...: needs its database driver ({e.name or e})") from None
    except Exception as e:  # sqlalchemy's errors: a refused connection, a wrong password, not a study schema
        raise UserError(f"--storage {url.split('@')[-1]}: cannot open the database ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


def load_study(storage, name: str | None, where: str):
    """The study `name` in storage; without a name, the storage's only study."""
    import optuna

    try:
        names = optuna.get_all_study_names(storage)
    except Exception as e:  # a journal or database that is not a study
        raise UserError(f"{where}: not an Optuna sweep storage ({type(e).__name__})") from None
    if name is None:
        if len(names) != 1:
            raise UserError(f"{where}: holds {len(names)} studies ({', '.join(names) or 'none'}); pick one with --study")
        name = names[0]
    if name not in names:
        raise UserError(f"{where}: has no study '{name}' (it has: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def open_study(sweep_dir: Path | None, storage: str | None, study: str | None, read_only: bool = True):
    """An existing sweep's study, from its folder's journal or from --storage (with --study)."""
    where = storage if storage is not None and is_database_url(storage) else str(journal_path(sweep_dir, storage))
    return load_study(open_storage(sweep_dir, storage, read_only=read_only), study, where)
