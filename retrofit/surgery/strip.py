"""Undo a retrofit: remove the inserted blocks and give every rewritten module its own forward back.

:func:`retrofit.add_se` changes a model in two ways only: it adds block submodules (and, for some
forwards, non-persistent constant buffers) and installs a regenerated forward on the instances that
hold them (:mod:`retrofit.graph.forward`). Stripping removes both: the instance attributes ``forward``
and ``_replicate_for_data_parallel`` are deleted, so the class's own ``forward`` applies again,
exactly the code that ran before the retrofit; a ``torch.fx.GraphModule`` (which keeps its forward in its
graph) gets the block nodes removed from its graph instead. The original parameters and buffers were never
touched, so the stripped model's state dict and outputs are the original's, as long as it was not trained
since.
"""
from __future__ import annotations

import copy
import operator

from torch import fx, nn

from ..errors import RetrofitError
from ..graph.forward import uninstall
from .info import RetrofitInfo

CONSTANT_PREFIX = "_retrofit_constant"  # buffers rebuild.OwnerGraph registers for values fx kept aside


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
    info = getattr(model, "_retrofit", None)
    if not isinstance(info, RetrofitInfo) or not info.blocks:
        raise RetrofitError(f"this {type(model).__name__} has no blocks from retrofit.add_se; nothing to strip")
    target = model if inplace else copy.deepcopy(model)
    owners: dict[str, list[str]] = {}
    for block in info.blocks:
        owner, _, name = block.path.rpartition(".")
        owners.setdefault(owner, []).append(name)
    for path, names in owners.items():
        try:
            module = target.get_submodule(path) if path else target
        except AttributeError:
            raise RetrofitError(f"block owner {path} is no longer in the model; was it edited after "
                                f"add_se?") from None
        _strip_module(module, names)
        for name in names:  # an attribute that was None before (timm's `self.se = None`) is None again
            if (f"{path}.{name}" if path else name) in info.was_none:
                setattr(module, name, None)
    target.__dict__.pop("_retrofit", None)
    if isinstance(target, fx.GraphModule):
        target.meta.get("_user_preserved_attributes", {}).pop("_retrofit", None)
    return target


def _strip_module(module: nn.Module, names: list[str]) -> None:
    if isinstance(module, fx.GraphModule):  # its forward is its graph: take the block nodes out
        graph = module.graph
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target in names:
                if len(node.args) > 1:  # a block fused with its residual sum: block(x, shortcut)
                    with graph.inserting_before(node):
                        plain = graph.call_function(operator.add, node.args[:2])
                else:
                    plain = node.args[0]
                node.replace_all_uses_with(plain)
                graph.erase_node(node)
        graph.lint()
        module.recompile()
    else:
        uninstall(module)  # the class's forward applies again
        for name, _ in list(module.named_buffers(recurse=False)):
            if name.startswith(CONSTANT_PREFIX):
                delattr(module, name)
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
