"""One PostgreSQL server behind both Prefect and MLflow (`lmforge ui --backend postgresql://...`).

Each gets its own database next to the one named: `<db>_prefect` and `<db>_mlflow`. Both tools run
their own Alembic migrations and both keep an `alembic_version` table, so they cannot share one
schema; two databases also let a team back up, restore or drop one without the other. The databases
are created on first use when the role may (CREATEDB); otherwise an admin creates them once.

The password never goes on a command line, into a URL we print or pass on, or into ui.json: it is
taken from the URL or from `PGPASSWORD` (or libpq's `~/.pgpass`), and the servers get it in their
environment as `PGPASSWORD`, which libpq (psycopg, for MLflow) and asyncpg (Prefect) both read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

CONNECT_TIMEOUT_S = 5
TOOLS = ("prefect", "mlflow")


class BackendError(ValueError):
    """`--backend` is not a usable PostgreSQL URL, or the server cannot be reached with it."""


@dataclass(frozen=True)
class Backend:
    """Where the team's PostgreSQL is, and as whom; `password` is kept out of repr and of every URL."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def database_for(self, tool: str) -> str:
        """`lmforge` -> `lmforge_prefect` / `lmforge_mlflow`."""
        return f"{self.database}_{tool}"

    def url(self, driver: str, database: str) -> str:
        """A SQLAlchemy URL without the password, e.g. `postgresql+psycopg://lmforge@db:5432/lmforge_mlflow`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{driver}://{quote(self.user, safe='')}@{host}:{self.port}/{quote(database, safe='')}"

    def env(self) -> dict[str, str]:
        """What the servers' environment needs to log in: the password as `PGPASSWORD`, if we have one."""
        return {"PGPASSWORD": self.password} if self.password else {}


def parse_backend(url: str) -> Backend:
    """`postgresql://user[:password]@host[:port]/db` -> Backend; anything else is a BackendError.

    Without a password in the URL, `PGPASSWORD` is used (or libpq's `~/.pgpass` when neither is set).
    """
    from storage.tracking import redact_uri

    parts = urlsplit(url)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise BackendError(f"--backend {redact_uri(url)}: not a PostgreSQL URL; expected "
                           "postgresql://user@host:port/dbname (the password in PGPASSWORD)")
    try:
        port = parts.port or 5432
    except ValueError as err:
        raise BackendError(f"--backend {redact_uri(url)}: {err}") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not parts.username or not database or "/" in database:
        raise BackendError(f"--backend {redact_uri(url)}: name the user, the host and the database, as in "
                           "postgresql://user@host:port/dbname")
    password = unquote(parts.password) if parts.password else os.environ.get("PGPASSWORD") or None
    return Backend(parts.hostname, port, unquote(parts.username), database, password)


def prepare_databases(backend: Backend) -> list[str]:
    """Checks that the server answers and lets us in, and creates `<db>_prefect` / `<db>_mlflow` if missing.

    Returns the databases it created. Connects like `createdb` does: to the `postgres` maintenance database.
    """
    require_drivers()
    import psycopg
    from psycopg import sql

    names = [backend.database_for(tool) for tool in TOOLS]
    try:
        with psycopg.connect(host=backend.host, port=backend.port, user=backend.user, password=backend.password,
                             dbname="postgres", connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
            existing = {row[0] for row in conn.execute("select datname from pg_database where datname = any(%s)",
                                                       [names])}
            missing = [name for name in names if name not in existing]
            for name in missing:
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege:
        raise BackendError(f"PostgreSQL at {backend.address}: role {backend.user!r} may not create databases; "
                           f"ask an admin to run `createdb -O {backend.user} <name>` for "
                           f"{' and '.join(names)}, or to grant CREATEDB") from None
    except psycopg.OperationalError as err:
        reason = _first_reason(str(err))
        hint = " (lmforge reads the password from PGPASSWORD or ~/.pgpass)" if "password" in reason else ""
        raise BackendError(f"cannot use PostgreSQL at {backend.address} as {backend.user!r}: {reason}{hint}") from None
    return missing


def require_drivers() -> None:
    """psycopg (MLflow's driver, and ours) and asyncpg (Prefect's): the `team` extra."""
    import importlib.util

    missing = [name for name in ("psycopg", "asyncpg") if importlib.util.find_spec(name) is None]
    if missing:
        raise BackendError(f"--backend needs {' and '.join(missing)}: pip install 'lmforge[team]'")


def _first_reason(message: str) -> str:
    """libpq's message without the repeated 'connection to server at ... failed:' prefix, on one line."""
    line = " ".join(message.split())
    return line.rsplit("failed: ", 1)[-1] if "failed: " in line else line
