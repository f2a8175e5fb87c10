"""The sweep's journal file: Optuna's, whose appends never leave half a line behind."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from optuna.storages import journal
from optuna.storages.journal import JournalFileBackend

from inat_classifier.cli import UserError
from inat_classifier.storage import MARGIN, check_free_space, disk_full_error, is_disk_full, signals_held


class SweepJournal(JournalFileBackend):
    """Optuna's journal file, whose appends never leave half a line behind.

    Optuna appends each record as one JSON line and, reading, skips a last line without its newline;
    but a record appended after such a torn line joins it into one line that never parses again. So
    every append first sets a torn last line aside (into a file beside the journal), and an append
    that fails (a full disk) cuts the journal back to where it was.
    """

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path, self.read_only = Path(path), read_only
        self.lock = journal.JournalFileSymlinkLock(str(path))
        super().__init__(str(path), lock_obj=self.lock)

    def append_logs(self, logs: list[dict]) -> None:
        if self.read_only:
            raise UserError(f"{self.path}: opened to read only")
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        # Room for more than this record: the runner's records come in sequences (a run's end, then its retry),
        # and on a full disk none of them starts rather than the first alone landing.
        check_free_space(self.path.parent, len(data), f"the sweep journal {self.path.name}")
        try:
            self.lock.acquire()
            try:
                self.set_aside_torn_line()
                with signals_held():
                    self.write(data)
            finally:
                self.lock.release()
        except OSError as e:
            raise journal_failure(self.path, e, len(data)) from None

    def write(self, data: bytes) -> None:
        size = os.path.getsize(self.path)
        try:
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            if os.path.getsize(self.path) != size + len(data):  # a part written: cut it, no half line stays
                os.truncate(self.path, size)
            raise

    def set_aside_torn_line(self) -> None:
        """A last line without its newline (a write that failed or was killed) moved to a file beside the journal."""
        with open(self.path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0 or os.pread(f.fileno(), 1, end - 1) == b"\n":
                return
            start = end
            while start > 0:
                chunk = os.pread(f.fileno(), min(start, 65536), max(0, start - 65536))
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    start = start - len(chunk) + cut + 1
                    break
                start -= len(chunk)
            aside = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            aside.write_bytes(os.pread(f.fileno(), end - start, start))
            f.truncate(start)
        print(
            f"[sweep] {self.path}: its last line was cut off (a write that failed or was killed); "
            f"removed it, kept in {aside.name}",
            flush=True,
        )


def journal_failure(path: Path, error: OSError, size: int) -> UserError:
    """The one line for a journal write that failed."""
    if is_disk_full(error):
        return UserError(str(disk_full_error(path.parent, size + MARGIN, f"the sweep journal {path.name}")))
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{path.parent}: not writable ({error.strerror}); the sweep records its runs there")
    return UserError(f"{path}: cannot write the sweep journal ({error.strerror or error})")
