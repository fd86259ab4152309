"""Atomic file writes: a temporary name next to the target, then ``os.replace``.

Every file retrofit writes (models, training states, metrics, JSON reports) goes through
:func:`atomic_write`: the data goes to ``.<name>.<pid>.tmp`` in the target's folder and is renamed onto
the target only when it is complete, so a crash, a kill or a full disk never leaves a half-written file
at the target: the previous file, if any, is kept. A failed write, whichever library made it, becomes
one :class:`WriteError` line that says why (``No space left on device``) and what to do.

A process killed by SIGKILL cannot remove its temporary file. Each write first removes the temporaries
of the same target whose writer is dead (:func:`remove_dead_temps`: no lock held on them, no such
process), so a killed ``add-se --output F`` leaves nothing behind once F is written again;
:func:`remove_stale_temps` lets a run folder's lock holder remove all of its own at once
(see :mod:`retrofit.train.run_dir`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from .errors import RetrofitError

TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) words an OSError


class WriteError(RetrofitError):
    """A file could not be written; the previous file at ``path`` (if any) is untouched."""

    def __init__(self, path: Path, reason: str, kept: bool, then: str = "try again"):
        self.path, self.reason, self.kept, self.then = path, reason, kept, then
        fix = "free space" if "space" in reason.lower() else "fix that"
        super().__init__(f"cannot write {path}: {reason}; "
                         f"{f'the previous {path.name} is kept' if kept else 'nothing was written'}; {fix} and {then}")

    def advise(self, then: str) -> "WriteError":
        """The same failure with another next step (``rerun with --resume``)."""
        return WriteError(self.path, self.reason, self.kept, then)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is another user's
        return True
    return True


def remove_dead_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` (``.<name>.<pid>.tmp``) whose writer is dead, and returns
    them. A writer holds an exclusive ``flock`` on its temporary file while it writes (the kernel drops
    it when the process dies, however it dies), so a file whose lock can be taken and whose pid is no
    process here has no writer left."""
    path = Path(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    removed = []
    for name in names:
        match = TEMP.match(name)
        if not match or match.group("name") != path.name or int(match.group("pid")) == os.getpid():
            continue
        p = path.parent / name
        with contextlib.suppress(OSError):  # locked (a writer is alive), gone meanwhile, not ours to remove
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _alive(int(match.group("pid"))):
                    p.unlink()
                    removed.append(p)
            finally:
                os.close(fd)  # drops the lock
    return removed


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield the temporary path to write; on success it replaces ``path``, on failure it is removed and
    an I/O failure is raised as :class:`WriteError` (other errors pass through). The temporaries a
    killed writer of the same target left are removed first (:func:`remove_dead_temps`)."""
    path = Path(path)
    remove_dead_temps(path)
    tmp, fd = temp_name(path), None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: see remove_dead_temps
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        reason = io_reason(err)
        if reason is None:
            raise
        raise WriteError(path, reason, kept=path.exists()) from None
    finally:
        tmp.unlink(missing_ok=True)
        if fd is not None:
            os.close(fd)


def io_reason(err: BaseException) -> str | None:
    """Why a write failed (``No space left on device``) when ``err`` is an I/O failure: an ``OSError``,
    safetensors' ``SafetensorError`` wrapping one (``... (os error 28)``), or an error raised while
    an ``OSError`` was being handled. None for anything else."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err.strerror or str(err) or type(err).__name__
        match = _OS_ERROR.search(str(err))
        if match:
            code = int(match.group(1))
            return os.strerror(code) if code in errno.errorcode else str(err)
        err = err.__cause__ or err.__context__
    return None


class RecordingFile:
    """A binary file for ``torch.save`` that keeps the ``OSError`` a write raised (``error``): torch's
    writer drops it and raises ``RuntimeError: ... unexpected pos`` instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def remove_stale_temps(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files (``.<name>.<pid>.tmp``) of ``names`` that a killed writer left in
    ``folder``; returns them. Call it only while no other process may be writing there (a lock)."""
    names = set(names)
    removed = []
    for p in folder.iterdir():
        match = TEMP.match(p.name)
        if match and match.group("name") in names and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
