"""The study's store: a PostgreSQL (or MySQL) server for several machines, or Optuna's journal file for one
(the default, inside the output folder), opened with one error line when it cannot be, or is lost.

* **``--storage URL``** (``postgresql+psycopg://USER@HOST:PORT/DB``, ``mysql+pymysql://...``,
  ``sqlite:///...``) is Optuna's ``RDBStorage``, the store Optuna recommends for several nodes. It is opened
  with Optuna's heartbeat (``heartbeat_interval``, ``grace_period``), which judges a trial's process dead by
  the database server's ``now()`` alone (:mod:`.workers`); on PostgreSQL every session's time zone is set to
  UTC when it connects (Optuna stores the heartbeats as the server's wall time in the session's zone: two
  workers with another ``PGTZ`` would otherwise be hours apart), with a connect timeout; and a ping before
  each pooled connection is used (a server restarted between two trials costs nothing). Two processes creating
  the tables of an empty database at once race (optuna/optuna#1092): the loser retries. SQLite is not safe
  with parallel writers: one process only. A password in the URL is never printed.
* **The default journal** (``OUT/study.journal``) is locked with :class:`FlockLock`. Optuna's own journal
  locks (``JournalFileSymlinkLock``, ``JournalFileOpenLock``) are lock *files*: a process killed inside an
  append leaves ``<journal>.lock`` behind, and the next writer waits their grace period (30 s) and then
  removes it by force, which is unsafe when the holder was only slow. ``fcntl.flock`` is released by the
  kernel when its holder dies, however it dies, so a kill -9 costs nothing. The backend only calls
  ``acquire()`` and ``release()`` on its lock object, so this is a drop-in; it is hand-written because
  Optuna 5.1 has no such lock. Where ``flock`` is not supported (some network file systems) it falls
  back to ``JournalFileOpenLock``.
* **``--storage PATH``** (a journal file the user names, possibly on a shared file system) uses
  ``JournalFileOpenLock``: Optuna's documentation warns that fcntl locks are broken on many NFS servers.

``JournalFileBackend`` trusts any file: given a file that is not a journal it replays what it can and then
appends to it (a file of someone else's, corrupted), and a torn last line (a writer killed inside its
``write()``) is merged with the next append, after which every read fails. So the first line is checked
before opening (a JSON object with an ``op_code``), and a last line without its newline is cut off under
the lock (writers append whole lines under it, so such a line can only be a dead writer's). A line that is
JSON but no entry Optuna can replay (an unknown ``op_code``, a list, a record without its ``study_id``)
makes Optuna's replay fail with whatever it hits (``AssertionError``, ``TypeError``, ``KeyError``):
:class:`CheckedJournal` turns that into one :class:`StorageError` naming the line, when the file is opened
and on every later read alike. :func:`store_errors` does the same for a database server that went away.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from sqlalchemy.engine import make_url

from ...errors import RetrofitError, excerpt, first_line

JOURNAL = "study.journal"
CONNECT_TIMEOUT = 10  # seconds to reach a database server before giving up (a URL's own connect_timeout wins)
CREATE_TRIES = 5  # attempts at opening an empty database that other processes are setting up at the same time
CONTINUES = "the study keeps every finished trial: the same command continues it"


class StorageError(RetrofitError):
    """A store that cannot be opened, read or reached: one line saying which and why."""


class FlockLock:
    """A lock object for ``JournalFileBackend(path, lock_obj=...)`` on ``<journal>.flock``; see the module
    docstring. A ``threading.Lock`` goes with it: ``flock`` is per open file, so the threads of one process
    (a trial's heartbeat) must take turns by themselves."""

    def __init__(self, journal: str):
        self.journal = journal
        self.path = journal + ".flock"
        self._fd: int | None = None
        self._mutex = threading.Lock()

    def acquire(self) -> bool:
        self._mutex.acquire()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                raise
        except BaseException:
            self._mutex.release()
            raise
        self._fd = fd
        cut_torn_tail(self.journal)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._mutex.release()


def flock_works(path: str) -> bool:
    """Whether ``flock`` is supported where ``path`` lives (not on some network file systems)."""
    fd = os.open(path + ".flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)


def open_storage(
    where: str | Path,
    *,
    shared: bool = False,
    heartbeat: tuple[int, int] | None = None,
    on_stale: Callable | None = None,
):
    """The storage at ``where``: an RDB URL (``dialect[+driver]://...``) or a journal file (``shared``: given by
    the user, locked with Optuna's open-lock). On an RDB, ``heartbeat`` is Optuna's ``(heartbeat_interval,
    grace_period)`` in seconds and ``on_stale`` its ``heartbeat_stale_trial_callback``. :class:`StorageError`
    when it cannot be opened."""
    where = str(where)
    if "://" in where:
        return open_rdb(where, heartbeat, on_stale)
    check_journal(where)
    try:
        lock = JournalFileOpenLock(where) if shared or not flock_works(where) else FlockLock(where)
        if isinstance(lock, JournalFileOpenLock):
            _repair(where, lock)
        return CheckedJournal(JournalFileBackend(where, lock_obj=lock), where)  # replays the log now
    except (OSError, ValueError) as err:  # unreadable, or not a journal after all (JSONDecodeError)
        raise StorageError(
            f"cannot open --storage {excerpt(where, bare=True)}: {type(err).__name__}: {first_line(err)}"
        ) from None


def shown(url: str) -> str:
    """An RDB URL as messages print it: without its password, a short escaped excerpt."""
    try:
        return excerpt(make_url(url).render_as_string(hide_password=True), bare=True)
    except sqlalchemy.exc.ArgumentError:
        return excerpt(url, bare=True)


def open_rdb(url: str, heartbeat: tuple[int, int] | None, on_stale: Callable | None) -> RDBStorage:
    """Optuna's ``RDBStorage`` on ``url`` (see the module docstring for its settings)."""
    kwargs: dict = {"pool_pre_ping": True}
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise StorageError(f"cannot open --storage {excerpt(url, bare=True)}: {first_line(err)}") from None
    postgres = parsed.get_backend_name() == "postgresql"
    if postgres and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    interval, grace = heartbeat if heartbeat is not None else (None, None)
    for attempt in range(CREATE_TRIES):
        try:  # builds the engine and the tables now: every error of the URL comes out here
            storage = RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=on_stale,
            )
            if postgres:  # every session in UTC from now on (a PGTZ of the client beats a connect option)
                sqlalchemy.event.listen(storage.engine, "connect", _utc)
                storage.engine.dispose()
            return storage
        except ImportError as err:  # the database driver (psycopg, pymysql...) is not installed
            raise StorageError(
                f"cannot open --storage {shown(url)}: {first_line(err)} (for PostgreSQL: pip install "
                f"-c constraints.txt -e '.[postgres]')"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == CREATE_TRIES - 1:  # another process creating the same tables: its work is ours
                raise
            time.sleep(0.2 + random.random())
        except Exception as err:  # noqa: BLE001 - sqlalchemy's ArgumentError, OperationalError...
            raise StorageError(f"cannot open --storage {shown(url)}: {reason(err)}") from None
    raise AssertionError("not reached")


def _utc(connection, record) -> None:
    """A new PostgreSQL session's time zone: UTC (see the module docstring)."""
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
    connection.commit()


def reason(err: BaseException) -> str:
    """What a store error says, from its innermost cause (Optuna wraps the driver's error in its own)."""
    while err.__cause__ is not None and isinstance(
        err, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)
    ):
        err = err.__cause__
    if isinstance(err, sqlalchemy.exc.StatementError) and err.orig is not None:
        err = err.orig
    return f"{type(err).__name__}: {first_line(err)}"


@contextmanager
def store_errors(where: str):
    """A database server that went away (or refused a write) while the tune ran, as one :class:`StorageError`:
    the study's finished trials are in it, and the same command continues it once the server is back."""
    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise StorageError(
            f"lost the study's store --storage {shown(where)} ({reason(err)}); {CONTINUES} once the server is back"
        ) from None


class CheckedJournal(JournalStorage):
    """Optuna's ``JournalStorage`` whose replay of a line that is no journal entry is one :class:`StorageError`
    naming the line (see the module docstring), on the first read and on every later one. Optuna replays
    the lines inside ``_sync_with_backend``, counting each in ``log_number_read`` before applying it, so that
    is the one place to catch what a bad line raises. A line that is not JSON is raised by the reader,
    after the lines before it were applied."""

    def __init__(self, backend: JournalFileBackend, where: str):
        self._where = where
        super().__init__(backend)

    def _sync_with_backend(self) -> None:
        try:
            super()._sync_with_backend()
        except (AssertionError, KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
            read = isinstance(err, json.JSONDecodeError) or str(err) == "Invalid log format."
            line = self._replay_result.log_number_read + (1 if read else 0)
            raise StorageError(
                f"cannot read --storage {excerpt(self._where, bare=True)}: line {line} is not an Optuna "
                "journal entry "
                f"({type(err).__name__}: {first_line(err)}); restore the file from a copy, or use "
                f"another --output-dir or --storage"
            ) from None


def check_journal(where: str) -> None:
    """A journal path that cannot be one: a missing folder, a folder, a file that is not a journal."""
    parent = os.path.dirname(os.path.abspath(where))
    if not os.path.isdir(parent):
        raise StorageError(
            f"cannot open --storage {excerpt(where, bare=True)}: folder {excerpt(parent, bare=True)} does not exist"
        )
    if os.path.isdir(where):
        raise StorageError(f"cannot open --storage {excerpt(where, bare=True)}: it is a folder; give a journal file")
    if not os.path.isfile(where) or os.path.getsize(where) == 0:
        return
    try:
        with open(where, "rb") as f:
            first = f.readline(1 << 20)
        ok = first.endswith(b"\n") and isinstance(record := json.loads(first), dict) and "op_code" in record
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise StorageError(f"cannot open --storage {excerpt(where, bare=True)}: not an Optuna journal file")


def _repair(path: str, lock) -> None:
    """Cut a torn tail under another lock than :class:`FlockLock` (which does it on every acquire)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    lock.acquire()
    try:
        cut_torn_tail(path)
    finally:
        lock.release()


def cut_torn_tail(path: str) -> int:
    """Cut the journal back to its last newline (call under its lock); returns the bytes removed."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":  # the usual case: one byte read per append
            return 0
        back = min(size, 1 << 20)
        f.seek(size - back)
        keep = size - back + f.read(back).rfind(b"\n") + 1
        f.truncate(keep)
        os.fsync(f.fileno())
        return size - keep
