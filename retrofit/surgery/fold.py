"""Fold channel gates into constant scales: the algebra, and the model's structure after it.

A channel gate whose excitation ``s`` does not depend on its input computes ``y = x * s``
(:mod:`retrofit.blocks.excitation`); :func:`retrofit.fold` also replaces a gate whose excitation varies
little by its mean. :func:`fold_scales` puts each such scale where :mod:`retrofit.surgery.neighbour` finds
that the algebra is exact (a norm's affine parameters, a convolution's or linear layer's output or
input channels), multiplying that layer's weights in place, and takes the block's call out of its
owner's rewritten forward (a fused ``block(x, shortcut)`` becomes ``x + shortcut``): the block costs
nothing any more. Where no neighbour can take it, the block becomes a
:class:`~retrofit.blocks.scale.ChannelScale` with ``s`` as its parameter. Either way the model's outputs
are the unfolded model's with ``s`` in place of the excitation, to rounding.

What was folded where is recorded on the model (``RetrofitInfo.folds``), and a file stores it, so
:func:`apply_folds` rebuilds the same structure on a model retrofitted by the same recipe before its
weights (the folded neighbours' included) are loaded.

    >>> model = copy.deepcopy(se_model)     # folded in place; se_model: a fresh retrofit, every gate constant
    >>> folds = fold_scales(model, constant_scales(model))   # the input-independent gates, exactly
    >>> [(f.path, f.into, f.neighbour) for f in folds]
    [('layer1.0.se', 'norm', 'layer1.0.bn3'), ('layer1.1.se', 'norm', 'layer1.1.bn3'), ...]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import fx, nn

from ..blocks.excitation import constant_scale, input_independent, spec_problem
from ..blocks.scale import ChannelScale
from ..errors import RetrofitError, excerpt
from ..graph.forward import install_forward, installed
from ..graph.trace import trace
from .info import FOLD_KINDS, BlockInfo, Folded, RetrofitInfo, get_info, update_info
from .neighbour import Neighbours
from .strip import take_out

_KINDS = {
    "norm": (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm),
    "conv_out": nn.modules.conv._ConvNd,
    "conv_in": nn.modules.conv._ConvNd,
    "linear_out": nn.Linear,
    "linear_in": nn.Linear,
}


def info_of(model: nn.Module) -> RetrofitInfo:
    """``model``'s record (:func:`retrofit.get_info`), refused in one line when it has no blocks to read."""
    info = get_info(model)
    if info is None or not (info.blocks or info.gone):
        raise RetrofitError(
            f"this {type(model).__name__} has no blocks from retrofit.add_se; nothing to inspect or fold"
        )
    return info


def gates(model: nn.Module) -> tuple[list[BlockInfo], list[tuple[BlockInfo, str]]]:
    """The model's channel gates (blocks :func:`retrofit.inspect` reads and :func:`retrofit.fold` folds),
    and its other blocks, each with why it is not one."""
    info = info_of(model)
    found, others = [], []
    for b in info.blocks:
        why = "folded already: a constant channel scale" if info.folded(b.path) else spec_problem(b.config.module)
        (others.append((b, why)) if why else found.append(b))
    return found, others


def require_gates(model: nn.Module, verb: str) -> list[BlockInfo]:
    """The model's channel gates, or the error that says why there is none to ``verb`` (inspect, fold)."""
    found, others = gates(model)
    if found:
        return found
    info = info_of(model)
    why = (
        f"{others[0][0]}: {others[0][1]}"
        if others
        else f"all {len(info.gone)} of its blocks were folded into their neighbours"
    )
    raise RetrofitError(f"this model has no channel gate to {verb} ({why})")


def constant_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input-independent gates of ``model`` (:func:`retrofit.blocks.excitation.input_independent`:
    known from the weights, no data) and the scale each multiplies every input by."""
    return {
        b.path: constant_scale(model.get_submodule(b.path), b.channels, b.layout, b.prefix)
        for b in gates(model)[0]
        if input_independent(model.get_submodule(b.path), b.config.module)
    }


@torch.no_grad()
def fold_scales(model: nn.Module, scales: Mapping[str, torch.Tensor]) -> list[Folded]:
    """Replace each gate ``path`` of ``scales`` by its constant scale (``C`` values), in place: into the
    neighbour :mod:`retrofit.surgery.neighbour` finds, else a :class:`ChannelScale`. Returns the folds made,
    in the order given (also appended to ``retrofit.get_info(model).folds``)."""
    info = info_of(model)
    by_path = {b.path: b for b in gates(model)[0]}
    unknown = [p for p in scales if p not in by_path]
    if unknown:
        raise RetrofitError(f"{unknown[0]} is not a channel gate of this model that can be folded")
    if not scales:
        return []
    mode = model.training
    try:  # every neighbour is found on the unfolded model: one trace, and each fold is local
        search = Neighbours(trace(model.eval(), info.input_size), info.blocks)
        found = {path: search.find(by_path[path]) for path in scales}
    finally:
        model.train(mode)
    made = []
    for path, s in scales.items():
        n = found[path]
        if n.into != "scale":
            scale_into(model.get_submodule(n.path), n.into, s)
        made.append(restructure(model, Folded(path, n.into, n.path, n.why)))
        if n.into == "scale":
            model.get_submodule(path).scale.copy_(s)
    return made


@torch.no_grad()
def scale_into(module: nn.Module, into: str, s: torch.Tensor) -> None:
    """Multiply ``module``'s weights by the per-channel scale ``s`` along the axis ``into`` names, so that
    it computes ``s * module(x)`` (``norm``, ``conv_out``, ``linear_out``) or ``module(s * x)`` (``conv_in``,
    ``linear_in``; for a convolution: exact with zero padding)."""
    w = module.weight
    s = s.to(device=w.device, dtype=w.dtype)
    if into in ("norm", "conv_out", "linear_out"):
        w.mul_(s.view(-1, *([1] * (w.dim() - 1))))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(s)
    elif into == "linear_in":
        w.mul_(s)
    elif into == "conv_in":  # weight (out, in / groups, k...): output channel o of group g reads inputs g * per + j
        groups, (out, per) = module.groups, w.shape[:2]
        factor = s.view(groups, 1, per).expand(groups, out // groups, per).reshape(out, per)
        w.mul_(factor.view(out, per, *([1] * (w.dim() - 2))))
    else:
        raise ValueError(f"cannot scale {type(module).__name__} along {excerpt(into)}")


def restructure(model: nn.Module, fold: Folded) -> Folded:
    """The structural part of ``fold`` (no values): a ``scale`` fold puts a :class:`ChannelScale` (of ones)
    where the block was; any other takes the block's call out of its owner's forward and the block out of
    the model. Records the fold on the model."""
    info = info_of(model)
    block = next((b for b in info.blocks if b.path == fold.path), None)
    if block is None or info.folded(fold.path):
        raise RetrofitError(f"{excerpt(fold.path, bare=True)} is not a block of this model that can be folded")
    owner_path, _, name = fold.path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    old = getattr(owner, name)
    like = next(old.parameters(), None)
    changes: dict = {"folds": (*info.folds, fold)}
    if fold.into == "scale":
        setattr(
            owner,
            name,
            ChannelScale(
                block.channels,
                block.layout,
                device=like.device if like is not None else None,
                dtype=like.dtype if like is not None else None,
            ),
        )
    else:
        _remove_call(owner, name)
        delattr(owner, name)
        if fold.path in info.was_none:  # timm's `self.se = None`: the class's forward reads it again after strip
            setattr(owner, name, None)
        changes.update(blocks=tuple(b for b in info.blocks if b is not block), gone=(*info.gone, block))
    update_info(model, **changes)  # one new record for the whole fold
    return fold


def _remove_call(owner: nn.Module, name: str) -> None:
    """Take the call of block ``name`` out of ``owner``'s forward (new graphs: installed ones are shared
    with copies of the model, and a GraphModule's is its own)."""
    if isinstance(owner, fx.GraphModule):
        take_out(owner.graph, [name])
        owner.recompile()
        return
    holder = installed(owner)
    if holder is None:
        raise RetrofitError(
            f"the forward of {type(owner).__name__} holding block {name} is not retrofit's; was "
            f"the model edited after add_se?"
        )
    copies = {id(g): copy.deepcopy(g) for g in holder.graphs.values()}
    for graph in copies.values():
        take_out(graph, [name])
    install_forward(owner, {mode: copies[id(g)] for mode, g in holder.graphs.items()})


def apply_folds(model: nn.Module, folds: list[Folded]) -> None:
    """Rebuild the structure of ``folds`` (as read from a file) on ``model``, retrofitted by the same
    recipe, before its weights are loaded; each neighbour must be a module of the kind its fold needs."""
    for fold in folds:
        if fold.into not in FOLD_KINDS:
            raise RetrofitError(
                f"fold of {excerpt(fold.path)}: unknown kind {excerpt(fold.into)} ({', '.join(FOLD_KINDS)})"
            )
        if fold.into != "scale":
            try:
                neighbour = model.get_submodule(fold.neighbour)
            except AttributeError:
                raise RetrofitError(
                    f"fold of {excerpt(fold.path)}: the model has no module {excerpt(fold.neighbour)}"
                ) from None
            if not isinstance(neighbour, _KINDS[fold.into]):
                raise RetrofitError(
                    f"fold of {excerpt(fold.path)}: {excerpt(fold.neighbour, bare=True)} is a "
                    f"{type(neighbour).__name__}, not a "
                    f"layer a {fold.into} fold goes into"
                )
        restructure(model, fold)
