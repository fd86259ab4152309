"""Save and load retrofitted models as one file: safetensors weights plus the recipe and model name as metadata.

The folder in the Hugging Face shape (:func:`retrofit.save_pretrained`, :mod:`retrofit.files.pretrained`) is
what to share; one file is what a fine-tune's run folder keeps (``last.safetensors``, ``best.safetensors``)
and what earlier versions wrote, and both stay. :func:`save` writes a full model (every tensor, and the
metadata of :mod:`retrofit.files.header`) or an *adapter* (only the blocks and what else changed, on a base
model: :mod:`retrofit.files.adapter`), and optionally its model card (:mod:`retrofit.files.card`).
:func:`load` reads either: a file (rebuilds the plain model, retrofits it with the same recipe and loads
the weights, :mod:`retrofit.files.full`, or rebuilds an adapter on its base) or a folder
(:func:`retrofit.from_pretrained`). Files are written to a temporary name and renamed
(:mod:`retrofit.files.atomic`), so a crash or a full disk never leaves a half-written file at the
destination; every metadata value and every tensor's name, dtype and shape is checked before anything of
a file is loaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn

from ..errors import RetrofitError
from .adapter import adapter_tensors
from .atomic import atomic_write, check_writable
from .canonical import sort_metadata
from .card import card_path, write_card
from .folder import ADAPTER_FILE, CARD_FILE, CONFIG_FILE, MODEL_FILE
from .header import metadata, read_header
from .pretrained import from_pretrained, rebuild_from, save_pretrained


def save(model: nn.Module, path: str | Path, *, adapter: bool = False, base: Any = None, card: bool = False) -> Path:
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


def load(path: str | Path, base: Any = None, *, force: bool = False, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (one file) or :func:`retrofit.save_pretrained` (a folder).

    Args:
        path: the ``.safetensors`` file (a full model, or an adapter), or a folder of
            :func:`retrofit.save_pretrained` (as :func:`retrofit.from_pretrained`).
        base: the network to rebuild on. For an adapter, the base it was made on: a weight file
            (``.safetensors``, ``.pth``..., plain or saved by retrofit, or a retrofit folder) or an
            ``nn.Module`` holding the weights; its weights must hash to the adapter's ``base_sha256``. For a
            full model of a network that is not from timm, the plain network (its architecture cannot be
            rebuilt by name). An ``nn.Module`` is copied, never changed.
        force: rebuild an adapter on a base whose hash differs (a warning instead of an error).
        model: deprecated, ``base`` (the two names of earlier versions, one for each file kind, are one).

    Raises:
        RetrofitError: a missing, damaged or tampered file (wrong metadata types, metadata keys or
            model arguments retrofit does not write, tensors whose names, dtypes or shapes do not fit
            the rebuilt model), or the wrong base.
    """
    if model is not None:
        if base is not None:
            raise RetrofitError("give the network to rebuild on once, as base= (model= is its old name)")
        warnings.warn(
            "retrofit.load(path, model=net) is deprecated: pass base=net (one name for the network to "
            "rebuild on, a plain network or an adapter's base)",
            DeprecationWarning,
            stacklevel=2,
        )
        base = model
    if Path(path).expanduser().is_dir():
        return from_pretrained(path, base, force=force)
    return rebuild_from(read_header(path), base, force=force)


def outputs_of(output: str | Path) -> list[Path]:
    """The files :func:`save_output` writes for ``output``: a ``.safetensors`` file and its card, or a
    folder's files (:func:`retrofit.save_pretrained`)."""
    output = Path(output).expanduser()
    if output.suffix == ".safetensors":
        return [output, card_path(output)]
    return [output / name for name in (CONFIG_FILE, MODEL_FILE, ADAPTER_FILE, CARD_FILE)]


def save_output(model: nn.Module, output: str | Path, *, adapter: bool = False, **card: Any) -> tuple[Path, Path]:
    """Save ``model`` where a command's ``--output`` says: a path ending in ``.safetensors`` is one file (:func:`save`)
    with its card beside it, any other a folder (:func:`retrofit.save_pretrained`); ``card``: the card's tables
    and lines (``overhead``, ``result``, ``command``, ``base_name``). Returns the weights file and the card."""
    output = Path(output).expanduser()
    if output.suffix == ".safetensors":
        save(model, output, adapter=adapter)
        return output, write_card(output, model, **card)
    folder = save_pretrained(model, output, adapter=adapter, **card)
    return folder / (ADAPTER_FILE if adapter else MODEL_FILE), folder / CARD_FILE
