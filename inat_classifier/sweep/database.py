"""A sweep's database storage: its URL checked and given an installed driver, and waits on it bounded and interruptible.

`postgresql://` means psycopg 3 to SQLAlchemy 2.1 and psycopg2 to older releases; the URL as the docs
write it gets whichever of the two is installed. Every wait for the server ends after --db_timeout
seconds (a server that accepts and never answers), and Ctrl-C or SIGTERM end it at once.
"""

from __future__ import annotations

import importlib.util
import select
from urllib.parse import parse_qsl

from inat_classifier.cli import UserError

DEFAULT_TIMEOUT_S = 30.0
# Each dialect's drivers, the first installed one used for a URL without one: (SQLAlchemy name, module, pip package).
DRIVERS = {
    "postgresql": (("psycopg2", "psycopg2", "psycopg2-binary"), ("psycopg", "psycopg", "psycopg[binary]")),
    "mysql": (("mysqldb", "MySQLdb", "mysqlclient"), ("pymysql", "pymysql", "PyMySQL")),
}


def without_password(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    return f"{scheme}://{credentials.split(':')[0]}@{host}"


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def with_driver(url: str) -> str:
    """The URL with an installed driver named; one line for a missing driver or an in-memory SQLite."""
    scheme, _, rest = url.partition("://")
    dialect, _, driver = scheme.partition("+")
    if dialect == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        if path.split("?")[0] in ("", ":memory:") or "mode=memory" in rest:
            raise UserError(
                f"--storage {url}: an in-memory SQLite database vanishes when the runner exits; "
                f"give a file, e.g. sqlite:///sweep.db"
            )
        return url
    candidates = DRIVERS.get(dialect, ())
    if driver:
        for name, module, package in candidates:
            if name == driver and not installed(module):
                raise UserError(f"--storage {scheme}://...: needs the {module} driver; pip install '{package}'")
        return url
    for name, module, _ in candidates:
        if installed(module):
            return f"{dialect}+{name}://{rest}"
    packages = " or ".join(f"'{package}'" for _, _, package in candidates)
    raise UserError(f"--storage {dialect}://...: needs a {dialect} driver; pip install {packages}")


def engine_kwargs(url: str, timeout_s: float) -> dict:
    """SQLAlchemy's create_engine arguments that bound connecting and each statement by timeout_s.

    What the URL's own query sets (e.g. ?connect_timeout=5) wins.
    """
    scheme, _, rest = url.partition("://")
    dialect, _, driver = scheme.partition("+")
    given = dict(parse_qsl(rest.partition("?")[2]))
    seconds = max(1, round(timeout_s))
    if dialect == "sqlite":
        args = {"timeout": timeout_s}  # how long a write waits for another process's lock
    elif dialect == "postgresql":
        args = {"connect_timeout": seconds, "options": f"-c statement_timeout={int(timeout_s * 1000)}"}
        if driver == "psycopg2":
            answer_in(timeout_s)
    elif dialect == "mysql":
        args = {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
    else:
        args = {}
    return {"connect_args": {k: v for k, v in args.items() if k not in given}}


class NoAnswer:
    """psycopg2's wait callback: each wait for the server in Python's select, bounded and interruptible.

    libpq waits in C, where neither a timeout after connecting nor a Ctrl-C reaches it. A connection
    that timed out or was interrupted fails at once afterwards, so that the rollback which follows
    does not wait again.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.broken: set[int] = set()

    def __call__(self, conn) -> None:
        import psycopg2
        from psycopg2 import extensions

        if id(conn) in self.broken:
            raise psycopg2.OperationalError("the connection stopped answering earlier")
        while True:
            state = conn.poll()
            if state == extensions.POLL_OK:
                return
            fd = [conn.fileno()]
            try:
                ready = select.select(*((fd, []) if state == extensions.POLL_READ else ([], fd)), [], self.timeout_s)
            except BaseException:  # Ctrl-C, SIGTERM
                self.broken.add(id(conn))
                raise
            if not any(ready):
                self.broken.add(id(conn))
                raise psycopg2.OperationalError(f"no answer from the server in {self.timeout_s:g} s (--db_timeout)")


def answer_in(timeout_s: float) -> None:
    """Make psycopg2 wait through NoAnswer (for the whole process: only the sweep's storage uses it)."""
    from psycopg2 import extensions

    extensions.set_wait_callback(NoAnswer(timeout_s))
