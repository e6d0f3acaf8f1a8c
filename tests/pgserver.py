"""A throwaway PostgreSQL server on loopback (Debian's `postgresql` package), for the tests and the benchmarks.

    with throwaway_postgres(folder) as url:   # a SQLAlchemy URL of an empty database `triage`
        ...

Run as the `postgres` user when this process is root (the server refuses root); fsync is off (a
throwaway server's speed matters, its durability does not). None when the server is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class NoPostgres(RuntimeError):
    """The server is not installed, or cannot be run from here; the message says why."""


def postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), if installed."""
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _as_postgres_user(folder: Path, sockets: Path) -> list[str]:
    """The command prefix that runs the server as `postgres` when this process is root (it refuses root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        raise NoPostgres("running as root without a postgres user to run the server as")
    shutil.chown(folder, "postgres")
    shutil.chown(sockets, "postgres")
    folder.chmod(0o755)
    for parent in folder.parents:  # the server user must reach its folder
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def throwaway_postgres(folder: Path) -> Iterator[str]:
    """A server with a database `triage`, stopped on exit; yields its SQLAlchemy URL."""
    binaries = postgres_binaries()
    if binaries is None:
        raise NoPostgres("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir(parents=True)
    as_user = _as_postgres_user(folder, sockets)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(folder / "log.txt"), "start"], check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE triage")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/triage"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
