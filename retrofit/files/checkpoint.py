"""Save and load retrofitted models: safetensors weights plus the recipe and model name as metadata.

:func:`save` writes a full model (every tensor, and the metadata of :mod:`retrofit.files.header`) or an
*adapter* (only the blocks and what else changed, on a base model: :mod:`retrofit.files.adapter`), and
optionally its model card (:mod:`retrofit.files.card`). :func:`load` rebuilds the plain model, retrofits
it with the same recipe and loads the weights (:mod:`retrofit.files.full`), or rebuilds an adapter on its
base. Files are written to a temporary name and renamed (:mod:`retrofit.files.atomic`), so a crash or a
full disk never leaves a half-written file at the destination; every metadata value and every
tensor's name, dtype and shape is checked before anything of a file is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn

from ..errors import RetrofitError
from .adapter import adapter_tensors, load_adapter
from .atomic import atomic_write, check_writable
from .canonical import sort_metadata
from .card import write_card
from .full import load_full
from .header import metadata, read_header


def save(model: nn.Module, path: str | Path, *, adapter: bool = False, base: Any = None,
         card: bool = False) -> Path:
    """Write a retrofitted ``model`` (from :func:`retrofit.add_se`) to ``path`` (``.safetensors``).

    Args:
        model: a retrofitted model.
        path: the file to write (missing folders above it are created, as by ``mkdir -p``).
        adapter: write only the inserted blocks, the base tensors that differ from the base model and a
            new head, with a hash of the base weights the rest is taken from (see
            :mod:`retrofit.files.adapter`); :func:`load` with ``base=`` rebuilds the full model.
        base: for an adapter, the base model to compare with (an ``nn.Module`` or a weight file);
            default: the base weights recorded when the model was loaded or first fine-tuned, else its
            current weights.
        card: also write a model card, ``<name>.README.md`` next to the file (:mod:`retrofit.files.card`).

    Returns:
        ``path``.

    Raises:
        :exc:`~retrofit.files.atomic.WriteError`: the write failed (a full disk...); the previous file at
            ``path`` is kept.
    """
    path = Path(path).expanduser()
    check_writable(path)
    if adapter:
        tensors, meta = adapter_tensors(model, base)
        with atomic_write(path) as tmp:  # a full disk: WriteError (safetensors says "os error 28")
            _save_file(tensors, tmp, meta)
            sort_metadata(tmp)  # equal adapters, equal bytes
    else:
        meta = metadata(model)
        with atomic_write(path) as tmp:
            save_model(model, str(tmp), metadata=meta)
            sort_metadata(tmp)  # equal models, equal bytes (safetensors orders the metadata at random)
    if card:
        write_card(path, model)
    return path


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, meta: dict[str, str]) -> None:
    save_file(tensors, str(tmp), metadata=meta)


def load(path: str | Path, model: nn.Module | None = None, *, base: Any = None, force: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save`.

    Args:
        path: the ``.safetensors`` file (a full model, or an adapter).
        model: the plain (not retrofitted) network to rebuild on; needed only for models that are not
            timm models (their architecture cannot be rebuilt by name).
        base: for an adapter, the base model it was made on: a weight file (``.safetensors``,
            ``.pth``..., plain or saved by retrofit) or an ``nn.Module`` holding the weights (not
            changed; a copy is used). Its weights must hash to the adapter's ``base_sha256``.
        force: rebuild an adapter on a base whose hash differs (a warning instead of an error).

    Raises:
        RetrofitError: a missing, damaged or tampered file (wrong metadata types, metadata keys or
            model arguments retrofit does not write, tensors whose names, dtypes or shapes do not fit
            the rebuilt model), or the wrong base.
    """
    header = read_header(path)
    if header.adapter:
        if model is not None:
            raise RetrofitError(f"{header.path} is an adapter: pass the base network with its weights as "
                                f"base=..., not model=")
        return load_adapter(header, base, force=force)
    if base is not None:
        raise RetrofitError(f"{header.path} is a full model, not an adapter: load it without a base")
    return load_full(header, model)


