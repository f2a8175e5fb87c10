"""One sweep run as a child process: its log, hyperband's stop while it trains, a clean stop on interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path

INTERRUPTED = "[sweep] interrupted; run the same command again to continue the sweep"  # the runner's last line
LOG_BYTES = 64 * 1024  # the free space a run's log wants, for the message of a full disk


class Interrupted(Exception):
    """The runner was stopped while the run trained; `code` is how the run then ended, `tail` its last lines."""

    def __init__(self, code: int | None, tail: list[str]) -> None:
        super().__init__(code)
        self.code, self.tail = code, tail


def follow_log(log_path: Path, offset: int, tail: deque, echo: bool, ended: threading.Event) -> None:
    """Read the run's log as it grows (like tail -f) from `offset` until the run has ended and all is read."""
    partial_line = ""
    with open(log_path, encoding="utf-8", errors="replace") as log:
        log.seek(offset)
        while True:
            finished = ended.is_set()  # read before the last read: nothing written before the end is missed
            chunk = log.readline()
            if not chunk:
                if finished:
                    break
                time.sleep(0.05)
                continue
            partial_line += chunk
            if not partial_line.endswith("\n"):
                continue  # the rest of the line is still being written
            tail.append(partial_line.rstrip("\n"))
            if echo:
                sys.stdout.write(partial_line)
                sys.stdout.flush()
            partial_line = ""
    if partial_line:
        tail.append(partial_line)
        if echo:
            print(partial_line, flush=True)


def execute(
    command: list[str],
    record: dict,
    log_path: Path,
    check_stop: Callable[[], bool] | None,
    poll_s: float,
    echo: bool,
    append: bool = False,
) -> tuple[int, bool, list[str]]:
    """Run one training process; returns (exit code, stopped by hyperband, last output lines).

    The child gets its own session, so a Ctrl-C reaches only the runner, which then sends the child
    one SIGTERM (the training loop saves last.pt and exits) and waits for it. The child writes its
    output straight into the log file, not into a pipe to the runner: when the runner is killed, the
    child's writes must not fail (a broken pipe would crash it before it saves last.pt).
    """
    from inat_classifier.storage import full_disk_is_one_line  # here: sweep_offline.py reads INTERRUPTED before torch

    with full_disk_is_one_line(log_path.parent, LOG_BYTES, f"{record['name']}'s log"):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a" if append else "w") as log:
            log.write("$ " + " ".join(command) + "\n")
    offset = log_path.stat().st_size
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=partial(die_with_parent, libc_prctl(), os.getpid()),
        )
    record["pid"] = proc.pid
    tail: deque = deque(maxlen=40)
    ended = threading.Event()
    pump = threading.Thread(target=follow_log, args=(log_path, offset, tail, echo, ended), daemon=True)
    pump.start()
    try:
        stopped = watch(proc, record, check_stop, poll_s)
    except KeyboardInterrupt:
        print(f"\n[sweep] interrupted: stopping {record['name']} (it saves last.pt) ...", file=sys.stderr, flush=True)
        terminate(proc)
        ended.set()
        pump.join(timeout=10)
        raise Interrupted(proc.returncode, list(tail)) from None
    except BaseException:  # the storage failed (a heartbeat, a report): the run stops cleanly before the runner
        print(f"\n[sweep] stopping {record['name']} (it saves last.pt) ...", flush=True)
        terminate(proc)
        ended.set()
        pump.join(timeout=10)
        raise
    ended.set()
    pump.join(timeout=30)
    return proc.returncode, stopped, list(tail)


def watch(proc: subprocess.Popen, record: dict, check_stop: Callable[[], bool] | None, poll_s: float) -> bool:
    """Wait for the run to end, calling check_stop at its start and every poll (who trains it, heartbeat,
    pruning); True when it stopped the run."""
    stopped = False
    while True:
        if check_stop is not None and check_stop() and not stopped:
            stopped = True
            print(f"[sweep] {record['name']}: hyperband stops it", flush=True)
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=poll_s)
            return stopped
        except subprocess.TimeoutExpired:
            pass


def libc_prctl() -> Callable | None:
    """libc's prctl, looked up in the runner: a forked child of a threaded process must not dlopen."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(prctl: Callable | None, parent: int) -> None:
    """In the child, before it starts: SIGTERM it when the runner dies, even of SIGKILL (Linux), so a
    killed runner leaves no orphan training on (it saves last.pt and exits).

    The kernel sends the signal once per runner thread that exits (the child passes from one thread to
    the next), so the trainer may get several SIGTERMs at once; engine.StopRequested takes them as one.
    """
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the runner died before prctl: no signal will ever come
        os._exit(143)


def terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()


def error_line(tail: list[str]) -> str | None:
    """The run's last 'error:' line (ours, or argparse's 'prog: error: ...'), if it printed one."""
    for line in reversed(tail):
        if line.startswith("error:") or ": error:" in line:
            return line.strip()[:300]
    return None


def failure_note(tail: list[str], code: int) -> str:
    line = error_line(tail)
    if line:
        return line[:200]
    for line in reversed(tail):
        if "Error" in line:
            return line.strip()[:200]
    return f"exit code {code}"


DISK_FULL = ("not enough disk space", "No space left on device", "Disk quota exceeded")


def disk_full_line(tail: list[str]) -> str | None:
    """The run's error when it stopped on a full disk (the trainer's one line, or an OSError), else None."""
    line = error_line(tail) or failure_note(tail, 0)
    return line if any(marker in line for marker in DISK_FULL) else None


def run_dir_from_output(tail: list[str], default: Path) -> Path:
    for line in reversed(tail):
        if line.startswith("run folder: "):
            return Path(line[len("run folder: ") :].strip())
    return default
