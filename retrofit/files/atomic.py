"""Atomic file writes: a temporary folder next to the target, then ``os.replace``.

Every file retrofit writes (models, adapters, cards, training states, metrics, JSON reports, plots)
goes through :func:`atomic_write`: the data goes to ``.<name>.<pid>.tmp/<name>`` in the target's folder
and is renamed onto the target only when it is complete, so a crash, a kill or a full disk never
leaves a half-written file at the target: the previous file, if any, is kept. A failed write,
whichever library made it, becomes one :class:`WriteError` line that says why (``No space left on
device``) and what to do.

The temporary is a folder, not a file, because a library may write through its own temporary file:
safetensors (0.8) writes ``.tmpXXXXXX`` next to the path it is given and renames it there, so a kill
in the middle of its write would leave a file of no recognisable name. In the folder, everything one
write leaves has one name. A process killed by SIGKILL cannot remove it: each write first removes the
temporaries of the same target whose writer is dead (:func:`remove_dead_temps`: no ``flock`` held on
the folder, no such process), so a killed ``add-se --output F`` leaves nothing behind once F is written
again; :func:`remove_stale_temps` lets a run folder's lock holder remove all of its own at once (see
:mod:`retrofit.train.run_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import RetrofitError, excerpt

TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) words an OSError


class WriteError(RetrofitError):
    """A file could not be written; the previous file at ``path`` (if any) is untouched."""

    def __init__(self, path: Path, reason: str, kept: bool, then: str = "try again"):
        self.path, self.reason, self.kept, self.then = path, reason, kept, then
        fix = "free space" if "space" in reason.lower() else "fix that"
        super().__init__(
            f"cannot write {excerpt(path)}: {reason}; "
            f"{f'the previous {path.name} is kept' if kept else 'nothing was written'}; {fix} and {then}"
        )

    def advise(self, then: str) -> WriteError:
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
    """Remove the temporaries of ``path`` (``.<name>.<pid>.tmp``) whose writer is dead, and return them.
    A writer holds an exclusive ``flock`` on its temporary folder while it writes (the kernel drops it
    when the process dies, however it dies), so one whose lock can be taken and whose pid is no process
    here (a writer that has just made its folder holds no lock yet) has no writer left."""
    path = Path(path)
    removed = []
    for p, pid in _temps(path.parent, {path.name}):
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):  # locked (a writer is alive), gone meanwhile, not ours to remove
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _alive(pid):
                    _remove(p)
                    removed.append(p)
            finally:
                os.close(fd)  # drops the lock
    return removed


def _remove(p: Path) -> None:
    """Remove a temporary: a folder (this version's) or a file (earlier versions')."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _mode_for(path: Path) -> int:
    """The permission bits a plain in-place write of ``path`` would leave: the existing file's, or, for a
    new file, ``0o666`` less the umask. A rename installs the temporary's inode, whose mode is whatever
    its writer gave it: safetensors >= 0.8 creates its files 0600 whatever the umask (its tempfile:
    safetensors/safetensors#782), which would make a saved model unreadable to a team's other users."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError, StopIteration):  # Linux >= 4.7 reports it: no need to set it
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield the temporary path to write (``.<name>.<pid>.tmp/<name>``, next to ``path``); on success
    it replaces ``path``, and the temporary folder is removed either way. An I/O failure is raised as
    :class:`WriteError` (other errors pass through). The folders above ``path`` are created if missing
    (:func:`make_folders`), and the temporaries a killed writer of the same target left are removed
    first (:func:`remove_dead_temps`)."""
    path = Path(path)
    make_folders(path.parent)
    remove_dead_temps(path)
    folder, fd = temp_name(path), None
    try:
        with contextlib.suppress(FileNotFoundError):
            _remove(folder)  # a dead process that had our pid left it
        folder.mkdir()
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: see remove_dead_temps
        tmp = folder / path.name
        yield tmp
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except Exception as err:
        reason = io_reason(err)
        if reason is None:
            raise
        raise WriteError(path, reason, kept=path.exists()) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
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
    """Remove the temporaries (``.<name>.<pid>.tmp``) of ``names`` that a killed writer left in
    ``folder``; returns them. Call it only while no other process may be writing there (a lock)."""
    removed = []
    for p, _ in _temps(folder, set(names)):
        with contextlib.suppress(OSError):
            _remove(p)
            removed.append(p)
    return removed


def _temps(folder: Path, names: set[str]) -> list[tuple[Path, int]]:
    """The temporaries of ``names`` in ``folder`` (``.<name>.<pid>.tmp``), each with its writer's pid."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return [
        (folder / entry, int(match.group("pid")))
        for entry in entries
        if (match := TEMP.match(entry)) and match.group("name") in names
    ]


def check_writable(path: Path) -> None:
    """Fail early (before any work) when ``path`` cannot be written. Missing folders above it are
    fine: :func:`atomic_write` creates them (as ``mkdir -p`` would), so nothing is created here, and a
    command that fails later leaves no empty folder behind."""
    path = Path(path)
    if path.is_dir():
        raise RetrofitError(
            f"output {excerpt(path)} is a folder; give a file name such as {excerpt(path / 'model.safetensors')}"
        )
    existing = next((p for p in path.parents if p.exists()), Path("."))  # the nearest folder that exists
    if not existing.is_dir():
        raise RetrofitError(
            f"cannot create the output folder {excerpt(path.parent)}: {excerpt(existing)} is a file; "
            "choose another "
            f"output path"
        )
    if not os.access(existing, os.W_OK):
        raise RetrofitError(f"output folder {excerpt(existing)} is not writable")


def make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents (``mkdir -p``, as timm's and Lightning's output
    folders are), or say in one line why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way (FileExistsError, NotADirectoryError), no permission...
        reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
        raise RetrofitError(
            f"cannot create the output folder {excerpt(folder)}: {reason or err}; choose another output path"
        ) from None
