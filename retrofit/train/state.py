"""Training checkpoints: everything ``--resume`` needs, in one file written atomically.

One file (``train_state.pt``), not several, so a kill can never leave a model from one epoch next to
an optimizer from another. It holds the model's state dict, the retrofit metadata that rebuilds it
(:func:`retrofit.files.header.metadata`: architecture, recipe, input size), the optimizer and scheduler
states, the epoch, the RNG states, the metrics so far and the settings that must not change on resume.
It is written with ``torch.save`` to a temporary name and renamed (``os.replace`` is atomic), and read
with ``torch.load(weights_only=True)``: no pickled code runs. What it reads is checked before use
(:func:`load_state`, :func:`restore_training`): an edited or foreign file is one ``error:`` line.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RetrofitError, excerpt, first_line
from ..files.atomic import RecordingFile, atomic_write
from ..files.tensors import check_tensors, dtype_name

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
    """Read a file written by :func:`save_state`; a damaged, foreign or edited file is one clear error.

    Every entry the fine-tuning code reads is checked here, so it can trust the result: the types of
    ``epoch``, ``phase`` (and that they agree with the saved settings), ``meta``, ``settings``, ``rows``
    and ``best`` (the metrics so far), ``rng``, the structure of ``model`` (names to tensors; checked
    against the live model by :func:`check_model`), ``optimizer`` and ``scheduler`` (checked against the
    live objects by :func:`restore_training`), and when present the model EMA (``ema``: its weights and
    step count) and phase 2's frozen teacher (``teacher``), both checked against the live model too.
    Keys this version does not read are ignored (they are data; nothing in the file can run code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, unpickling refused, I/O: all mean "not a usable state"
        raise RetrofitError(
            f"cannot read {excerpt(path)}: not a complete training checkpoint ({first_line(err)}); "
            f"delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RetrofitError(f"{excerpt(path)} is not a retrofit training checkpoint; delete it to start over")

    bad = functools.partial(_damaged, path)
    for key, kind in (
        ("meta", dict),
        ("settings", dict),
        ("model", dict),
        ("optimizer", dict),
        ("scheduler", dict),
        ("epoch", int),
        ("phase", int),
        ("rng", dict),
        ("rows", list),
        ("best", dict),
    ):
        if key not in state:
            raise bad(f"no '{key}' entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise bad(f"'{key}' is a {type(state[key]).__name__}, not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in state["meta"].items()):
        raise bad("'meta' must map names to text")
    settings = state["settings"]
    if not all(isinstance(k, str) and _scalar(v) for k, v in settings.items()):
        raise bad("'settings' must map names to numbers, text or booleans")
    epoch, phase = state["epoch"], state["phase"]
    epochs, phase2 = settings.get("epochs"), settings.get("phase2_epochs", 0)
    if not (isinstance(epochs, int) and isinstance(phase2, int)) or not 1 <= epoch <= epochs + phase2:
        raise bad(f"epoch {epoch} is not within the run's {excerpt(epochs)} + {excerpt(phase2)} epochs")
    if phase != (1 if epoch <= epochs else 2):
        raise bad(f"phase {phase} does not match epoch {epoch} of {epochs} phase-1 epochs")
    _check_rows(state["rows"], state["best"], bad)
    _check_rng(state["rng"], bad)
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise bad("'optimizer' has no 'state' mapping and 'param_groups' list")
    for key, weights in _weight_entries(state, bad):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
            raise bad(f"'{key}' must map names to tensors")
    return state


def _weight_entries(state: dict[str, Any], bad) -> list[tuple[str, dict]]:
    """The state's model weights, and its EMA's and teacher's when it has them (their forms checked)."""
    entries = [("model", state["model"])]
    ema = state.get("ema")
    if ema is not None:
        if not isinstance(ema, dict) or not isinstance(ema.get("module"), dict):
            raise bad("'ema' is not a mapping with the averaged weights under 'module'")
        steps = ema.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise bad("'ema' has no whole number of 'steps'")
        if "rounding" in ema and not isinstance(ema["rounding"], torch.Tensor):
            raise bad("'ema' has a 'rounding' state that is not a tensor")
        entries.append(("ema", ema["module"]))
    teacher = state.get("teacher")
    if teacher is not None:
        if not isinstance(teacher, dict):
            raise bad("'teacher' is not a mapping of names to tensors")
        entries.append(("teacher", teacher))
    return entries


def _damaged(path: Path, what: str) -> RetrofitError:
    return RetrofitError(f"{excerpt(path)} is damaged or was edited: {what}; delete it to start over")


def check_model(saved: dict[str, Any], model: nn.Module, path: Path) -> None:
    """The saved weights (from :func:`load_state`), the EMA's and the teacher's too, against ``model``:
    every name, dtype and shape (the EMA and the teacher are copies of the model)."""
    for key, weights in _weight_entries(saved, functools.partial(_damaged, path)):
        try:
            check_tensors(model, {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in weights.items()}, path)
        except RetrofitError as err:
            if key == "model":
                raise
            raise _damaged(path, f"'{key}': {err}") from None


ROW_FIELDS = {
    "name": (str,),
    "phase": (int,),
    "val_loss": (int, float),
    "top1": (int, float),
    "top5": (int, float),
    "lr": (int, float, type(None)),
    "train_loss": (int, float, type(None)),
}


def _check_rows(rows: list, best: dict, bad) -> None:
    """The metrics so far: what the results table and metrics.jsonl are made of."""
    for row in rows + [best]:
        if not isinstance(row, dict) or not all(isinstance(k, str) and _scalar(v) for k, v in row.items()):
            raise bad("a metrics row is not a mapping of names to numbers or text")
        for key, kinds in ROW_FIELDS.items():
            if not isinstance(row.get(key), kinds) or isinstance(row.get(key), bool):
                raise bad(f"metrics row {excerpt(row.get('name'))} has no valid '{key}'")
    names = [r["name"] for r in rows]
    if names[:2] != ["original", "step 0"] or best["name"] not in names:
        raise bad("the metrics rows do not start with 'original' and 'step 0', or 'best' is not among them")


def _check_rng(rng: dict, bad) -> None:
    """The RNG states :func:`set_rng_state` restores: refused before they reach torch or random."""
    expected = torch.get_rng_state()
    value = rng.get("torch")
    if not isinstance(value, torch.Tensor) or value.dtype != expected.dtype or value.shape != expected.shape:
        raise bad("'rng' has no valid torch generator state")
    try:
        random.Random().setstate(rng.get("python"))  # a scratch generator: validates without side effects
    except (TypeError, ValueError, OverflowError):
        raise bad("'rng' has no valid Python random state") from None
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda
    ):
        raise bad("'rng' has an invalid CUDA generator state")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


# optimizer states that have their parameter's shape (torch's and timm's Adam/AdamW/SGD/Lamb...)
PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def restore_training(optimizer, scheduler, saved: dict[str, Any], path: Path) -> None:
    """Load the optimizer and scheduler states of ``saved`` (from :func:`load_state`) after checking
    them against the live objects: the same parameter groups, settings and scheduler fields the live
    ones have (a subset: one an older version did not save keeps its default), each value of its kind,
    per-parameter states of the parameter's shape."""
    bad = functools.partial(_damaged, path)
    mine, theirs = optimizer.state_dict(), saved["optimizer"]
    groups = theirs["param_groups"]
    if len(groups) != len(mine["param_groups"]):
        raise bad(f"the optimizer has {len(groups)} parameter groups, this run {len(mine['param_groups'])}")
    for have, got in zip(mine["param_groups"], groups):  # a setting an older torch did not save: its default
        if not isinstance(got, dict) or not set(got) <= set(have) or got.get("params") != have["params"]:
            raise bad("the optimizer's parameter groups are not this run's")
        wrong = [k for k in got if k != "params" and not _same_kind(got[k], have[k])]
        if wrong:
            raise bad(f"optimizer setting '{wrong[0]}' is {excerpt(got[wrong[0]])}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, entry in theirs["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise bad("the optimizer state names a parameter this run does not have")
        for name, value in entry.items():
            if not (isinstance(value, torch.Tensor) or (_scalar(value) and value is not None)):
                raise bad(f"optimizer state '{name}' is a {type(value).__name__}")
            if name in PARAM_SHAPED and (not isinstance(value, torch.Tensor) or value.shape != params[index].shape):
                raise bad(f"optimizer state '{name}' does not have its parameter's shape")
    sched_mine, sched_theirs = scheduler.state_dict(), saved["scheduler"]
    if not set(sched_theirs) <= set(sched_mine):  # loading sets attributes: none but the scheduler's own
        raise bad("the scheduler state is not one of this run's scheduler")
    wrong = [k for k in sched_theirs if not _same_kind(sched_theirs[k], sched_mine[k])]
    if wrong:
        raise bad(f"scheduler field '{wrong[0]}' is {excerpt(sched_theirs[wrong[0]])}")
    try:
        optimizer.load_state_dict(theirs)
        scheduler.load_state_dict(sched_theirs)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
        raise bad(f"the optimizer or scheduler state does not load ({first_line(err)})") from None


def _same_kind(got: Any, have: Any) -> bool:
    """Values of one kind: numbers (None counts as an unset number), text, booleans, tensors of one
    shape, and sequences or mappings of those, element by element."""
    number = (int, float)
    if got is None or have is None:
        other = have if got is None else got
        return other is None or (isinstance(other, number) and not isinstance(other, bool))
    if isinstance(have, bool) or isinstance(got, bool):
        return type(got) is type(have)
    if isinstance(have, number):
        return isinstance(got, number)
    if isinstance(have, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == have.shape
    if isinstance(have, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(have) and all(map(_same_kind, got, have))
    if isinstance(have, dict):
        return isinstance(got, dict) and set(got) == set(have) and all(_same_kind(got[k], have[k]) for k in have)
    return type(got) is type(have)
