"""The run's folder: what ``--resume`` needs, the last and best models, and the metrics.

Files (rank 0 writes, every file atomically: a temporary name, then ``os.replace``):

* ``train_state.pt`` (:mod:`retrofit.train_state`): model, recipe metadata, settings, optimizer,
  scheduler, epoch, RNG state and the metric rows so far, in one file;
* ``last.safetensors``, ``best.safetensors`` (by val top-1, step 0 included): loadable with
  :func:`retrofit.load`;
* ``metrics.jsonl``: one JSON line per evaluation.

An epoch ends with: best (already written when it improved) -> last -> train_state -> metrics. A
kill between two of them resumes from the previous ``train_state.pt`` and redoes the epoch, which
rewrites the same files.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..distributed import Dist
from ..errors import RetrofitError, RetrofitWarning
from ..train_state import STATE_FILE, check_model, load_state, save_state

LAST_FILE, BEST_FILE, METRICS_FILE = "last.safetensors", "best.safetensors", "metrics.jsonl"


class RunDir:
    """The output folder of one fine-tuning run (``path`` None: nothing is written)."""

    def __init__(self, path: str | Path | None, env: Dist):
        self.path = Path(path).expanduser() if path is not None else None
        self.env = env

    @property
    def writes(self) -> bool:
        """Whether this process writes files: a folder was given and this is rank 0."""
        return self.path is not None and self.env.main

    @property
    def state_file(self) -> Path | None:
        return self.path / STATE_FILE if self.path is not None else None

    def open(self, resume: bool, model: nn.Module, meta: dict[str, str],
             settings: dict[str, Any]) -> dict[str, Any] | None:
        """Check the folder and create it; return the saved training state when resuming one.

        Raises:
            RetrofitError: no parent folder, a file in the way, a run already there (without
                ``resume``), or a saved run of another model, with other settings, or damaged (its
                weights are checked against ``model``).
        """
        if self.path is None:
            return None
        out, state = self.path, self.path / STATE_FILE
        if not out.parent.is_dir():
            raise RetrofitError(f"output folder {out.parent} does not exist; create it first")
        if out.exists() and not out.is_dir():
            raise RetrofitError(f"output {out} is a file; give a folder for the fine-tuning run")
        saved = None
        if resume and state.is_file():
            saved = load_state(state)
            _check_resumable(saved, state, meta, settings)
            check_model(saved, model, state)
        elif resume:
            if self.env.main:
                warnings.warn(f"nothing to resume in {out}; starting at epoch 1", RetrofitWarning, stacklevel=4)
        elif state.exists():
            raise RetrofitError(f"{out} already holds a fine-tuning run; pass --resume (resume=True) to "
                                f"continue it, or delete it, or choose another output folder")
        if self.env.main:
            out.mkdir(exist_ok=True)
        self.env.barrier()
        return saved

    def save_best(self, model: nn.Module) -> None:
        if self.writes:
            from ..checkpoint import save

            save(model, self.path / BEST_FILE)

    def commit_epoch(self, model: nn.Module, state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """After an epoch: last model, then the training state, then the metrics (every rank waits)."""
        if self.writes:
            from ..checkpoint import save

            save(model, self.path / LAST_FILE)
            save_state(self.path / STATE_FILE, state)
            self.write_metrics(rows)
        self.env.barrier()

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not self.writes:
            return
        path = self.path / METRICS_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, path)
        except OSError as err:
            raise RetrofitError(f"cannot write {path}: {err.strerror or err}; the checkpoints are kept, "
                                f"free space and rerun with --resume") from None
        finally:
            tmp.unlink(missing_ok=True)

    def restore_best(self, model: nn.Module) -> None:
        """Load ``best.safetensors`` into ``model`` (checked first), if the run has one."""
        if self.path is not None and (self.path / BEST_FILE).is_file():
            from ..checkpoint import load_into

            load_into(model, self.path / BEST_FILE)


def _check_resumable(saved: dict[str, Any], path: Path, meta: dict[str, str], settings: dict[str, Any]) -> None:
    theirs = saved.get("meta", {})
    for key, what in (("architecture", "architecture"), ("model_kwargs", "model arguments"),
                      ("recipe", "recipe"), ("input_size", "input size")):
        if meta.get(key) != theirs.get(key):
            raise RetrofitError(f"{path} is from another model ({what} {theirs.get(key)!r}, this one "
                                f"{meta.get(key)!r}); choose another output folder or drop --resume")
    then = saved.get("settings", {})
    changed = [k for k in settings if k in then and then[k] != settings[k]]
    if changed:
        k = changed[0]
        raise RetrofitError(f"{path} was started with {k} = {then[k]!r}, now {settings[k]!r}; resume with the "
                            f"same settings (or choose another output folder)")
