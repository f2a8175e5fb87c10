"""One sweep run as a child process: its log, hyperband's stop while it trains, a clean stop on interrupt."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable

from sweep_engine import read_history


class Interrupted(Exception):
    pass


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def pump_output(stream: IO[str], log_path: Path, tail: deque, echo: bool) -> None:
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        for line in iter(stream.readline, ""):
            log.write(line)
            log.flush()
            tail.append(line.rstrip("\n"))
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()


def execute(command: list[str], record: dict, run_dir: Path, log_path: Path,
            check_stop: Callable[[dict], bool] | None, poll_s: float, echo: bool) -> tuple[int, bool, list[str]]:
    """Run one training process; returns (exit code, stopped by hyperband, last output lines).

    The child gets its own session, so a Ctrl-C reaches only the runner, which then sends the child
    one SIGTERM (the training loop saves last.pt and exits) and waits for it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, start_new_session=True,
                            preexec_fn=die_with_parent)
    record["pid"] = proc.pid
    tail: deque = deque(maxlen=40)
    pump = threading.Thread(target=pump_output, args=(proc.stdout, log_path, tail, echo), daemon=True)
    pump.start()
    stopped = False
    seen_epochs = 0
    try:
        while True:
            try:
                proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if check_stop is None or stopped:
                continue
            history = read_history(run_dir)
            if len(history) > seen_epochs:
                seen_epochs = len(history)
                record["history"] = history
                if check_stop(record):
                    stopped = True
                    print(f"[sweep] {record['name']}: hyperband stops it after epoch {seen_epochs}", flush=True)
                    proc.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        print(f"\n[sweep] interrupted: stopping {record['name']} (it saves last.pt) ...", file=sys.stderr, flush=True)
        terminate(proc)
        pump.join(timeout=10)
        raise Interrupted from None
    pump.join(timeout=30)
    return proc.returncode, stopped, list(tail)


def die_with_parent() -> None:
    """In the child, before it starts: SIGTERM it when the runner dies, even of SIGKILL (Linux), so a
    killed runner leaves no orphan training on (it saves last.pt and exits)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.kill()
        proc.wait()


def failure_note(tail: list[str], code: int) -> str:
    for line in reversed(tail):
        if line.startswith("error:") or "Error" in line:
            return line.strip()[:200]
    return f"exit code {code}"


def run_dir_from_output(tail: list[str], default: Path) -> Path:
    for line in reversed(tail):
        if line.startswith("run folder: "):
            return Path(line[len("run folder: "):].strip())
    return default
