"""A PostgreSQL server for tests and benchmarks: the one `DATACOMP_TEST_POSTGRES_URL` names
(postgresql://user:password@host:port/db; .ci/run starts one), in a fresh database when the role may create one;
otherwise a throwaway cluster (`initdb`, `pg_ctl`) on 127.0.0.1 with a free port, in a temporary directory, run
as the `postgres` user when the caller is root, removed afterwards.

    with running_server() as server:       # {"host", "port", "user", "password", "db"}
        os.environ.update(dagster_pg_env(server))

Plain module (no pytest): tests/test_instance.py and benchmarks/instance_storage.py use it."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

URL_VARIABLE = "DATACOMP_TEST_POSTGRES_URL"


class PostgresUnavailable(RuntimeError):
    """No server URL given and no PostgreSQL server binaries (initdb) on this machine."""


def postgres_bin() -> Path | None:
    """The directory of the newest initdb/pg_ctl: Debian's /usr/lib/postgresql/<major>/bin, else $PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(server: dict, dbname: str | None = None):
    import psycopg2

    return psycopg2.connect(host=server["host"], port=server["port"], user=server["user"],
                            password=server["password"], dbname=dbname or server["db"], connect_timeout=10)


def dagster_pg_env(server: dict) -> dict[str, str]:
    """The DAGSTER_PG_* variables that instance/dagster-postgres.yaml reads, for `server`."""
    return {f"DAGSTER_PG_{name}": str(server[key]) for name, key in
            [("HOST", "host"), ("PORT", "port"), ("USER", "user"), ("PASSWORD", "password"), ("DB", "db")]}


@contextlib.contextmanager
def throwaway_server(bindir: Path, durable: bool = False):
    """A fresh cluster with one database, `dagster_test`. Not `durable` (the default, for tests): fsync,
    synchronous_commit and full_page_writes off; `durable`: the server's defaults (every commit flushed)."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = Path(tempfile.mkdtemp(prefix="datacomp-pg-"))  # under /tmp: reachable by the postgres user
    password = secrets.token_hex(16)
    (tmp / "pwfile").write_text(password + "\n")
    if as_postgres:
        shutil.chown(tmp, "postgres", "postgres")
        shutil.chown(tmp / "pwfile", "postgres", "postgres")
    data = tmp / "data"
    server = {"host": "127.0.0.1", "user": "datacomp", "password": password, "db": "dagster_test"}
    try:
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", server["user"],
                        f"--pwfile={tmp / 'pwfile'}", "--auth-host=scram-sha-256", "--auth-local=trust",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        for _ in range(3):  # a port taken between free_port and the start: another one
            server["port"] = free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {server['port']} -c unix_socket_directories={tmp}"
            if not durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            started = subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l",
                                      str(tmp / "server.log"), "-o", options, "-w", "-t", "60", "start"],
                                     capture_output=True, text=True, timeout=90)
            if started.returncode == 0:
                break
        else:
            log = (tmp / "server.log").read_text() if (tmp / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log[-2000:]}")
        try:
            with contextlib.closing(connect(server, "postgres")) as conn:
                conn.autocommit = True
                conn.cursor().execute(f"CREATE DATABASE {server['db']}")
            yield server
        finally:
            subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def given_server(url: str):
    """The server `url` names, in a fresh database dropped afterwards (or the named one, if the role may not
    create databases)."""
    parsed = urlparse(url)
    server = {"host": parsed.hostname or "127.0.0.1", "port": parsed.port or 5432,
              "user": unquote(parsed.username or ""), "password": unquote(parsed.password or ""),
              "db": parsed.path.lstrip("/") or "postgres"}
    fresh = f"dagster_test_{secrets.token_hex(4)}"
    try:  # a database of its own, so that runs of earlier sessions do not mix in
        with contextlib.closing(connect(server)) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"CREATE DATABASE {fresh}")
    except Exception:
        yield server
        return
    try:
        yield {**server, "db": fresh}
    finally:
        with contextlib.closing(connect(server)) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {fresh} WITH (FORCE)")


@contextlib.contextmanager
def running_server(durable: bool = False):
    """The server of $DATACOMP_TEST_POSTGRES_URL if set, else a throwaway one (see throwaway_server); raises
    PostgresUnavailable when neither can be had."""
    url = os.environ.get(URL_VARIABLE)
    if url:
        with given_server(url) as server:
            yield server
        return
    bindir = postgres_bin()
    if bindir is None:
        raise PostgresUnavailable(f"no ${URL_VARIABLE} and no PostgreSQL server binaries (initdb); "
                                  "bin/setup installs Debian's postgresql package")
    with throwaway_server(bindir, durable=durable) as server:
        yield server
