"""How a script's process starts and ends: from its first line Ctrl-C or SIGTERM ends it with one line.

Importing torch takes seconds; without this, Ctrl-C meanwhile prints a traceback and SIGTERM
kills the process without a word. Scripts call `stop_quietly` under `if __name__ == "__main__":`
(importing them does nothing), and `imports_done` once they start working. A torchrun process
ends through `leave_torchrun_process`.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading

INTERRUPTED = "interrupted; nothing half-written is left: run the same command again to continue"


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_quietly(message: str = INTERRUPTED) -> None:
    """Until `imports_done`: Ctrl-C or SIGTERM prints `message` and exits 130 at once.

    Nothing is written yet that would need cleaning up, and an exception raised inside a C
    extension's import can surface as an ImportError instead of KeyboardInterrupt.
    """

    def leave(signum: int, frame: object) -> None:
        os.write(2, (message + "\n").encode())
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)
    previous = sys.excepthook

    def hook(kind, value, traceback) -> None:  # a KeyboardInterrupt nothing handled: one line too
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)

    sys.excepthook = hook


def imports_done() -> None:
    """From here on Ctrl-C and SIGTERM raise KeyboardInterrupt, so `finally` blocks remove temp files."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)
    # atexit runs last in, first out: this comes after the exit hooks of modules imported later
    # (W&B's, covered by work_done's handler), just before the interpreter resets its handlers.
    atexit.register(ignore_signals)


def ignore_signals() -> None:
    """The interpreter's last moments: its exit code is decided, and once Python has torn down its
    handlers a SIGTERM would kill it with -15 (a failure to schedulers and sweep runners)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def work_done() -> None:
    """The script's work is finished and saved: Ctrl-C or SIGTERM during the exit (threads joining,
    W&B's last upload) prints one line and exits 0 at once, as the work succeeded."""

    def leave(signum: int, frame: object) -> None:
        sys.stdout.flush()
        os.write(
            2,
            f"{signal.Signals(signum).name} after the work finished: exiting; "
            f"everything it wrote is complete\n".encode(),
        )
        os._exit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)


def leave_torchrun_process(code: int) -> None:
    """Under torchrun, end the process now with `code`, skipping the interpreter's teardown (else return).

    What exiting does first still happens: other threads are joined, exit handlers run, output is
    flushed. Gloo's worker threads outlive destroy_process_group and release a collective's tensors
    a moment after it completes; one doing so while the interpreter tears down aborts the process
    ("terminate called without an active exception"), and torchrun fails a job whose work was done.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


class ForgivingOutput:
    """stdout or stderr whose failure (a full disk, /dev/full, a closed pipe) never stops the script: the
    first failed write points the stream at /dev/null, so later writes and the exit's flush succeed."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            self.discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.discard()

    def discard(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def output_never_stops_work() -> None:
    """A closed stdout or stderr (`>&-`) becomes /dev/null, before a file the script opens takes its number
    (output meant for the terminal would land in that file); a failing one is forgiven (ForgivingOutput).

    For a script whose work must not stop because nobody reads it, e.g. the sweep runner.
    """
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", closefd=False))
        setattr(sys, name, ForgivingOutput(getattr(sys, name)))
