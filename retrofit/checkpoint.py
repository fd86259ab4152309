"""Save and load retrofitted models: safetensors weights plus the recipe and model name as metadata.

A file holds everything needed to rebuild the model: the timm architecture (and the constructor
arguments that change shapes: ``num_classes``, ``in_chans``), the recipe and the input size used to
trace it. :func:`load` rebuilds the plain model, retrofits it with the same recipe and loads the
weights. An *adapter* (``save(..., adapter=True)``, :mod:`retrofit.adapter`) holds only the blocks and
what else changed, and is rebuilt on its base model. Files are written to a temporary name and
renamed, so a crash or a full disk never leaves a half-written file at the destination.

A file is data, never instructions: before anything is built from it, every metadata value is
checked for its type and against an allow-list (only the keys retrofit writes; constructor arguments
only ``num_classes`` and ``in_chans``, so a file cannot ask timm for a download or another file), and
every tensor's name, dtype and shape (read from the header) against the rebuilt model. A file that
fails any check is refused with one line naming the problem; nothing of it is loaded.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .atomic import atomic_write
from .errors import RetrofitError, first_line
from .recipe import Recipe

FORMAT = "retrofit/1"
ADAPTER_FORMAT = "retrofit-adapter/1"
# the metadata keys retrofit writes; any other key is refused (see read_header)
KEYS = ("format", "architecture", "model_kwargs", "recipe", "input_size", "blocks")
ADAPTER_KEYS = KEYS + ("base_sha256", "base_tensors", "base_name")
# constructor arguments a file may pass to timm.create_model, with their smallest value: nothing that
# names a file, a url or a download (pretrained, pretrained_cfg_overlay, checkpoint_path...)
MODEL_KWARGS = {"num_classes": 0, "in_chans": 1}
# safetensors' names of the torch dtypes; a float tensor may be stored at another float precision (a
# model saved in half precision loads into float32), any other tensor must have its exact type
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
FLOAT_DTYPES = {name for dtype, name in DTYPE_NAMES.items() if dtype.is_floating_point}
EXACT_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items() if not dtype.is_floating_point}


def save(model: nn.Module, path: str | Path, *, adapter: bool = False, base: Any = None,
         card: bool = False) -> Path:
    """Write a retrofitted ``model`` (from :func:`retrofit.add_se`) to ``path`` (``.safetensors``).

    Args:
        model: a retrofitted model.
        path: the file to write (its folder must exist).
        adapter: write only the inserted blocks, the base tensors that differ from the base model and a
            new head, with a hash of the base weights the rest is taken from (see
            :mod:`retrofit.adapter`); :func:`load` with ``base=`` rebuilds the full model.
        base: for an adapter, the base model to compare with (an ``nn.Module`` or a weight file);
            default: the base weights recorded when the model was loaded or first fine-tuned, else its
            current weights.
        card: also write a model card, ``<name>.README.md`` next to the file (:mod:`retrofit.card`).

    Returns:
        ``path``.

    Raises:
        WriteError: the write failed (a full disk...); the previous file at ``path`` is kept.
    """
    path = Path(path).expanduser()
    check_writable(path)
    if adapter:
        from .adapter import adapter_tensors

        tensors, meta = adapter_tensors(model, base)
        with atomic_write(path) as tmp:  # a full disk: WriteError (safetensors says "os error 28")
            _save_file(tensors, tmp, meta)
    else:
        from safetensors.torch import save_model

        meta = metadata(model)
        with atomic_write(path) as tmp:
            save_model(model, str(tmp), metadata=meta)
    if card:
        from .card import write_card

        write_card(path, model)
    return path


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata=meta)


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


@dataclass
class Header:
    """The checked metadata of a retrofit file and the name, dtype and shape of each of its tensors."""

    path: Path
    format: str
    architecture: str
    model_kwargs: dict[str, int]
    recipe: Recipe
    input_size: tuple[int, ...]
    blocks: int
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    base_sha256: str = ""
    base_tensors: int = 0
    base_name: str = ""

    @property
    def adapter(self) -> bool:
        return self.format == ADAPTER_FORMAT


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
        from .adapter import load_adapter

        if model is not None:
            raise RetrofitError(f"{header.path} is an adapter: pass the base network with its weights as "
                                f"base=..., not model=")
        return load_adapter(header, base, force=force)
    if base is not None:
        raise RetrofitError(f"{header.path} is a full model, not an adapter: load it without a base")
    model = rebuild(header, model)
    load_into(model, header.path, header=header)
    return model


def rebuild(header: Header, model: nn.Module | None = None) -> nn.Module:
    """The file's architecture (or ``model``), retrofitted with the file's recipe: no weights loaded yet."""
    from .insert import add_se

    if model is None:
        if not header.architecture:
            raise RetrofitError(f"{header.path} holds a model that is not from timm: pass the plain network, "
                                f"retrofit.load(path, model=MyNet())")
        from .models import create_model

        model = create_model(header.architecture, **header.model_kwargs)
    model = add_se(model, header.recipe, inplace=True, input_size=header.input_size)
    if len(model._retrofit.blocks) != header.blocks:
        raise RetrofitError(f"{header.path} says {header.blocks} blocks but its recipe gives "
                            f"{len(model._retrofit.blocks)} on this model; is it the network it was saved from?")
    return model


def read_header(path: str | Path) -> Header:
    """Read and check the metadata and tensor list of a retrofit file (no tensor data is read)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RetrofitError(f"{path} not found")
    meta, tensors = _read_safetensors_header(path)
    if meta.get("format") not in (FORMAT, ADAPTER_FORMAT):
        raise RetrofitError(f"{path} is not a retrofit file (no '{FORMAT}' metadata); for plain weights "
                            f"use `retrofit add-se MODEL --checkpoint {path.name}`")
    return Header(path=path, format=meta["format"], tensors=tensors, **parse_metadata(meta, str(path)))


def safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The metadata and each tensor's (dtype name, shape) of a safetensors file: its header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                                    for k in f.keys()}


def _read_safetensors_header(path: Path):
    from safetensors import SafetensorError

    try:
        return safetensors_header(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise RetrofitError(f"cannot read {path}: not a complete safetensors file ({first_line(err)})") from None


def parse_metadata(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The values of retrofit metadata, each checked for its type; anything else is refused.

    Returns the fields of :class:`Header` (``architecture``, ``model_kwargs``, ``recipe``...)."""
    def bad(key: str, why: str) -> RetrofitError:
        return RetrofitError(f"{where}: metadata '{key}' {why}; the file was not written by retrofit or was "
                             f"edited, rebuild it from its source")

    allowed = ADAPTER_KEYS if meta.get("format") == ADAPTER_FORMAT else KEYS
    for key in meta:
        if key not in allowed:
            raise bad(key, f"is not one retrofit writes ({', '.join(allowed)})")
    for key in allowed:
        if key not in meta:
            raise bad(key, "is missing")
        if not isinstance(meta[key], str):
            raise bad(key, "is not text")

    def json_value(key: str, kind: type, what: str):
        try:
            value = json.loads(meta[key])
        except json.JSONDecodeError:
            raise bad(key, "is not valid JSON") from None
        if not isinstance(value, kind):
            raise bad(key, f"must be {what}, got {type(value).__name__}")
        return value

    out: dict[str, Any] = {}
    arch = meta["architecture"]
    if arch:
        import timm

        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", arch) or not timm.is_model(arch):
            raise bad("architecture", f"{arch[:60]!r} is not a timm model name")
    out["architecture"] = arch
    kwargs = json_value("model_kwargs", dict, "a mapping")
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            raise bad("model_kwargs", f"names {key!r}: only {', '.join(MODEL_KWARGS)} are allowed (a file may "
                                      f"not ask for downloads or other files)")
        if not _is_int(value) or value < MODEL_KWARGS[key]:
            raise bad("model_kwargs", f"gives {key} = {value!r}, not a whole number >= {MODEL_KWARGS[key]}")
    out["model_kwargs"] = kwargs
    size = json_value("input_size", list, "a list [C, H, W]")
    if len(size) != 3 or not all(_is_int(v) and v >= 1 for v in size):
        raise bad("input_size", f"must be three positive whole numbers [C, H, W], got {size!r}"[:200])
    if kwargs.get("in_chans", 3) != size[0]:
        raise bad("input_size", f"has {size[0]} channels but the model {kwargs.get('in_chans', 3)}")
    out["input_size"] = tuple(size)
    recipe = json_value("recipe", dict, "a mapping of recipe fields")
    try:
        out["recipe"] = Recipe.from_dict(recipe, origin=f"recipe stored in {where}")
    except RetrofitError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise bad("recipe", f"has a bad value ({first_line(err)})") from None
    if not meta["blocks"].isdigit() or int(meta["blocks"]) < 1:
        raise bad("blocks", f"must be a positive whole number, got {meta['blocks'][:40]!r}")
    out["blocks"] = int(meta["blocks"])
    if meta.get("format") == ADAPTER_FORMAT:
        if not re.fullmatch(r"[0-9a-f]{64}", meta["base_sha256"]):
            raise bad("base_sha256", "must be 64 hexadecimal digits")
        if not meta["base_tensors"].isdigit():
            raise bad("base_tensors", "must be a whole number")
        if len(meta["base_name"]) > 200 or not meta["base_name"].isprintable():
            raise bad("base_name", "must be one printable line of at most 200 characters")
        out.update(base_sha256=meta["base_sha256"], base_tensors=int(meta["base_tensors"]),
                   base_name=meta["base_name"])
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_into(model: nn.Module, path: str | Path, *, header: Header | None = None,
              required: Iterable[str] | None = None) -> None:
    """Load the tensors of a safetensors file into ``model`` after checking each one's name, dtype and
    shape against ``model.state_dict()``: no unknown name, no missing one (of ``required``: default every
    key of the model; a key that shares its storage with a key in the file counts as present)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    tensors = header.tensors if header is not None else _read_safetensors_header(path)[1]
    check_tensors(model, tensors, path, required)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RetrofitError(f"cannot read {path}: {first_line(err)}") from None
    model.load_state_dict(state, strict=False)  # every name, dtype and shape was checked above


def check_tensors(model: nn.Module, tensors: Mapping[str, tuple[str, tuple[int, ...]]], where: Path | str,
                  required: Iterable[str] | None = None) -> None:
    """Refuse (one line: counts and an example of each problem) tensors that do not fit ``model``."""
    state = model.state_dict()
    unexpected = [k for k in tensors if k not in state]
    aliases = alias_groups(state)
    required = state.keys() if required is None else required
    missing = [k for k in required if not any(a in tensors for a in aliases.get(k, (k,)))]
    shapes, dtypes = [], []
    for key, (dtype, shape) in tensors.items():
        have = state.get(key)
        if have is None:
            continue
        if tuple(have.shape) != tuple(shape):
            shapes.append(f"{key}: {list(shape)} in the file, {list(have.shape)} in the model")
        elif not dtype_fits(dtype, have.dtype):
            dtypes.append(f"{key}: {dtype} in the file, {str(have.dtype).replace('torch.', '')} in the model")
    problems = []
    for label, found in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes), ("dtype mismatches", dtypes)):
        if found:
            problems.append(f"{len(found)} {label} (e.g. {found[0]})")
    if problems:
        raise RetrofitError(f"weights in {where} do not fit the rebuilt model: {', '.join(problems)}")


def dtype_fits(stored: str, wanted: torch.dtype) -> bool:
    """A float tensor from any float precision; an integer or bool tensor only from its own type."""
    if wanted.is_floating_point:
        return stored in FLOAT_DTYPES
    return EXACT_DTYPES.get(stored) == wanted


def alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Keys that share one storage (tied weights): safetensors writes one name of each group."""
    groups: dict[tuple, list[str]] = {}
    for key, value in state.items():
        if value.device.type != "meta" and value.numel():
            groups.setdefault((value.device, value.untyped_storage().data_ptr(), value.shape), []).append(key)
    return {k: tuple(g) for g in groups.values() if len(g) > 1 for k in g}


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
