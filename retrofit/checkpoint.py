"""Save and load retrofitted models: safetensors weights plus the recipe and model name as metadata.

A file holds everything needed to rebuild the model: the timm architecture (and the constructor
arguments that change shapes: ``num_classes``, ``in_chans``), the recipe and the input size used to
trace it. :func:`load` rebuilds the plain model, retrofits it with the same recipe and loads the
weights with ``strict=True``. Files are written to a temporary name and renamed, so a crash or a full
disk never leaves a half-written file at the destination.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_write
from .errors import RetrofitError
from .recipe import Recipe

FORMAT = "retrofit/1"


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a retrofitted ``model`` (from :func:`retrofit.add_se`) to ``path`` (``.safetensors``).

    Raises:
        WriteError: the write failed (a full disk...); the previous file at ``path`` is kept.
    """
    from safetensors.torch import save_model

    meta = metadata(model)
    path = Path(path).expanduser()
    check_writable(path)
    with atomic_write(path) as tmp:  # a full disk: WriteError (safetensors says "os error 28")
        save_model(model, str(tmp), metadata=meta)
    return path


def metadata(model: nn.Module) -> dict[str, str]:
    """What a file needs to rebuild ``model`` besides its weights: architecture, constructor arguments,
    recipe, input size (all strings, as safetensors metadata). Training checkpoints store it too."""
    info = getattr(model, "_retrofit", None)
    if info is None:
        raise RetrofitError("this model has no SE blocks from retrofit; call retrofit.add_se first")
    return {
        "format": FORMAT,
        "architecture": info.architecture or "",
        "model_kwargs": json.dumps(_model_kwargs(model, info.input_size)),
        "recipe": json.dumps(info.recipe.to_dict()),
        "input_size": json.dumps(list(info.input_size)),
        "blocks": str(len(info.blocks)),
    }


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`.

    Args:
        path: the ``.safetensors`` file.
        model: the plain (not retrofitted) network to rebuild on; needed only for models that are not
            timm models (their architecture cannot be rebuilt by name).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    from .insert import add_se
    from .models import describe_mismatch

    path = Path(path).expanduser()
    if not path.is_file():
        raise RetrofitError(f"{path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise RetrofitError(f"cannot read {path}: not a complete safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise RetrofitError(f"{path} is not a retrofit file (no '{FORMAT}' metadata); for plain weights "
                            f"use `retrofit add-se MODEL --checkpoint {path.name}`")
    try:
        recipe = Recipe.from_dict(json.loads(meta["recipe"]), origin=f"recipe stored in {path.name}")
        input_size = tuple(json.loads(meta["input_size"]))
        kwargs = json.loads(meta.get("model_kwargs", "{}"))
    except (KeyError, json.JSONDecodeError) as err:
        raise RetrofitError(f"{path}: damaged retrofit metadata ({err})") from None
    if model is None:
        if not meta.get("architecture"):
            raise RetrofitError(f"{path} holds a model that is not from timm: pass the plain network, "
                                f"retrofit.load(path, model=MyNet())")
        from .models import create_model

        model = create_model(meta["architecture"], **kwargs)
    model = add_se(model, recipe, inplace=True, input_size=input_size)
    try:
        load_model(model, str(path), strict=True)
    except (RuntimeError, SafetensorError) as err:
        raise RetrofitError(f"weights in {path} do not fit the rebuilt model: {describe_mismatch(err)}") from None
    return model


def check_writable(path: Path) -> None:
    """Fail early (before any work) when ``path`` cannot be written."""
    if path.is_dir():
        raise RetrofitError(f"output {path} is a folder; give a file name such as {path / 'model.safetensors'}")
    if not path.parent.is_dir():
        raise RetrofitError(f"output folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise RetrofitError(f"output folder {path.parent} is not writable")


def _model_kwargs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    if input_size and input_size[0] != 3:
        kwargs["in_chans"] = input_size[0]
    return kwargs
