"""How a script's process starts and ends: from its first line Ctrl-C or SIGTERM ends it with one line.

Importing torch takes seconds; without this, Ctrl-C meanwhile prints a traceback and SIGTERM
kills the process without a word. Scripts call `stop_quietly` under `if __name__ == "__main__":`
(importing them does nothing), and `imports_done` once they start working. A torchrun process
ends through `leave_torchrun_process`. From that first line on, output that cannot be written
(a closed, broken or full stdout or stderr) never stops a run (`guard_output`).
"""

from __future__ import annotations

import atexit
import io
import os
import signal
import sys
import threading

INTERRUPTED = "interrupted; nothing half-written is left: run the same command again to continue"


def write_raw(text: str) -> None:
    """Write to fd 2 from a signal handler, where a broken stderr must not become a traceback."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class GuardedStream:
    """stdout or stderr whose writes never raise: on the first failure (a closed pipe, a full disk) its
    file descriptor is pointed at /dev/null, one warning goes to the other stream, and the run goes on.

    Pointing the descriptor itself at /dev/null also quiets what bypasses this object: the text
    buffered inside the original stream (flushed again when the interpreter exits, where a failure
    would turn exit code 0 into 120), C libraries, and child processes that inherit it.
    """

    def __init__(self, stream: io.TextIOBase, name: str, fd: int) -> None:
        self._stream, self._name, self._fd, self._failed = stream, name, fd, False

    def write(self, text: str) -> int:
        if not self._failed:
            try:
                return self._stream.write(text)
            except (OSError, ValueError) as e:  # ValueError: the stream was closed
                self._give_up(e)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._failed:
            try:
                self._stream.flush()
            except (OSError, ValueError) as e:
                self._give_up(e)

    def isatty(self) -> bool:
        try:
            return not self._failed and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str):  # encoding, fileno, buffer...: the real stream's
        return getattr(self._stream, name)

    def _give_up(self, error: Exception) -> None:
        self._failed = True
        discard_into_devnull(self._fd)
        try:
            self._stream.flush()  # what it still holds now goes to /dev/null
        except (OSError, ValueError):
            pass
        other = sys.stderr if self._name == "stdout" else sys.stdout
        reason = getattr(error, "strerror", None) or str(error)
        other.write(
            f"warning: {self._name} cannot be written ({reason}); the rest of it is discarded, the run goes on\n"
        )
        other.flush()


def discard_into_devnull(fd: int) -> None:
    """Point fd at /dev/null (a closed fd is opened again there, so no file the run opens takes its number)."""
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def guard_output() -> None:
    """Output that cannot be written never stops or fails a run: stdout and stderr become `GuardedStream`s.

    A closed stdout (`>&-`) or stderr is /dev/null from here on, with one warning on the other stream.
    """
    if isinstance(sys.stdout, GuardedStream):
        return
    closed = [name for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")) if not fd_is_open(fd)]
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if name in closed:
            discard_into_devnull(fd)
    streams = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is None or name in closed:  # Python leaves sys.stdout None when fd 1 was closed at start
            stream = open(fd, "w", buffering=1, closefd=False)
        streams[name] = GuardedStream(stream, name, fd)
    sys.stdout, sys.stderr = streams["stdout"], streams["stderr"]
    for name in closed:
        if name != "stdin":
            other = sys.stderr if name == "stdout" else sys.stdout
            other.write(f"warning: {name} is closed; what would go there is discarded\n")
            other.flush()


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_quietly(message: str = INTERRUPTED) -> None:
    """Until `imports_done`: Ctrl-C or SIGTERM prints `message` and exits 130 at once.

    Nothing is written yet that would need cleaning up, and an exception raised inside a C
    extension's import can surface as an ImportError instead of KeyboardInterrupt. Output is
    guarded from here on (`guard_output`).
    """
    guard_output()

    def leave(signum: int, frame: object) -> None:
        write_raw(message + "\n")
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
        write_raw(f"{signal.Signals(signum).name} after the work finished: exiting; everything it wrote is complete\n")
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
