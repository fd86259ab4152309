"""The original network inside a retrofitted one: every inserted block passes its input through.

Like PEFT's ``disable_adapter()`` context: within ``with retrofit.bypass(model):`` the model computes
what it computed before :func:`retrofit.add_se`, whatever the blocks have learnt since, without a copy
and without touching a weight (forward hooks replace each block's output by its input, removed on
exit). A block fused with its residual sum (the standard position, called as ``block(x, shortcut)``)
gives the plain sum ``x + shortcut``. Fine-tuning measures its "original" row this way.

A folded model (:func:`retrofit.fold`): bypass switches off what :func:`retrofit.strip` removes, the blocks
left and the channel-scale modules (a channel scale passes its input through), and leaves the scales
folded into neighbours in their weights: within ``bypass`` the model computes what ``strip`` returns. That
is the original network only where no block was folded into a neighbour (a fine-tune of a folded model
measures its "original" row on it, so that row is the folded network without its blocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..errors import RetrofitError
from .info import get_info


@contextlib.contextmanager
def bypass(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context the blocks :func:`retrofit.add_se` inserted into ``model`` are switched off.

    Example::

        >>> se_model = retrofit.add_se(model, r=16)
        >>> with retrofit.bypass(se_model):
        ...     logits = se_model(x)          # the original network's logits
    """
    info = get_info(model)
    if info is None or not (info.blocks or info.gone):
        raise RetrofitError(f"this {type(model).__name__} has no blocks from retrofit.add_se; nothing to bypass")
    with blocks_off(model):
        yield model


@contextlib.contextmanager
def blocks_off(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`bypass` for the fine-tune's own use: a network without blocks (a control arm of the
    accuracy sweep) is already the original one, so there is nothing to switch off and no error."""
    info = get_info(model)
    hooks = [model.get_submodule(b.path).register_forward_hook(_passthrough) for b in info.blocks] if info else []
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def _passthrough(block: nn.Module, args: tuple, out):
    """The block's input instead of its output; a block fused with its residual sum gives the sum."""
    return args[0] + args[1] if len(args) > 1 and args[1] is not None else args[0]
