"""One process per run folder: an flock on a lock file inside it, held until the process ends or lets go.

The kernel drops an flock when its process dies (kill -9 included), so a lock never outlives its
holder and never needs clearing by hand.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from inat_classifier.cli import UserError
from inat_classifier.storage import HOST

LOCK_FILE = ".run.lock"  # holds "PID HOST" of the process training in the folder
HELD: dict[Path, int] = {}  # folder -> the open lock file's descriptor, for this process's folders


def holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it ("process PID on HOST")."""
    try:
        pid, host = os.pread(fd, 200, 0).decode(errors="replace").split()
        return f"process {int(pid)} on {host}"
    except (OSError, ValueError):  # it has the lock but has not written its name yet
        return "another process"


def hold_folder(folder: Path, make: bool, hint: str) -> None:
    """Lock folder for this process (made first if `make`); a folder another process holds is one line.

    A lock file whose folder was removed meanwhile (the clean-up of a failed start) locks nothing:
    the folder is made again and locked anew. Holding a folder this process holds already is a no-op.
    """
    key = Path(folder).absolute()
    if key in HELD:
        return
    for _ in range(100):
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            if make:
                continue
            raise UserError(f"--resume {folder}: no such run folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            name = holder(fd)
            os.close(fd)
            raise UserError(f"run folder {folder} is in use: {name} is training in it; {hint}") from None
        try:
            same = os.stat(folder / LOCK_FILE).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:  # who holds it, for the message a second start prints; the lock itself needs no bytes
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {HOST}\n".encode(), 0)
            except OSError:  # a full disk: the run's first real write says so, with the folder and sizes
                pass
            HELD[key] = fd
            return
        os.close(fd)
    raise UserError(f"could not lock the run folder {folder}: it keeps being removed and made again")


def release_folder(folder: Path) -> None:
    """Let go of a folder this process holds (a no-op for any other), e.g. when its run has ended."""
    fd = HELD.pop(Path(folder).absolute(), None)
    if fd is not None:
        os.close(fd)
