"""The study, created or resumed, and the identity that makes a resumed one the same search.

The study's user attr ``retrofit:identity`` holds, per part, a value and its hash: ``model`` (name, a hash
of its weights, classes, input size), ``data`` (classes; per split the image count and a hash of the sorted
(path, size) pairs), ``space`` and ``settings`` (the fine-tune's options, epochs, search seed, limits,
pruner). A resumed study whose identity differs is one error naming the part: its trials were measured on
something else. ``create_study(load_if_exists=True)`` also loads a study of the other direction without a
word, so the direction is checked here too.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import optuna
import torch
from optuna.study import StudyDirection

from ...errors import RetrofitError, excerpt
from ...graph.model import model_name
from ...train.data import ImageFolderData
from .sampling import init_pruner
from .space import canonical

IDENTITY = "retrofit:identity"


def model_identity(model: torch.nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(
            tensor.detach().to("cpu").contiguous().numpy().tobytes()
            if tensor.dtype != torch.bfloat16
            else tensor.detach().to("cpu", torch.float32).numpy().tobytes()
        )
    return {
        "name": model_name(model),
        "weights": h.hexdigest()[:16],
        "input_size": list(input_size),
        "num_classes": getattr(model, "num_classes", None),
    }


def data_identity(data: ImageFolderData) -> dict[str, Any]:
    out: dict[str, Any] = {"classes": list(data.classes)}
    for split, dataset in (("train", data.train), ("val", data.val)):
        root = data.root / split
        pairs = sorted((os.path.relpath(path, root), os.path.getsize(path)) for path, _ in dataset.reader.samples)
        out[split] = {"images": len(pairs), "files": hashlib.sha256(canonical(pairs).encode()).hexdigest()[:16]}
    return out


def identity(**parts: dict[str, Any]) -> dict[str, Any]:
    return {
        part: {"value": value, "sha": hashlib.sha256(canonical(value).encode()).hexdigest()[:16]}
        for part, value in parts.items()
    }


def open_study(
    storage, name: str, where: str, sampler, pruner, ident: dict[str, Any], hints: dict[str, str] | None = None
):
    """The study ``name`` in ``storage`` (``where`` names it in messages): created, or resumed when its
    identity is ``ident``; one error otherwise (with ``hints[part]``, what may have made that part differ)."""
    try:  # an existing study is loaded first: creating one appends to the journal even when it exists
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
        )
    if study.direction != StudyDirection.MAXIMIZE:
        raise RetrofitError(
            f"study {excerpt(name)} in {excerpt(where, bare=True)} minimizes its value: it is not a "
            "retrofit tune; use another "
            f"--study or --output-dir"
        )
    stored = study.user_attrs.get(IDENTITY)
    if stored is None:  # a new study (or its creator died before this): ours; a second creator's write wins
        study.set_user_attr(IDENTITY, ident)
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(IDENTITY, ident)
    for part, mine in ident.items():
        theirs = stored.get(part, {})
        if theirs.get("sha") != mine["sha"]:
            hint = (hints or {}).get(part)
            raise RetrofitError(
                f"study {excerpt(name)} in {excerpt(where, bare=True)} was started with another {part} "
                f"({difference(theirs.get('value'), mine['value'])}{'; ' + hint if hint else ''}); "
                f"resume it with the same {part}, or use another --output-dir or --study"
            )
    init_pruner(study, pruner)
    return study


def difference(old: Any, new: Any, path: str = "") -> str:
    """Where two identity values first differ: ``train.images: 24, now 27``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            if old.get(key) != new.get(key):
                return difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    shown = [canonical(v) for v in (old, new)]
    shown = [s if len(s) <= 80 else s[:77] + "..." for s in shown]
    return f"{path or 'it'}: {shown[0]}, now {shown[1]}"
