"""A throw-away PostgreSQL cluster on a loopback port, for the team set-up test and by hand.

``initdb`` and ``pg_ctl`` come from the machine (Debian's PostgreSQL package); as root they run as
the ``postgres`` user, who owns the cluster's folder. Trust authentication on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers.local_server import free_port

SERVER_USER = "postgres"


@dataclass(frozen=True)
class Cluster:
    port: int
    folder: Path

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        # autocommit: CREATE DATABASE runs outside a transaction
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={SERVER_USER} dbname=postgres", autocommit=True
        ) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            return f"no PostgreSQL server binary ({tool}) on PATH"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no {SERVER_USER!r} user to run the server as"
    return None


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


@contextmanager
def cluster() -> Iterator[Cluster]:
    """Start a cluster in a fresh folder; stop it and remove the folder afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cnmc-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, SERVER_USER)
    data, log, port = folder / "data", folder / "server.log", free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run(
        _as_server_user(["initdb", "-D", str(data), "-A", "trust", "-U", SERVER_USER, "-E", "UTF8", "--no-sync"]), **run
    )
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off -c max_connections=50"
    subprocess.run(_as_server_user(["pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]), **run)
    try:
        yield Cluster(port, folder)
    finally:
        subprocess.run(_as_server_user(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
