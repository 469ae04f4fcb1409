"""A throw-away PostgreSQL cluster on a free loopback port, for the tests of "Running as a team".

`postgres_cluster()` runs Debian's `initdb` / `pg_ctl` in a fresh temp dir (as the `postgres` system
user when we are root: PostgreSQL refuses to run as root), listening on 127.0.0.1 only, its unix
socket inside the temp dir, and stops it with `pg_ctl stop -m immediate`. Local socket connections
are trusted (the fixture's admin path); TCP connections need a password (scram-sha-256), as on a team.
When no PostgreSQL binaries are found and we are root, `apt-get install -y postgresql` runs once.

Other test folders import it after putting this folder on sys.path:
`sys.path.insert(0, str(Path(__file__).resolve().parents[N] / "team")); import pgfixture`.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cliutil import free_port

SUPERUSER = "postgres"
# a test cluster: durability buys nothing here and fsync costs seconds on a loaded disk
FAST = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine and they could not be installed: the caller skips."""


@dataclass(frozen=True)
class PgCluster:
    """A running cluster: TCP on 127.0.0.1:`port`, its unix socket in `socket_dir`."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    host: str = "127.0.0.1"

    def url(self, user: str, database: str, password: str | None = None) -> str:
        """`postgresql://user[:password]@127.0.0.1:port/database`."""
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def psql(self, *args: str) -> subprocess.CompletedProcess:
        """`psql ARGS` as the superuser over the trusted unix socket (what `sudo -u postgres psql` is on a host)."""
        return _as_postgres([str(self.bin_dir / "psql"), "-h", str(self.socket_dir), "-p", str(self.port),
                             "-U", SUPERUSER, "-v", "ON_ERROR_STOP=1", *args])

    def query(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Rows of `sql`, as the superuser over the unix socket (psycopg 3)."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=database,
                             connect_timeout=10) as conn:
            return conn.execute(sql).fetchall()


def find_bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and psql: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def ensure_postgres() -> Path:
    """The PostgreSQL bin folder, installing Debian's `postgresql` when missing and we are root."""
    found = find_bin_dir()
    if found:
        return found
    if os.geteuid() != 0:
        raise PostgresUnavailable("PostgreSQL is not installed and this is not root: `apt-get install -y postgresql`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, check=False)
        if done.returncode != 0 and command[1] == "install":
            raise PostgresUnavailable(f"`apt-get install -y postgresql` failed: {done.stderr[-1000:]}")
    found = find_bin_dir()
    if not found:
        raise PostgresUnavailable("apt-get installed postgresql but no initdb was found")
    return found


def _as_postgres(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs a PostgreSQL tool as the `postgres` system user when we are root (it refuses root), else as us."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", SUPERUSER, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "LC_ALL": "C"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done


def start_cluster(bin_dir: Path, base: Path) -> PgCluster:
    """initdb + pg_ctl start in `base` (which the cluster's user must own), on a free loopback port."""
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, SUPERUSER)
        shutil.chown(sockets, SUPERUSER)
    _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"])
    port = free_port()
    options = " ".join(["-c listen_addresses=127.0.0.1", f"-p {port}", f"-c unix_socket_directories={sockets}",
                        *[f"{flag} {value}" for flag, value in zip(FAST[::2], FAST[1::2])]])
    _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"), "-w", "-t", "60",
                  "-o", options, "start"])
    return PgCluster(bin_dir, data, sockets, port)


@contextmanager
def postgres_cluster() -> Iterator[PgCluster]:
    """A running cluster for the duration of the block; stopped (`pg_ctl stop -m immediate`: nothing in a
    test cluster is worth a clean shutdown) and deleted afterwards, even on failure.

    The temp dir is made with `tempfile` under /tmp, not pytest's tmp_path: the `postgres` user must
    be able to reach it, and pytest's base folder is private to root.
    """
    bin_dir = ensure_postgres()
    base = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    try:
        yield start_cluster(bin_dir, base)
    finally:
        if (base / "data" / "postmaster.pid").exists():     # started, even if `pg_ctl start -w` then failed
            _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "stop", "-m", "immediate"])
        shutil.rmtree(base, ignore_errors=True)
