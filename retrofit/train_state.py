"""Training checkpoints: everything ``--resume`` needs, in one file written atomically.

One file (``train_state.pt``), not several, so a kill can never leave a model from one epoch next to
an optimizer from another. It holds the model's state dict, the retrofit metadata that rebuilds it
(:func:`retrofit.checkpoint.metadata`: architecture, recipe, input size), the optimizer and scheduler
states, the epoch, the RNG states, the metrics so far and the settings that must not change on resume.
It is written with ``torch.save`` to a temporary name and renamed (``os.replace`` is atomic), and read
with ``torch.load(weights_only=True)``: no pickled code runs.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from .atomic import RecordingFile, atomic_write
from .errors import RetrofitError, first_line

FORMAT = "retrofit-train/1"
STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically; on failure the previous file is untouched.

    Raises:
        WriteError: the write failed (a full disk: torch's writer reports it as a ``RuntimeError``,
            the ``OSError`` it met is what is said).
    """
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        sink = RecordingFile(f)
        try:
            torch.save({"format": FORMAT, **state}, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave an empty file


def load_state(path: Path) -> dict[str, Any]:
    """Read a file written by :func:`save_state`; a damaged or foreign file is one clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, unpickling refused, I/O: all mean "not a usable state"
        raise RetrofitError(f"cannot read {path}: not a complete training checkpoint ({first_line(err)}); "
                            f"delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RetrofitError(f"{path} is not a retrofit training checkpoint; delete it to start over")
    return state
