"""The run's folder: what ``--resume`` needs, the last and best models, and the metrics.

Files (rank 0 writes, every file atomically: :mod:`retrofit.files.atomic`):

* ``train_state.pt`` (:mod:`retrofit.train.state`): model, recipe metadata, settings, optimizer,
  scheduler, epoch, RNG state, the metric rows so far and the best row, in one file;
* ``last.safetensors``, ``best.safetensors`` (by val top-1, step 0 included): loadable with
  :func:`retrofit.load`;
* ``metrics.jsonl``: one JSON line per evaluation;
* ``.retrofit.lock``: held (``fcntl.flock``) by the run using the folder, and naming its process.

**One commit per epoch.** ``train_state.pt`` is the commit: an epoch ends with train_state -> last ->
best (when the epoch is the best so far) -> metrics, and everything after the state is derived from
it. A run that resumes rewrites them from the state first (:meth:`RunDir.recover`), so a kill at any
point leaves, after ``--resume``, the files of an uninterrupted run: a kill before the state's rename
redoes the epoch; a kill after it (even after the last epoch, when nothing is left to train) rewrites
the last model, the best one if it is that epoch, and every metrics row. Step 0 (before any state)
writes best -> metrics; a kill there starts the run over. A kill leaves its temporary folders
(``.<name>.<pid>.tmp``, :mod:`retrofit.files.atomic`); the next run in the folder removes them once it holds the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RetrofitError, RetrofitWarning, excerpt
from ..files.atomic import WriteError, atomic_write, remove_stale_temps
from ..files.checkpoint import save
from ..files.tensors import load_into
from .distributed import Dist
from .state import STATE_FILE, check_model, load_state, save_state

LAST_FILE, BEST_FILE, METRICS_FILE = "last.safetensors", "best.safetensors", "metrics.jsonl"
LOCK_FILE = ".retrofit.lock"
RESUME = "rerun with --resume"


class RunDir:
    """The output folder of one fine-tuning run (``path`` None: nothing is written)."""

    def __init__(self, path: str | Path | None, env: Dist):
        self.path = Path(path).expanduser() if path is not None else None
        self.env = env
        self._lock: int | None = None  # the open lock file's descriptor while this run holds it

    @property
    def writes(self) -> bool:
        """Whether this process writes files: a folder was given and this is rank 0."""
        return self.path is not None and self.env.main

    @property
    def state_file(self) -> Path | None:
        return self.path / STATE_FILE if self.path is not None else None

    def open(
        self, resume: bool, model: nn.Module, meta: dict[str, str], settings: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Check the folder, create and lock it; return the saved training state when resuming one.

        Raises:
            RetrofitError: a file in the way, a folder that cannot be created (missing parents are
                created, as by ``mkdir -p``), a
                folder another run holds, a run already there (without ``resume``), or a saved run
                of another model, with other settings, or damaged (its weights are checked against
                ``model``).
        """
        if self.path is None:
            return None
        out, state = self.path, self.path / STATE_FILE
        if out.exists() and not out.is_dir():
            raise RetrofitError(f"output {excerpt(out)} is a file; give a folder for the fine-tuning run")
        problem = self._create_and_lock() if self.env.main else None
        try:
            if self.env.any(problem is not None):  # every rank stops together (only rank 0 prints)
                raise RetrofitError(problem or f"rank 0 could not open {excerpt(out)}")
            saved = None
            if resume and state.is_file():
                saved = load_state(state)
                _check_resumable(saved, state, meta, settings)
                check_model(saved, model, state)
            elif resume:
                if self.env.main:
                    warnings.warn(
                        f"nothing to resume in {excerpt(out)}; starting at epoch 1", RetrofitWarning, stacklevel=4
                    )
            elif state.exists():
                raise RetrofitError(
                    f"{excerpt(out)} already holds a fine-tuning run; pass resume=True to continue it, "
                    f"or delete it, or choose another output_dir"
                )
        except BaseException:
            self.close()
            raise
        self.env.barrier()
        return saved

    def _create_and_lock(self) -> str | None:
        """Create the folder, take its lock, remove a killed run's temporary files; or say why not."""
        out = self.path
        try:
            out.mkdir(parents=True, exist_ok=True)  # mkdir -p: runs/se50 in a fresh checkout
        except OSError as err:
            return (
                f"cannot create the output folder {excerpt(out)}: {err.strerror or err}; choose a folder you can "
                "write to"
            )
        try:
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            return (
                f"cannot write in the output folder {excerpt(out)}: {err.strerror or err}; choose a folder you can "
                "write to"
            )
        try:  # the kernel drops the lock when the process ends, however it ends
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (
                f"{excerpt(out)} is in use by another fine-tuning run ({holder}); wait for it to end or choose "
                f"another output folder"
            )
        except OSError as err:  # a file system without locks: say so, go on
            warnings.warn(
                f"cannot lock {excerpt(out)} ({err.strerror or err}); make sure no other run writes there",
                RetrofitWarning,
                stacklevel=5,
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self._lock = fd
        remove_stale_temps(out, (STATE_FILE, LAST_FILE, BEST_FILE, METRICS_FILE))
        return None

    def close(self) -> None:
        """Release the folder's lock (the lock file stays: removing it would race a waiting run)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def recover(self, model: nn.Module, saved: dict[str, Any], ema: nn.Module | None = None) -> None:
        """Rewrite what follows the committed state: ``model`` (and ``ema``, the model EMA, when the run
        has one) holds its weights (see the module doc)."""
        if self.writes:
            self._save_model(model, LAST_FILE)
            best = saved["best"]
            if best is not None and best["epoch"] == saved["epoch"]:  # the saved epoch was the best
                self._save_model(ema if ema is not None and best["name"].endswith("(ema)") else model, BEST_FILE)
            self.write_metrics(saved["rows"])
        self.env.barrier()

    def commit_step0(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        """Before the first epoch: the model at step 0 is the best so far; then the metrics."""
        if self.writes:
            self._save_model(model, BEST_FILE)
            self.write_metrics(rows)
        self.env.barrier()

    def commit_epoch(
        self, model: nn.Module, state: dict[str, Any], rows: list[dict[str, Any]], best: nn.Module | None
    ) -> None:
        """After an epoch: the training state (the commit), then the last model, the best one (``best``:
        the module whose weights are this epoch's best row, the model or its EMA; None when the epoch
        is not the best so far) and the metrics (every rank waits)."""
        if self.writes:
            try:
                save_state(self.path / STATE_FILE, state)
            except WriteError as err:
                raise err.advise(RESUME) from None
            self._save_model(model, LAST_FILE)
            if best is not None:
                self._save_model(best, BEST_FILE)
            self.write_metrics(rows)
        self.env.barrier()

    def _save_model(self, model: nn.Module, name: str) -> None:
        try:
            save(model, self.path / name)
        except WriteError as err:
            raise err.advise(RESUME) from None

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not self.writes:
            return
        try:
            with atomic_write(self.path / METRICS_FILE) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        except WriteError as err:
            raise err.advise(RESUME) from None

    def restore_best(self, model: nn.Module) -> None:
        """Load ``best.safetensors`` into ``model`` (checked first), if the run has one."""
        if self.path is not None and (self.path / BEST_FILE).is_file():
            load_into(model, self.path / BEST_FILE)


def _check_resumable(saved: dict[str, Any], path: Path, meta: dict[str, str], settings: dict[str, Any]) -> None:
    theirs = saved.get("meta", {})
    for key, what in (
        ("architecture", "architecture"),
        ("model_kwargs", "model arguments"),
        ("recipe", "recipe"),
        ("input_size", "input size"),
    ):
        if meta.get(key) != theirs.get(key):
            raise RetrofitError(
                f"{excerpt(path)} is from another model ({what} {excerpt(theirs.get(key))}, this one "
                f"{excerpt(meta.get(key))}); choose another output folder or drop --resume"
            )
    then = saved.get("settings", {})
    changed = [k for k in settings if k in then and then[k] != settings[k]]
    if changed:
        k = changed[0]
        raise RetrofitError(
            f"{excerpt(path)} was started with {k} = {excerpt(then[k])}, now {excerpt(settings[k])}; "
            "resume with the "
            f"same settings (or choose another output folder)"
        )
