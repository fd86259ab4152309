"""Atomic file writes: a temporary name next to the target, then ``os.replace``.

Every file retrofit writes (models, training states, metrics, JSON reports) goes through
:func:`atomic_write`: the data goes to ``.<name>.<pid>.tmp`` in the target's folder and is renamed onto
the target only when it is complete, so a crash, a kill or a full disk never leaves a half-written file
at the target: the previous file, if any, is kept. A failed write, whichever library made it, becomes
one :class:`WriteError` line that says why (``No space left on device``) and what to do.

A process killed by SIGKILL cannot remove its temporary file; :func:`remove_stale_temps` lets the next
run in a folder remove the ones it owns (see :mod:`retrofit.train.run_dir`).
"""
from __future__ import annotations

import contextlib
import errno
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


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield the temporary path to write; on success it replaces ``path``, on failure it is removed and
    an I/O failure is raised as :class:`WriteError` (other errors pass through)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        reason = io_reason(err)
        if reason is None:
            raise
        raise WriteError(path, reason, kept=path.exists()) from None
    finally:
        tmp.unlink(missing_ok=True)


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
