"""Rebuild one module's forward at its own level from the flat analysis graph.

The analysis graph (:mod:`retrofit.graph.trace`) is the whole model inlined. To rewrite one module, its
forward is rebuilt from the events recorded for its call: its own operations are copied, each child
module it calls becomes a single ``call_module`` node (the child keeps its own forward, train/eval
behaviour included), placeholders follow its ``forward`` signature. Surgery then splices SE nodes into
this graph (:meth:`OwnerGraph.splice`) and installs it (:mod:`retrofit.graph.forward`).

A module whose own forward computes different things in train and eval mode is rebuilt in the other
mode too (:mod:`retrofit.graph.two_modes`).

Anything that cannot be rebuilt faithfully raises :class:`CannotRewrite` with the reason, and the
site is reported as skipped instead of rewritten wrongly.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate, map_arg

from . import nodes as N
from .trace import Call, Traced

# the names of the tensors a rebuilt forward keeps (non-persistent buffers of its module)
CONSTANT_PREFIX = "_retrofit_constant"


class CannotRewrite(Exception):
    """A module's forward cannot be rebuilt safely; the message says why."""


class OwnerGraph:
    """One module call's forward rebuilt at its own level from the analysis graph.

    ``reserved``: constant names another graph of the same module already uses (its other mode's).
    """

    def __init__(self, call: Call, traced: Traced, reserved: frozenset[str] = frozenset()):
        self.call = call
        self.traced = traced
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}  # analysis node -> node of this graph
        self.children: dict[int, fx.Node] = {}  # id(child Call) -> its call_module node
        self.constants: dict[str, Any] = {}  # tensors to register on the module (non-persistent)
        self.arguments: dict[int, tuple[torch.Tensor, fx.Node]] = {}  # id(a tensor passed in) -> its input
        self.reserved = reserved
        self.prefix = f"{call.path}." if call.path else ""
        if call.parent is not None:
            self._placeholders()
        self._build()

    @classmethod
    def of(cls, graph: fx.Graph) -> OwnerGraph:
        """An OwnerGraph around a graph built before (a retrofitted module's other mode), for splicing."""
        self = cls.__new__(cls)
        self.graph, self.env, self.children, self.constants, self.arguments = graph, {}, {}, {}, {}
        return self

    # -- building ---------------------------------------------------------------------------
    def _placeholders(self) -> None:
        module = self.call.module
        try:
            sig = _signature(module.forward)
            bound = sig.bind(*self.call.args, **self.call.kwargs)
        except (TypeError, ValueError) as err:
            raise CannotRewrite(f"its forward signature cannot be bound ({err})") from None
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            raise CannotRewrite("its forward takes *args or **kwargs")
        # the annotations go into the generated code: TorchScript reads them (Optional[Tensor] = None...)
        holders = {
            p.name: self.graph.placeholder(p.name, type_expr=_annotation(p), default_value=p.default)
            for p in sig.parameters.values()
        }
        for name, value in bound.arguments.items():
            self._bind(holders[name], value)

    def _bind(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, fx.Proxy):
            self.env.setdefault(value.node, node)
        elif isinstance(value, torch.Tensor):  # a tensor the parent computed outside the trace (EVA's rope)
            self.arguments.setdefault(id(value), (value, node))
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if _has_proxy(v):
                    self._bind(self.graph.call_function(operator.getitem, (node, i)), v)
        elif isinstance(value, dict):
            for k, v in value.items():
                if _has_proxy(v):
                    self._bind(self.graph.call_function(operator.getitem, (node, k)), v)

    def _build(self) -> None:
        g = self.graph
        for ev in self.call.events:
            if isinstance(ev, Call):
                if ev.leaf:
                    if ev.node is None:
                        continue
                    args, kwargs = map_arg(ev.node.args, self.lookup), map_arg(ev.node.kwargs, self.lookup)
                else:
                    args, kwargs = self._map(ev.args), self._map(ev.kwargs)
                node = g.call_module(self.relative(ev.path), args, kwargs)
                self.children[id(ev)] = node
                if ev.leaf:
                    self.env[ev.node] = node
            elif N.is_marker(ev):
                node = self.children[id(ev.meta["output_of"])]
                for key in ev.meta["output_path"]:
                    node = g.call_function(operator.getitem, (node, key))
                self.env[ev] = node
            elif ev.op == "get_attr":
                self.env[ev] = self._get_attr(ev.target)
            elif ev.op == "output":
                g.output(map_arg(ev.args[0], self.lookup))
            elif ev.op == "placeholder":
                self.env[ev] = g.placeholder(
                    ev.target, type_expr=ev.type, default_value=ev.args[0] if ev.args else inspect.Parameter.empty
                )
            else:
                self.env[ev] = g.create_node(
                    ev.op,
                    ev.target,
                    map_arg(ev.args, self.lookup),
                    map_arg(ev.kwargs, self.lookup),
                    name=clean_name(ev.name),
                )
        if self.call.parent is not None:
            g.output(self._result(self.call.result))

    def _result(self, value: Any) -> Any:
        """What the rebuilt forward returns: the call's result, with its container types."""
        if type(value) is OrderedDict:  # torchvision's FPN: returned as the same type
            return self.graph.call_function(OrderedDict, ([(k, self._result(v)) for k, v in value.items()],))
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*(self._result(v) for v in value))
        if type(value) in (list, tuple):
            return type(value)(self._result(v) for v in value)
        if type(value) is dict:
            return {k: self._result(v) for k, v in value.items()}
        if isinstance(value, dict):  # a ModelOutput, say: a rebuilt forward would return a plain dict
            raise CannotRewrite(f"it returns a {type(value).__name__}, which a rebuilt forward cannot build")
        return self._map(value)

    def _map(self, value: Any) -> Any:
        """Values passed to or returned by a traced-through call, as arguments of this graph."""

        def convert(a):
            if isinstance(a, fx.Proxy):
                return self.lookup(a.node)
            if isinstance(a, torch.Tensor):
                return self._tensor(a)
            if not isinstance(a, _LITERALS):  # generated code could not spell it
                raise CannotRewrite(f"it passes a {type(a).__name__} value to a submodule")
            return a

        return map_aggregate(value, convert)

    def _tensor(self, t: torch.Tensor) -> fx.Node:
        """A tensor handed over as is: an input of the forward, one of the module's own, or kept as a
        constant."""
        if id(t) in self.arguments:
            return self.arguments[id(t)][1]
        module = self.call.module
        for name, own in itertools.chain(module.named_parameters(), module.named_buffers()):
            if own is t:
                return self.graph.get_attr(name)
        qualified = self.traced.tensor_attrs.get(t)
        if qualified is not None and qualified.startswith(self.prefix):
            return self.graph.get_attr(qualified[len(self.prefix) :])
        return self._constant(t)

    def _constant(self, value: Any) -> fx.Node:
        """A tensor fx kept aside: an input of the forward (the parent passed a tensor it made outside
        the trace: it may pass another next time), else a constant registered on the module."""
        if not isinstance(value, torch.Tensor):
            raise CannotRewrite(f"its forward uses a {type(value).__name__} constant")
        if id(value) in self.arguments:
            return self.arguments[id(value)][1]
        name, k = CONSTANT_PREFIX, 0
        while (
            hasattr(self.call.module, f"{name}{k}") or f"{name}{k}" in self.constants or f"{name}{k}" in self.reserved
        ):
            k += 1
        self.constants[f"{name}{k}"] = value
        return self.graph.get_attr(f"{name}{k}")

    def _get_attr(self, target: str) -> fx.Node:
        if target in self.traced.constants:  # a value fx kept on the traced root for this forward
            return self._constant(self.traced.constants[target])
        return self.graph.get_attr(self.relative(target))

    def lookup(self, n: fx.Node) -> fx.Node:
        found = self.env.get(n)
        if found is not None:
            return found
        if n.op == "get_attr":  # a parameter first read in another call (fx caches their proxies)
            node = self.env[n] = self._get_attr(n.target)
            return node
        raise CannotRewrite(f"its forward reads {n.name}, which it does not receive as an argument")

    def relative(self, path: str) -> str:
        if not path.startswith(self.prefix):
            raise CannotRewrite(f"it uses {path}, which is not one of its submodules")
        return path[len(self.prefix) :]

    # -- splicing -----------------------------------------------------------------------------
    def rep(self, n: fx.Node) -> fx.Node:
        """This level's node for the analysis node ``n`` (it must be computed or received here)."""
        found = self.env.get(n)
        if found is None:
            raise CannotRewrite(f"{n.name} is computed inside a submodule and is not its output")
        return found

    def rep_users(self, value: fx.Node, users: tuple[fx.Node, ...]) -> list[fx.Node]:
        """This level's nodes that read ``value`` on behalf of ``users``: the users themselves, or
        the child calls that contain them (which must then hold no other reader of ``value``)."""
        reps = []
        for u in users:
            if u in self.env:
                reps.append(self.env[u])
                continue
            child = self._child_holding(u)
            others = [w for w in value.users if w not in users and self._child_holding(w) is child]
            if others:
                raise CannotRewrite(f"{child.path} reads the tensor on both sides of the insertion")
            reps.append(self.children[id(child)])
        return reps

    def _child_holding(self, n: fx.Node) -> Call | None:
        c = n.meta["call"]
        while c is not None and c.parent is not self.call:
            c = c.parent
        return c

    def splice(self, value: fx.Node, users: list[fx.Node] | None, name: str) -> None:
        """Insert ``call_module(name)(value)`` and make ``users`` (None: every reader) read it."""
        g = self.graph
        if value.op == "placeholder":
            value_anchor = [n for n in g.nodes if n.op == "placeholder"][-1]
        else:
            value_anchor = value
        with g.inserting_after(value_anchor):
            se = g.call_module(name, (value,))
        if users is None:
            value.replace_all_uses_with(se, delete_user_cb=lambda n: n is not se)
        else:
            for u in users:
                u.replace_input_with(value, se)


def splice_blocks(owner: OwnerGraph, spliced: list[tuple[Any, Any]], names: list[str], fused: list[Any]) -> None:
    """Call the blocks ``names`` on the values of ``spliced`` ((value, users or None) each) in ``owner``'s
    graph; a residual sum in ``fused`` (one per block, or None) is replaced by ``block(value, shortcut)``."""
    # a fused sum -> the block now computing it (a nested unit's branch may end in it)
    graph, replaced = owner.graph, {}
    for (value, users), name, add in zip(spliced, names, fused or [None] * len(spliced)):
        value = replaced.get(value, value)
        if add is None:
            owner.splice(value, users, name)
        else:  # block(value, shortcut) replaces the sum
            a, b = N.add_operands(add)
            with graph.inserting_after(add):
                se = graph.call_module(name, (value, b if a is value else a))
            add.replace_all_uses_with(se)
            graph.erase_node(add)
            replaced[add] = se


def _signature(forward) -> inspect.Signature:
    try:
        return inspect.signature(forward, eval_str=True)  # `from __future__ import annotations` strings
    except Exception:  # an annotation that names what only a type checker imports: left out
        return inspect.signature(forward)


def _annotation(p: inspect.Parameter) -> Any:
    return None if p.annotation is p.empty or isinstance(p.annotation, str) else p.annotation


_LITERALS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    type(Ellipsis),
    torch.dtype,
    torch.device,
    torch.memory_format,
    torch.layout,
)


def _has_proxy(value: Any) -> bool:
    found = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return bool(found)


def clean_name(name: str) -> str:
    """``layer1_0_add_3`` -> ``add``: stable local names, so equal blocks compile to equal code."""
    return re.sub(r"_\d+$", "", name) or name
