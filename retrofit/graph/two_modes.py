"""Forwards that compute different things in train and eval mode: the other mode's graph, and where
an insertion made in one mode goes in the other.

A module whose own forward reads ``training`` (an inline dropout or drop-path) is traced one level
deep in both modes (:func:`other_mode`); :class:`Correspondence` pairs up the nodes of the two graphs,
so surgery can splice each block into both and the installed forward switches on ``self.training``
(:mod:`retrofit.graph.forward`), as torchvision's ``feature_extraction`` keeps a train and an eval graph.
"""

from __future__ import annotations

import copy
import difflib
import operator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from ..errors import first_line
from . import nodes as N
from .code import names_read
from .forward import installed
from .rebuild import CannotRewrite, OwnerGraph
from .restore import attributes_kept
from .trace import RetrofitTracer, Traced


# -- train/eval mode ------------------------------------------------------------------------------
def reads_training(cls: type) -> bool:
    """Whether the class's forward (or a method of the class it calls) mentions ``training``."""
    return "training" in names_read(cls)


class _OneLevelTracer(RetrofitTracer):
    def __init__(self, root: nn.Module):
        super().__init__()
        self.only = root

    def is_leaf_module(self, m, qualified_name):
        return m is not self.only


def trace_one_level(module: nn.Module, mode: bool) -> Traced:
    """``module``'s own forward traced in train (True) or eval mode, every child a leaf."""
    saved = module.training
    constants: dict[str, Any] = {}
    tracer = _OneLevelTracer(module)
    try:
        module.training = mode
        with attributes_kept(module, constants):
            graph = tracer.trace(module)
    finally:
        module.training = saved
    return Traced(module, graph, tracer.root_call, (), constants, dict(tracer.tensor_attrs))


def other_mode(module: nn.Module, reserved: frozenset[str] = frozenset()) -> OwnerGraph | None:
    """``module``'s own forward rebuilt in the mode it is not in (the analysis traced it in its own
    mode), or None when both modes compute the same: then one graph serves both.

    Only a forward that reads ``training`` can differ; both modes are traced one level deep (children
    keep their own forward, train/eval behaviour included) and compared. A module retrofitted before
    has its graphs already.
    """
    holder = installed(module)
    if holder is not None:
        holder = holder.current()  # for the attributes it has now
        return OwnerGraph.of(copy.deepcopy(holder.graphs[not module.training])) if holder.two_modes else None
    if not reads_training(type(module)) or isinstance(module, fx.GraphModule):
        return None
    try:
        traces = {mode: trace_one_level(module, mode) for mode in (True, False)}
    except Exception as err:
        raise CannotRewrite(f"its forward cannot be traced in train and eval mode ({first_line(err)})") from None
    if str(traces[True].graph) == str(traces[False].graph):
        return None
    other = traces[not module.training]
    return OwnerGraph(other.root_call, other, reserved)


_COMMUTATIVE = frozenset({operator.add, operator.mul, torch.add, torch.mul})


class Correspondence:
    """The nodes of graph ``a`` that have a counterpart in graph ``b`` (the two modes of one forward).

    The two modes of one forward are mostly the same code with a few nodes more or less (a dropout, a
    drop-path mask). The longest common subsequence of the two node sequences by (op, target)
    (:mod:`difflib`) pairs them up; a pair is kept when it reads counterparts (constants may differ:
    ``dropout(..., training=True)`` and ``training=False`` correspond), where a node with no
    counterpart that only modifies one input with one (``y * mask``) stands for that input, so the
    residual sum ``x + y * mask`` of train mode corresponds to ``x + y`` of eval mode. Every form of
    an addition (``+``, ``+=``, ``torch.add``, ``.add``) is one operation, commutative.

    The same alignment serves a forward traced again for new attribute values
    (:mod:`retrofit.graph.specialise`): a shift that is no longer made is a node with no counterpart.
    """

    def __init__(self, a: fx.Graph, b: fx.Graph):
        na, nb = list(a.nodes), list(b.nodes)
        self.pairs: dict[fx.Node, fx.Node] = {}
        self.back: dict[fx.Node, fx.Node] = {}

        def sig(n):
            if N.add_operands(n) is not None:
                return ("add",)
            return n.op, (n.target if n.op != "output" else None)

        try:
            matcher = difflib.SequenceMatcher(None, [sig(n) for n in na], [sig(n) for n in nb], autojunk=False)
        except TypeError:  # an unhashable target: nothing corresponds
            return
        for block in matcher.get_matching_blocks():  # in order: a node's inputs are decided before it
            for k in range(block.size):
                x, y = na[block.a + k], nb[block.b + k]
                if self._same_inputs(x, y):
                    self.pairs[x], self.back[y] = y, x

    def get(self, n: fx.Node) -> fx.Node | None:
        return self.pairs.get(n)

    @staticmethod
    def anchor(n: fx.Node, paired: dict) -> fx.Node | None:
        """``n`` if it has a counterpart; else the one input with a counterpart it modifies."""
        if n in paired:
            return n
        kept = [i for i in n.all_input_nodes if i in paired]
        return kept[0] if len(kept) == 1 else None

    def _same_inputs(self, x: fx.Node, y: fx.Node) -> bool:
        if len(x.args) != len(y.args) or x.kwargs.keys() != y.kwargs.keys():
            return False
        commutes = x.target in _COMMUTATIVE or N.add_operands(x) is not None
        if commutes and len(y.args) == 2 and not y.kwargs and self._same_args(x, y.args[::-1], {}):
            return True  # a + b and b + a (a fused block's sum reads back as block + shortcut)
        return self._same_args(x, y.args, y.kwargs)

    def _same_args(self, x: fx.Node, args: tuple, kwargs: dict) -> bool:
        lx, ly = [], []
        map_aggregate((x.args, tuple(x.kwargs.values())), lx.append)
        map_aggregate((args, tuple(kwargs.values())), ly.append)
        if len(lx) != len(ly):
            return False
        for u, v in zip(lx, ly):
            if isinstance(u, fx.Node) != isinstance(v, fx.Node):
                return False
            if isinstance(u, fx.Node):
                ua, va = self.anchor(u, self.pairs), self.anchor(v, self.back)
                if ua is None or self.pairs[ua] is not va:
                    return False
        return True
