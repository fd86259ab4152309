"""A real PostgreSQL server for the several-machine tests of `retrofit tune`, started and stopped by the suite.

Debian's `postgresql` package puts `initdb` and `pg_ctl` in /usr/lib/postgresql/<version>/bin (`.ci/run`
installs it when it is missing). Both refuse to run as root, so as root they run as the `postgres` user
(`runuser`), in a temporary folder that user can read. The server listens on a free port of 127.0.0.1 only,
trusts local connections, skips fsync (a throwaway), and is stopped with `pg_ctl -m fast` at the end of the
session. Each test gets a database of its own. Its fixtures are registered for every test by tests/conftest.py.
Without initdb the tests that need the server are skipped, reported as one line saying what to install.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest

INSTALL = "PostgreSQL's initdb is not installed: apt-get install postgresql (Debian/Ubuntu) to run these tests"


def find_bin() -> str | None:
    """The folder of initdb: on the PATH, or Debian's newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))  # pg_ctl lives beside it (a PATH may hold links)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(versions[-1]) if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One throwaway server: :meth:`start`, :meth:`stop` (also in the middle of a test), :meth:`database`."""

    def __init__(self, bindir: str):
        self.bindir, self.port = bindir, free_port()
        self.root = tempfile.mkdtemp(prefix="retrofit-pg-")
        self.as_owner = []
        if os.geteuid() == 0:  # initdb and pg_ctl refuse root
            shutil.chown(self.root, "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_owner, os.path.join(self.bindir, tool), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg  # the postgres extra, in test

        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Without initdb every PostgreSQL test is skipped for the same reason: report them all at this file, so
    that `-ra` folds them into one line (pytest puts a fixture's skip at each test's own line)."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and INSTALL in report.longrepr[2]:
        report.longrepr = (__file__, None, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def postgres():
    """The session's server (skipped, with what to install, only when initdb is not there)."""
    bindir = find_bin()
    if bindir is None:
        pytest.skip(INSTALL)
    server = Postgres(bindir)
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.remove()


@pytest.fixture
def pg_url(postgres):
    """A database of this test's own on the session's server."""
    return postgres.database()


@pytest.fixture(params=["journal", "postgres"])
def store(request):
    """The study's store the test runs on: None (the journal in the output folder) or a PostgreSQL URL."""
    if request.param == "journal":
        return None
    return request.getfixturevalue("postgres").database()
