"""Which neighbouring layer can absorb a block's constant scale exactly: found on the model's fx graph.

A channel gate with a constant excitation computes ``y = x * s`` (:mod:`retrofit.blocks.excitation`). ``s``
folds into a layer next to it when the algebra is exact and no other reader sees the change:

* before it (``x`` is that layer's output, and nothing else reads it):
  a norm's affine parameters (``norm``: ``s * (x_hat * w + b) == x_hat * (s w) + s b``, in train mode on
  batch statistics as in eval mode on running ones: the statistics are of the input, which does not
  change); a convolution's output channels (``conv_out``: row ``c`` of the weights and the bias times
  ``s_c``); a linear layer's output features (``linear_out``, channels-last maps);
* after it (``y`` goes to that layer alone): a convolution's input channels (``conv_in``: column ``c`` of
  the weights times ``s_c``, per group; only with zero padding, where ``s * 0 == 0``), a linear layer's
  input features (``linear_in``).

Steps over markers, identities and dropout-like layers (``s`` commutes with a random mask) on the way.
A layer qualifies only if it is called once, shares no parameter with another module, has the block's
channels along the right axis, and is not part of a block. Where none qualifies the block becomes a
:class:`~retrofit.blocks.scale.ChannelScale` (``scale``); :func:`find_neighbour` says why.

The graph is :func:`retrofit.graph.trace.trace`'s flat graph of the whole model, so a neighbour in
another module's forward (the next unit's first convolution) is found as well as one in the block's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx, nn

from ..graph import nodes as N
from ..graph.trace import Call, Traced
from .info import BlockInfo

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Neighbour:
    """Where a block's scale can go: ``into`` (one of :data:`retrofit.surgery.info.FOLD_KINDS`), the
    neighbour's module path (``""`` for ``scale``) and, for ``scale``, why no neighbour could take it."""

    into: str
    path: str = ""
    why: str = ""


class Neighbours:
    """The neighbour search over one trace of a retrofitted model (``traced``), for any of its blocks.

    Example::

        >>> from retrofit.graph.trace import trace
        >>> info = retrofit.get_info(se_model)
        >>> search = Neighbours(trace(se_model.eval(), info.input_size), info.blocks)
        >>> search.find(info.blocks[0])
        Neighbour(into='norm', path='layer1.0.bn3', why='')
    """

    def __init__(self, traced: Traced, blocks: list[BlockInfo]):
        self.traced = traced
        self.calls = {c.path: c for c in traced.calls()}
        self.counts = _call_counts(traced.graph)
        self.shared = _shared_parameters(traced.model)
        self.blocks = tuple(b.path for b in blocks)

    def find(self, block: BlockInfo) -> Neighbour:
        """The neighbour that can absorb ``block``'s scale, or ``Neighbour("scale", why=...)``."""
        call = self.calls.get(block.path)
        if call is None:
            return Neighbour("scale", why="the block is not called in the traced forward")
        x, y = _ends(call)
        if x is None or y is None:
            return Neighbour("scale", why="its input or output is not one traced value")
        inside = _within(call)
        reasons = []
        for side, end, search in (("before", x, _producer), ("after", y, _consumer)):
            node, why = search(end, inside)
            if node is not None:
                into, why = _kind(N.module_of(node), block, side)
                if into is not None:
                    why = self._other_readers(node)
                    if why is None:
                        return Neighbour(into, node.target)
                why = f"{node.target} {why}"
            reasons.append(f"{side}: {why}")
        return Neighbour("scale", why="; ".join(reasons))

    def _other_readers(self, node: fx.Node) -> str | None:
        """Why changing ``node``'s module would change what another part of the model computes; None if nothing."""
        n = self.counts.get(node.target, 0)
        if n != 1:
            return f"is called {n} times in the forward"
        if any(id(p) in self.shared for p in N.module_of(node).parameters()):
            return "shares a parameter with another module (tied weights)"
        if any(node.target == b or node.target.startswith(f"{b}.") for b in self.blocks):
            return "is part of a block"
        return None


def _ends(call: Call) -> tuple[fx.Node | None, fx.Node | None]:
    """The node a block call reads (its first argument) and the node of its result."""
    if call.leaf:
        node = call.node
        return (node.args[0] if node is not None and node.args and isinstance(node.args[0], fx.Node) else None), node
    first = call.args[0] if call.args else None
    x = getattr(first, "node", None)
    y = getattr(call.result, "node", None)
    return x, y


def _within(call: Call) -> Callable[[fx.Node], bool]:
    """Whether a node was made inside ``call`` (a traced-through timm block's own nodes)."""

    def inside(node: fx.Node) -> bool:
        c = node.meta.get("call")
        while c is not None:
            if c is call:
                return True
            c = c.parent
        return False

    return inside


def _through(node: fx.Node) -> bool:
    """A node the scale passes through unchanged: a marker, an identity, dropout or drop-path."""
    return N.is_marker(node) or N.is_regularizer(node)


def _producer(x: fx.Node, inside) -> tuple[fx.Node | None, str]:
    """The layer whose output the block reads, stepping back over pass-through nodes that feed only it."""
    child, node = None, x
    while True:
        readers = [u for u in node.users if not inside(u) and u is not child]
        if readers:
            return None, f"its input is also read by {len(readers)} other node(s)"
        if _through(node) and node.args and isinstance(node.args[0], fx.Node):
            child, node = node, node.args[0]
            continue
        if node.op != "call_module":
            return None, f"its input comes from {node.op} {getattr(node.target, '__name__', node.target)}"
        return node, ""


def _consumer(y: fx.Node, inside) -> tuple[fx.Node | None, str]:
    """The one layer that reads the block's output, stepping over pass-through nodes."""
    node = y
    while True:
        readers = [u for u in node.users if not inside(u)]
        if len(readers) != 1:
            return None, f"its output goes to {len(readers)} nodes"
        (user,) = readers
        if user.args[:1] != (node,) or node in user.args[1:] or node in user.kwargs.values():
            return None, "its output is not the first input of the layer after it"
        if _through(user):
            node = user
            continue
        if user.op != "call_module":
            return None, f"its output goes to {user.op} {getattr(user.target, '__name__', user.target)}"
        return user, ""


def _kind(m: nn.Module, block: BlockInfo, side: str) -> tuple[str | None, str]:
    """Which fold the module ``m`` allows on ``side`` of the block, or None and why not."""
    c, last = block.channels, block.layout != "nchw"
    conv = isinstance(m, nn.modules.conv._ConvNd) and not m.transposed
    if side == "before":
        if isinstance(m, _NORMS) or isinstance(m, nn.LayerNorm):
            return _norm_kind(m, c, last)
        if conv and not last and m.out_channels == c:
            return "conv_out", ""
        if isinstance(m, nn.Linear) and last and m.out_features == c:
            return "linear_out", ""
        return None, f"({type(m).__name__}) is not a norm, convolution or linear layer on these {c} channels"
    if conv and not last and m.in_channels == c:
        if m.padding_mode != "zeros":
            return None, f"pads with '{m.padding_mode}', not zeros: a scaled border would differ"
        return "conv_in", ""
    if isinstance(m, nn.Linear) and last and m.in_features == c:
        return "linear_in", ""
    return None, f"({type(m).__name__}) is not a convolution or linear layer on these {c} channels"


def _norm_kind(m: nn.Module, c: int, last: bool) -> tuple[str | None, str]:
    weight = getattr(m, "weight", None)
    if weight is None or tuple(weight.shape) != (c,):
        return None, f"({type(m).__name__}) has no affine weight of {c} channels"
    if any(not isinstance(getattr(m, a, None) or nn.Identity(), nn.Identity) for a in ("act", "drop")):
        return None, f"({type(m).__name__}) applies an activation after its affine map"
    channels_first = isinstance(m, _NORMS) or type(m).__name__.startswith("LayerNorm2d")
    if channels_first == last:  # a LayerNorm over the last axis of an NCHW map normalises its width
        return None, f"({type(m).__name__}) normalises another axis than the block's channels"
    return "norm", ""


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}
