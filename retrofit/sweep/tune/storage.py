"""The study's store: Optuna's journal file (the default, inside the output folder) or an RDB URL, opened
with one error line when it cannot be.

* **The default journal** (``OUT/study.journal``) is locked with :class:`FlockLock`. Optuna's own journal
  locks (``JournalFileSymlinkLock``, ``JournalFileOpenLock``) are lock *files*: a process killed inside an
  append leaves ``<journal>.lock`` behind, and the next writer waits their grace period (30 s) and then
  removes it by force, which is unsafe when the holder was only slow. ``fcntl.flock`` is released by the
  kernel when its holder dies, however it dies, so a kill -9 costs nothing. The backend only calls
  ``acquire()`` and ``release()`` on its lock object, so this is a drop-in; it is hand-written because
  Optuna 5.1 has no such lock. Where ``flock`` is not supported (some network file systems) it falls
  back to ``JournalFileOpenLock``.
* **``--storage PATH``** (a journal on a shared file system, for several machines) uses
  ``JournalFileOpenLock``: Optuna's documentation warns that fcntl locks are broken on many NFS servers.
* **``--storage URL``** (``postgresql+psycopg://...``, ``mysql+pymysql://...``, ``sqlite:///...``) is
  Optuna's ``RDBStorage``; SQLite is not safe with parallel writers, so use it for one process only.

``JournalFileBackend`` trusts any file: given a file that is not a journal it replays what it can and then
appends to it (a file of someone else's, corrupted), and a torn last line (a writer killed inside its
``write()``) is merged with the next append, after which every read fails. So the first line is checked
before opening (a JSON object with an ``op_code``), and a last line without its newline is cut off under
the lock (writers append whole lines under it, so such a line can only be a dead writer's).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from pathlib import Path

from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from ...errors import RetrofitError, excerpt, first_line

JOURNAL = "study.journal"


class StorageError(RetrofitError):
    """A store that cannot be opened: one line saying which and why."""


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


def open_storage(where: str | Path, *, shared: bool = False):
    """The storage at ``where``: an RDB URL (``dialect[+driver]://...``) or a journal file (``shared``: on a
    shared file system, given by the user, locked with Optuna's open-lock). :class:`StorageError` when it
    cannot be opened."""
    where = str(where)
    if "://" in where:
        try:
            return RDBStorage(where)  # builds the engine and the tables now: every error comes out here
        except ImportError as err:  # the database driver (psycopg, pymysql...) is not installed
            raise StorageError(f"cannot open --storage {excerpt(where, bare=True)}: {first_line(err)}") from None
        except Exception as err:  # noqa: BLE001 - sqlalchemy's ArgumentError, OperationalError...
            raise StorageError(f"cannot open --storage {excerpt(where, bare=True)}: {type(err).__name__}: {first_line(err)}") from None
    check_journal(where)
    try:
        lock = JournalFileOpenLock(where) if shared or not flock_works(where) else FlockLock(where)
        if isinstance(lock, JournalFileOpenLock):
            _repair(where, lock)
        return JournalStorage(JournalFileBackend(where, lock_obj=lock))  # replays the log now
    except (OSError, ValueError) as err:  # unreadable, or not a journal after all (JSONDecodeError)
        raise StorageError(f"cannot open --storage {excerpt(where, bare=True)}: {type(err).__name__}: {first_line(err)}") from None


def check_journal(where: str) -> None:
    """A journal path that cannot be one: a missing folder, a folder, a file that is not a journal."""
    parent = os.path.dirname(os.path.abspath(where))
    if not os.path.isdir(parent):
        raise StorageError(f"cannot open --storage {excerpt(where, bare=True)}: folder {excerpt(parent, bare=True)} does not exist")
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
