"""The first step of each fine-tuning phase, checked: what trainable got no gradient, why, what to do.

A phase in which nothing trainable gets a gradient trains for nothing and still prints a normal
results table. The common cause is timm's ``zero_init_last``: a random ResNet is built with the last
norm of each residual branch at zero. The branch's output is then exactly zero, and so is the gradient
of a block on that branch (positions standard, pre and inside; post and identity sit off it). After
the first backward pass of a phase (under DDP the gradients are all-reduced by then, so every
process decides alike), :func:`check_first_step` stops a phase in which no trainable tensor got a
gradient with one error, and otherwise names in one warning the tensors that got none, grouped by
block, head or module. Each group gets the reason that can be found: a zero-initialised norm in the
block's residual unit, an exactly zero gradient, or not being on the loss path. It also says what
to do, leaving out any option that is already on.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..errors import RetrofitError, RetrofitWarning
from ..files.provenance import NORMS
from ..surgery.info import get_info
from .params import head_params


def without_gradient(model: nn.Module) -> tuple[list[str], list[str]]:
    """After a backward pass: the trainable parameters that got no gradient, as (``grad is None``: not on
    the loss path, an all-zero gradient: a zero factor between them and the loss)."""
    unused, zero = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if p.grad is None:
                unused.append(name)
            elif not bool(p.grad.any()):
                zero.append(name)
    return unused, zero


def owners(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``names`` grouped by what holds them: an inserted block's path, ``head``, or the parameter's module."""
    info = get_info(model)
    blocks = sorted((b.path for b in info.blocks) if info is not None else (), key=len, reverse=True)
    head = head_params(model)
    out: dict[str, list[str]] = {}
    for name in names:
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        out.setdefault(owner or ("head" if name in head else name.rpartition(".")[0]), []).append(name)
    return out


def zero_norms(model: nn.Module, path: str) -> list[str]:
    """The norm layers with an all-zero scale in the module that holds ``path`` (a block's residual unit)."""
    parent = path.rpartition(".")[0]
    return [
        f"{parent}.{n}" if parent else n
        for n, m in model.get_submodule(parent).named_modules()
        if isinstance(m, NORMS)
        and getattr(m, "weight", None) is not None
        and not m.weight.is_meta
        and not bool(m.weight.any())
    ]


def _listed(items: list[str]) -> str:
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def explain(model: nn.Module, unused: list[str], zero: list[str], train_norms: bool) -> str:
    """One line: what got no gradient, why as far as can be told, and what to do."""
    zeroed, other, parts = [], [], []
    for owner in owners(model, zero):
        norms = zero_norms(model, owner) if owner != "head" else []
        (zeroed if norms else other).append(f"{owner} ({', '.join(norms[:2])} = 0)" if norms else owner)
    if zeroed:
        parts.append(
            f"{_listed(zeroed)}: a zero-initialised norm after them (timm's zero_init_last: the weights "
            f"are random) makes their gradient exactly zero"
            + ("; the norm trains, so they can learn once it moves" if train_norms else "")
        )
    if other:
        parts.append(f"{_listed(other)}: an exactly zero gradient (a zero factor between it and the loss)")
    if unused:
        parts.append(
            f"{_listed(list(owners(model, unused)))}: not on the loss path (unused by the forward, or "
            f"its output detached)"
        )
    if not zeroed:
        return "; ".join(parts)
    fixes = ["trained weights (--checkpoint or --pretrained)"]
    info = get_info(model)
    position = info.recipe.position if info is not None else ""
    if position not in ("post", "identity"):
        fixes.append("--position post or identity (off the zeroed branch)")
    if not train_norms:
        fixes.append("--train-norms (train_norms=True; the blocks learn once the norms move)")
    return "; ".join(parts) + "; use " + (", ".join(fixes[:-1]) + ", or " if len(fixes) > 1 else "") + fixes[-1]


def check_first_step(model: nn.Module, phase: int, train_norms: bool, warn: bool) -> None:
    """Call after the backward pass of a phase's first step, before the optimizer step.

    Raises:
        RetrofitError: no trainable parameter got a gradient: the phase would train nothing.
    """
    unused, zero = without_gradient(model)
    if not unused and not zero:
        return
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    why = explain(model, unused, zero, train_norms)
    if len(unused) + len(zero) == len(trainable):
        head = head_params(model)
        frozen = head and not head & set(trainable)
        raise RetrofitError(
            f"nothing trainable got a gradient in the first step of phase {phase}, so it would "
            f"train nothing: {why}"
            + ("; the classifier is frozen (it is not new: --train-head, train_head=True, trains it)" if frozen else "")
        )
    if warn:
        warnings.warn(
            f"{len(unused) + len(zero)} of {len(trainable)} trainable tensors got no gradient in the "
            f"first step of phase {phase}: {why}",
            RetrofitWarning,
            stacklevel=2,
        )
