"""Adapter files: what a retrofit added or changed, on top of a base model identified by its weights.

PEFT's ``save_pretrained`` idea for model surgery. An adapter (``retrofit.save(model, path,
adapter=True)``, ``--adapter`` on the command line) is a safetensors file that holds

* every tensor of the inserted blocks;
* every other tensor whose value differs from the base model's: a new classifier, and after phase 2 of
  fine-tuning the backbone weights that trained and the norm statistics that moved;
* the recipe, the timm architecture and constructor arguments, the input size (as a full file);
* ``base_sha256``: a sha256 over the base tensors it does *not* hold (each one's name, dtype, shape and
  bytes, in name order), ``base_tensors`` (their number) and ``base_name`` (what the base was, for
  messages only: nothing is ever opened by that name).

:func:`load_adapter` (``retrofit.load(path, base=...)``) builds the base, hashes the tensors the adapter
takes from it, refuses a base whose hash differs (unless forced), retrofits it by the recipe and loads
the adapter's tensors: the result is bitwise the model that was saved. Because the hash covers exactly
the tensors taken from the base, a base that differs only where the adapter has its own tensors (a
head of another size, say) is accepted, and any other difference is refused.

Which tensors differ is decided against the *recorded base* of the model: a per-tensor sha256 taken by
:func:`remember_base` when the model is first fine-tuned (:func:`retrofit.finetune`), loaded from an
adapter, or saved as one (then its current weights are the base), or computed from ``base=`` given to
:func:`retrofit.save`. A model whose base weights were changed before any of these (your own training
loop) gets that changed base's hash: its adapter is refused on the original base, never loaded wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RetrofitError, RetrofitWarning, excerpt
from ..graph.model import model_name
from ..inputs import regular_file
from ..surgery.info import BaseRecord, get_info, update_info
from ..surgery.strip import strip
from .folder import read_folder
from .full import load_full, rebuild
from .header import ADAPTER_FORMAT, FORMAT, Header, metadata, read_header
from .models import create_model
from .tensors import alias_groups, check_tensors, load_into, safetensors_header


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (any device; bf16 too)."""
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def base_hash(digests: Mapping[str, str]) -> str:
    """One sha256 over ``{name: tensor digest}``, in name order."""
    return hashlib.sha256("".join(f"{k}\t{digests[k]}\n" for k in sorted(digests)).encode()).hexdigest()


def block_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the inserted blocks."""
    info = get_info(model)
    if info is None:
        raise RetrofitError("this model has no SE blocks from retrofit; call retrofit.add_se first")
    prefixes = tuple(f"{b.path}." for b in info.blocks)
    return {k for k in model.state_dict() if k.startswith(prefixes)}


def head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the classifier (``model.get_classifier()``), if it has one."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(t) for t in [*head.parameters(), *head.buffers()]}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def remember_base(model: nn.Module, name: str = "", *, new: set[str] | frozenset = frozenset()) -> BaseRecord:
    """Record ``model``'s current weights outside its blocks as its base, unless one is recorded.

    Args:
        model: a retrofitted model.
        name: what the base is (``"resnet50, weights my_resnet50.safetensors"``), for messages and cards.
        new: keys that are not the base's (a classifier created anew): an adapter always holds them.
    """
    info = get_info(model)
    if info is not None and info.base is not None:
        return info.base
    skip = block_keys(model) | set(new)
    record = BaseRecord(
        {k: tensor_digest(v) for k, v in model.state_dict().items() if k not in skip}, name or _default_name(model)
    )
    update_info(model, base=record)
    return record


def adapter_tensors(model: nn.Module, base: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``model``'s adapter (see the module docstring)."""
    meta = metadata(model)
    if base is not None:
        plain, name = base_model(base, get_info(model).architecture or "", json.loads(meta["model_kwargs"]))
        record = BaseRecord({k: tensor_digest(v) for k, v in plain.state_dict().items()}, name)
    else:
        record = remember_base(model)
    state = model.state_dict()
    blocks = block_keys(model)
    relied = {}
    for key, value in state.items():
        if key not in blocks and key in record.digests:
            digest = tensor_digest(value)
            if digest == record.digests[key]:
                relied[key] = digest
    aliases = alias_groups(state)
    tensors = {}
    for key, value in state.items():
        group = aliases.get(key, (key,))
        if key in relied or any(a in tensors for a in group):  # tied tensors: one name, as save_model
            continue
        relied.pop(key, None)
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    meta.update(
        format=ADAPTER_FORMAT,
        base_sha256=base_hash(relied),
        base_tensors=str(len(relied)),
        base_name=_printable(record.name),
    )
    return tensors, meta


def load_adapter(header: Header, base: Any, *, force: bool = False) -> nn.Module:
    """Rebuild the full model of the adapter ``header`` describes on ``base`` (a weight file or an
    ``nn.Module``; see :func:`retrofit.load`)."""
    path = header.path
    if base is None:
        raise RetrofitError(
            f"{excerpt(path)} is an adapter ({len(header.tensors)} tensors: the blocks and what "
            "changed) "
            f"made on {excerpt(header.base_name or 'a base model', bare=True)}; give that base: "
            f"retrofit.load(path, base=WEIGHTS_OR_MODEL) or --base FILE"
        )
    plain, name = base_model(base, header.architecture, header.model_kwargs)
    record = BaseRecord({k: tensor_digest(v) for k, v in plain.state_dict().items()}, name)
    model = rebuild(header, plain)
    blocks = block_keys(model)
    check_tensors(model, header.tensors, path, required=blocks)
    state = model.state_dict()
    aliases = alias_groups(state)
    relied = {
        k: record.digests.get(k) or tensor_digest(v)
        for k, v in state.items()
        if not any(a in header.tensors for a in aliases.get(k, (k,)))
    }
    found = base_hash(relied)
    if found != header.base_sha256:
        text = (
            f"{excerpt(path)} was made on another base: {excerpt(header.base_name or 'its base', bare=True)} "
            "(sha256 "
            f"{header.base_sha256[:12]} over {header.base_tensors} tensors), the base given "
            f"({excerpt(name, bare=True)}) has "
            f"{found[:12]} over {len(relied)}"
        )
        if not force:
            raise RetrofitError(
                f"{text}; give the base it was made on, or --force (force=True) to rebuild it on this one anyway"
            )
        warnings.warn(RetrofitWarning(f"{text}; rebuilt on it anyway (forced)"), stacklevel=3)
    load_into(model, path, tensors=header.tensors, required=blocks)
    update_info(model, base=record)
    return model


def base_model(base: Any, architecture: str, model_kwargs: Mapping[str, int]) -> tuple[nn.Module, str]:
    """A plain (not retrofitted) copy of ``base`` with the head size of ``model_kwargs``, and its name.

    ``base``: an ``nn.Module`` (copied; a retrofitted one is stripped), a file saved by retrofit (loaded
    and stripped), or a plain weight file for the timm ``architecture`` (:func:`retrofit.files.models.create_model`).
    """
    if isinstance(base, nn.Module):
        plain = copy.deepcopy(base)
        name = _default_name(base)
    elif isinstance(base, (str, Path)):
        path = Path(base).expanduser()
        if not path.is_dir():  # a folder of retrofit.save_pretrained is read below
            path = regular_file(base, "base")  # a FIFO, a device, a loop: said as what it is
        name = path.name
        if path.is_dir():  # a folder of retrofit.save_pretrained
            header = read_folder(path)[0]
            if header.adapter:
                raise RetrofitError(
                    f"base {path} is itself an adapter; give the full model or the plain weights it was made on"
                )
            plain = load_full(header)
        elif _retrofit_format(path):
            if read_header(path).adapter:
                raise RetrofitError(
                    f"base {excerpt(path)} is itself an adapter; give the full model or the plain "
                    "weights "
                    f"it was made on"
                )
            plain = load_full(read_header(path))
        elif not architecture:
            raise RetrofitError(
                "this adapter is of a network that is not from timm: pass the base network with "
                "its weights, retrofit.load(path, base=my_net)"
            )
        else:
            plain = create_model(architecture, checkpoint=path, **model_kwargs)
    else:
        raise RetrofitError(f"base must be a weight file or an nn.Module, got {type(base).__name__}")
    if get_info(plain) is not None:  # its recorded base goes with it
        plain = strip(plain, inplace=True)
    classes = model_kwargs.get("num_classes")
    have = getattr(plain, "num_classes", None)
    if classes is not None and isinstance(have, int) and have != classes:
        if not hasattr(plain, "reset_classifier"):
            raise RetrofitError(f"the base has {have} classes, the adapter {classes}, and no reset_classifier()")
        with torch.random.fork_rng(devices=[]):  # the new head's values come from the adapter
            plain.reset_classifier(classes)
    return plain, name


def _retrofit_format(path: Path) -> bool:
    """Whether ``path`` is a safetensors file with retrofit metadata (full model or adapter)."""
    if path.suffix != ".safetensors":
        return False
    try:
        return safetensors_header(path)[0].get("format") in (FORMAT, ADAPTER_FORMAT)
    except Exception:  # not readable as safetensors: create_model reports it as a weight file
        return False


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors of ``model.state_dict()`` (tied tensors once): a full file's data."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        key = (value.untyped_storage().data_ptr(), value.shape) if value.numel() else id(value)
        if key not in seen:
            seen.add(key)
            total += value.numel() * value.element_size()
    return total


def _default_name(model: nn.Module) -> str:
    return model_name(model)


def _printable(text: str) -> str:
    return "".join(c for c in text if c.isprintable())[:200]
