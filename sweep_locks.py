"""How sweep runners share one sweep folder: a state lock for every read-change-write, and runner leases.

Both are `fcntl.flock` locks, which the kernel drops when their process ends, however it ends
(SIGKILL, a crash, a reboot): nothing goes stale, and no pid is read back (pids are reused). On a
filesystem shared by several machines (a SLURM job array), Linux maps flock onto the NFS or Lustre
lock service; the folder must be on one that supports it.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RUNNERS = "runners"  # SWEEP_DIR/runners/<runner id>.lock: one lease per live runner


@contextmanager
def state_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold SWEEP_DIR/.state.lock: meanwhile no other runner reads, changes or writes the sweep's state."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".state.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another runner is inside; released when closed
        yield


class RunnerLease:
    """This runner's presence in the sweep: an exclusive lock on its own lease file, held while it lives."""

    def __init__(self, sweep_dir: Path) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = sweep_dir / RUNNERS / f"{self.id}.lock"
        self.file = None

    def __enter__(self) -> "RunnerLease":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh random id: never contended
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        self.file.close()


def runner_alive(sweep_dir: Path, runner_id: str | None) -> bool:
    """Whether the runner with this id still holds its lease (False for no id: a record of an older runner)."""
    if not runner_id:
        return False
    path = sweep_dir / RUNNERS / f"{runner_id}.lock"
    try:
        fd = os.open(path, os.O_WRONLY)  # no O_CREAT: a lease that is gone stays gone
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)  # its runner is gone: tidy the lease away
    return False
