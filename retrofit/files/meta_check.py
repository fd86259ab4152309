"""A timm architecture checked against a weight file on the meta device, before any real allocation.

A file names the architecture it is rebuilt as (a retrofit file's ``architecture``, an adapter's for its
base). A file that names ``vit_giant_patch14_224`` over a ResNet's weights would have that model built
for real (a billion parameters: 4.3 GB and 23 s) before its tensors were found not to fit. The model is
first built under ``torch.device("meta")`` (no memory, no initialisation; milliseconds) and the file's
tensor list, read from its header, is compared with it:

* a retrofit file (:func:`check_model_file`) holds every tensor of the plain model under its own name
  and shape (a retrofit never renames one), plus the blocks';
* a plain weight file given for an architecture (:func:`check_checkpoint`) goes through timm's own
  loader, whose filters may rename and resize tensors (a position embedding for another input size), so
  only its size is compared: it must hold at least half the values the model has outside its classifier.

A model whose construction needs real values (an ``.item()`` on a tensor: see
:mod:`retrofit.measure.meta`) cannot be built on the meta device; it is not checked here, and the checks
after the real build (every tensor's name, dtype and shape) still refuse a file that does not fit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

from ..errors import RetrofitError, excerpt

Tensors = Mapping[str, tuple[str, tuple[int, ...]]]


def meta_model(name: str, **kwargs: Any) -> nn.Module | None:
    """timm model ``name`` built on the meta device, or None when that fails (its construction needs
    real values, or fails for a reason the real build reports)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(name, **kwargs)
    except Exception:  # noqa: BLE001 - the real build runs next and reports its own failure
        return None


def check_model_file(name: str, kwargs: Mapping[str, Any], tensors: Tensors, where: Any) -> None:
    """Refuse a retrofit file whose tensors do not include every tensor of the plain ``name`` (tied
    ones once) at its shape, before the model is built for real."""
    plain = meta_model(name, **kwargs)
    if plain is None:
        return
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, value in plain.state_dict(keep_vars=True).items():  # tied tensors: one object, several names
        groups.setdefault(id(value), []).append((key, value))
    missing, shapes = [], []
    for group in groups.values():
        held = [(k, v) for k, v in group if k in tensors]
        if not held:
            missing.append(group[0][0])
        shapes += [
            f"{k}: {excerpt(list(tensors[k][1]))} in the file, {list(v.shape)} in the model"
            for k, v in held
            if tuple(tensors[k][1]) != tuple(v.shape)
        ]
    problems = [
        f"{len(found)} {label} (e.g. {excerpt(found[0], 200, bare=True)})"
        for label, found in (("missing tensors", missing), ("shape mismatches", shapes))
        if found
    ]
    if problems:
        raise RetrofitError(
            f"{excerpt(where, bare=True)} does not hold the weights of {name}: {', '.join(problems)} "
            f"(checked before building it); is it the network it was saved from?"
        )


def check_checkpoint(name: str, kwargs: Mapping[str, Any], tensors: Tensors, where: Any) -> None:
    """Refuse a plain weight file that holds fewer than half the values ``name`` has outside its
    classifier, before the model is built for real."""
    plain = meta_model(name, **kwargs)
    if plain is None:
        return
    head = plain.get_classifier() if hasattr(plain, "get_classifier") else None
    heads = [h for h in (head if isinstance(head, (tuple, list)) else (head,)) if isinstance(h, nn.Module)]
    skip = {id(t) for h in heads for t in [*h.parameters(), *h.buffers()]}
    unique = {id(v): v for v in plain.state_dict(keep_vars=True).values() if id(v) not in skip}
    need = sum(v.numel() for v in unique.values())
    have = sum(math.prod(shape) for _, shape in tensors.values())
    if need > 2 * have:
        raise RetrofitError(
            f"checkpoint {excerpt(where, bare=True)} holds {have:,} values, but {name} has {need:,} "
            f"outside its classifier (checked before building it); is it a checkpoint of this "
            f"architecture?"
        )
