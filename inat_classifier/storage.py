"""Writing files that must never end half-written: free-space checks, atomic replace with signals held, stale temps.

Every file a run or an evaluation writes (checkpoints, the decoded cache, feature caches, args.json,
split.json, metrics.csv, result.json, eval.json, figures) goes through here, so a full disk is one line
naming the folder and the space needed, a Ctrl-C or SIGTERM during a write waits for the write to
finish, and temp files of killed processes are cleaned up.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from inat_classifier.cli import UserError

MARGIN = 2**20  # headroom on top of a file's size: filesystem metadata
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
TEMP_NAME = re.compile(r"^\..+\.tmp-(.+)-(\d+)$")  # .NAME.tmp-HOST-PID, see temp_name


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: Path) -> int:
    """Free space of the filesystem holding folder (its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def disk_full_error(folder: Path, need: int | None, what: str) -> UserError:
    """The one line for a full disk; need None: a size nobody knows (a download the server gave none)."""
    needs = f"needs {format_bytes(need)}, " if need is not None else "needs more than the "
    return UserError(
        f"not enough disk space in {folder} for {what}: {needs}"
        f"{format_bytes(free_bytes(folder))} free; free some space or point it elsewhere"
    )


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse before writing `need` bytes into folder when its filesystem has less free."""
    if free_bytes(folder) < need + MARGIN:
        raise disk_full_error(folder, need + MARGIN, what)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, also as torch.save's RuntimeError ('file write failed')."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("write failed" in text or "no space left" in text)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then reach their usual handlers.

    A second Ctrl-C during a checkpoint save must not cut the file it is writing; a signal
    raised inside torch.save's C++ writer can even abort the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):  # delivered now, to the handlers the block interrupted
            signal.raise_signal(sig)


def temp_name(path: Path) -> Path:
    """The temp file beside path that one process writes before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


@contextmanager
def full_disk_is_one_line(folder: Path, need: int, what: str) -> Iterator[None]:
    """ENOSPC/EDQUOT inside the block (the disk filled up after the check) as the one-line error."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise disk_full_error(folder, need + MARGIN, what) from None
        raise


def move_into_place(tmp: Path, path: Path) -> None:
    """fsync the finished temp file, then rename it onto path (atomic on one filesystem)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write(path: Path, write: Callable[[Path], None], need: int, what: str) -> None:
    """write(temp) then fsync and rename onto path, with signals held; a failure leaves path as it was.

    need: the expected size in bytes, checked against the free space first.
    """
    path = Path(path)
    check_free_space(path.parent, need, what)
    tmp = temp_name(path)
    try:
        with signals_held(), full_disk_is_one_line(path.parent, need, what):
            write(tmp)
            move_into_place(tmp, path)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename in (str(tmp), tmp):
            # The folder refuses new files: say which folder, not the temp file's name nobody typed.
            raise UserError(
                f"cannot write {what} into {path.parent} ({e.strerror}); choose a folder you can write"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, what: str | None = None) -> None:
    """A small text file (args.json, metrics.csv, ...) through atomic_write: a full disk is one line too."""
    data = text.encode()
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data), len(data), what or Path(path).name)


# ----------------------------------------------------------------------------- outputs named by the user
# A script replaces an existing file only when it is one of the files the script itself writes there:
# any other file (a checkpoint, a photo, somebody's YAML) under an output name is refused. What the
# script writes is recognised by its content, whatever the folder: a CSV by its exact header line,
# a JSON file by the keys of its top-level object, a figure by the text chunk matplotlib puts in
# every PNG it saves (a photo or screenshot has none).
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATPLOTLIB_PNG_TEXT = b"tEXtSoftware\x00Matplotlib"  # before the image data, in the first bytes


def head_bytes(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_matplotlib_png(path: Path) -> bool:
    """A PNG that matplotlib saved: one of our figures, not a photo or another program's image."""
    head = head_bytes(path, 4096)
    return head.startswith(PNG_SIGNATURE) and MATPLOTLIB_PNG_TEXT in head


def starts_with_line(header: str) -> Callable[[Path], bool]:
    """Recognises a CSV file by its exact first line (the header the script writes)."""
    wanted = header.encode()

    def check(path: Path) -> bool:
        return head_bytes(path, len(wanted) + 2).split(b"\n", 1)[0].rstrip(b"\r") == wanted

    return check


def first_line_starts(*prefixes: str) -> Callable[[Path], bool]:
    """Recognises a text file the program wrote by how its first line starts."""

    def check(path: Path) -> bool:
        first = head_bytes(path, 4096).split(b"\n", 1)[0].decode("utf-8", errors="replace")
        return first.startswith(prefixes)

    return check


def json_object_where(test: Callable[[dict], bool]) -> Callable[[Path], bool]:
    """Recognises a JSON file by its top-level object passing test (e.g. holding the keys a script writes)."""

    def check(path: Path) -> bool:
        if Path(path).stat().st_size > 256 * 2**20:  # none of ours is that large
            return False
        try:
            content = json.loads(Path(path).read_bytes())
        except (OSError, ValueError):
            return False
        try:
            return isinstance(content, dict) and bool(content) and bool(test(content))
        except (TypeError, AttributeError):  # values of other types than the script writes
            return False

    return check


def json_with_keys(keys: set[str]) -> Callable[[Path], bool]:
    """Recognises a JSON file by its top-level object holding every one of keys."""
    return json_object_where(lambda content: keys <= content.keys())


def refuse_foreign(path: Path, is_ours: Callable[[Path], bool], what: str, flag: str = "") -> None:
    """Refuse an output path holding a file (or anything else) that is not `what` this program wrote.

    flag names where the path came from (e.g. "--csv"), for the one-line error.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_file() or not is_ours(path):
        raise UserError(
            f"{flag + ' ' if flag else ''}{path}: already there, and not {what} this program wrote; "
            f"it is left as it is: choose another name, or move it away first"
        )


def check_writable_folder(folder: Path, hint: str) -> None:
    """Create folder if needed and make sure a file can be created in it, before any long work.

    hint: what to do instead (e.g. "pass --out DIR"). Tried for real (a temp file): permissions,
    read-only mounts and ACLs all show the same way, and root's bypass of permissions too.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_name(folder / ".write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise UserError(f"{folder} is a file, not a folder; {hint}") from None
    except OSError as e:
        raise UserError(f"cannot write into {folder} ({e.strerror or e}); {hint}") from None


FIGURE_BYTES = 512 * 1024  # a generous PNG of one of our figures, for the free-space check


def save_png(fig, path: Path, what: str | None = None, **savefig_kwargs) -> None:
    """fig.savefig as a PNG through atomic_write (the temp name has no .png suffix: the format is given).

    An existing file under path that is not one of our figures (a photo, a checkpoint) is refused.
    """
    refuse_foreign(Path(path), is_matplotlib_png, "a figure")
    atomic_write(
        Path(path), lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs), FIGURE_BYTES, what or Path(path).name
    )


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files (names from temp_name) that killed processes left in folder.

    Only this machine's: a process of another host sharing the folder cannot be checked.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match and match[1] == HOST and int(match[2]) != os.getpid() and not process_alive(int(match[2])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
