"""Undo a retrofit: remove the inserted blocks and give every rewritten module its own forward back.

:func:`retrofit.add_se` changes a model in two ways only: it adds block submodules (and, for some
forwards, non-persistent constant buffers) and installs a regenerated forward on the instances that
hold them (:mod:`retrofit.graph.forward`). Stripping removes both: the instance attributes ``forward`` and
``_replicate_for_data_parallel`` are deleted, so the class's own ``forward`` applies again, exactly the code
that ran before the retrofit; a ``torch.fx.GraphModule`` (which keeps its forward in its graph) gets the
block nodes removed from its graph instead. The original parameters and buffers were never touched, so the
stripped model's state dict and outputs are the original's, as long as it was not trained since.

A folded model (:func:`retrofit.fold`): strip removes every module retrofit added, the blocks left and
the channel-scale modules folded blocks became, and gives the modules whose blocks were folded into a
neighbour their class's forward back. A scale folded into a neighbour's weights is part of those
weights now (as a phase-2 fine-tune's change would be) and stays: strip cannot divide it out exactly (a
scale may be 0 or round). So the stripped network is the folded one without its blocks and channel
scales, with the folded neighbours; :func:`retrofit.bypass` computes the same network in place.
"""

from __future__ import annotations

import copy
import operator

from torch import fx, nn

from ..errors import RetrofitError, excerpt
from ..graph.forward import uninstall
from ..graph.rebuild import CONSTANT_PREFIX  # buffers OwnerGraph registers for values fx kept aside
from .info import clear_info, get_info


def strip(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Remove the blocks :func:`retrofit.add_se` inserted into ``model``.

    Args:
        model: a model retrofitted by :func:`retrofit.add_se` (one or several times).
        inplace: strip ``model`` itself instead of a deep copy (like ``add_se``'s ``inplace``).

    Returns:
        The model without its blocks: same class, the original state-dict keys, and (if it was not
        fine-tuned meanwhile) the original values and outputs. After fine-tuning, it is the
        fine-tuned network with its blocks removed, which is generally not what was trained.

    Raises:
        RetrofitError: ``model`` has no blocks from retrofit.

    Example::

        >>> se_model = retrofit.add_se(model, position="inside")
        >>> plain = retrofit.strip(se_model)     # a copy; se_model keeps its blocks
        >>> plain.state_dict().keys() == model.state_dict().keys()
        True
    """
    info = get_info(model)
    if info is None or not (info.blocks or info.gone):
        raise RetrofitError(f"this {type(model).__name__} has no blocks from retrofit.add_se; nothing to strip")
    target = model if inplace else copy.deepcopy(model)
    owners: dict[str, list[str]] = {}
    for block in info.blocks:
        owner, _, name = block.path.rpartition(".")
        owners.setdefault(owner, []).append(name)
    for block in info.gone:  # folded into a neighbour: its call is gone, its owner's forward is still rewritten
        owners.setdefault(block.path.rpartition(".")[0], [])
    for path, names in owners.items():
        try:
            module = target.get_submodule(path) if path else target
        except AttributeError:
            raise RetrofitError(
                f"block owner {excerpt(path)} is no longer in the model; was it edited after add_se?"
            ) from None
        _strip_module(module, names)
        for name in names:  # an attribute that was None before (timm's `self.se = None`) is None again
            if (f"{path}.{name}" if path else name) in info.was_none:
                setattr(module, name, None)
    clear_info(target)
    return target


def take_out(graph: fx.Graph, names: list[str]) -> None:
    """Remove the calls of the blocks ``names`` from ``graph`` (in place): each use of a block's output
    reads its input instead, and a block fused with its residual sum, ``block(x, shortcut)``, becomes
    the plain sum ``x + shortcut``."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in names:
            if len(node.args) > 1:
                with graph.inserting_before(node):
                    plain = graph.call_function(operator.add, node.args[:2])
            else:
                plain = node.args[0]
            node.replace_all_uses_with(plain)
            graph.erase_node(node)
    graph.lint()


def _strip_module(module: nn.Module, names: list[str]) -> None:
    if isinstance(module, fx.GraphModule):  # its forward is its graph: take the block nodes out
        take_out(module.graph, names)
        module.recompile()
    else:
        uninstall(module)  # the class's forward applies again
        for name, _ in list(module.named_buffers(recurse=False)):
            if name.startswith(CONSTANT_PREFIX):
                delattr(module, name)
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
