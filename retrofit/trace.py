"""Trace a model into one flat fx graph that remembers which module call made each node.

The flat graph is what the site analysis reads: a residual branch may start in one module and merge
in another, so the whole data flow must be in one graph. Surgery, in turn, must rewrite one module's
own ``forward`` and nothing else, so the tracer also records the *call tree*: for every module call,
the nodes and child calls made at that level, in order, with the call's arguments and result.

Every result of a traced-through (non-leaf) call is routed through an identity *marker* node, so a
child that returns its input unchanged (``DropPath`` in eval mode, say) still leaves a trace of the
call; without it, the parent's use of "the child's output" could not be told from a use of the input.
The markers exist only in this analysis graph, never in a rewritten forward.

Leaves: torch's layers and their subclasses (timm's ``StdConv2d``, ``BatchNormAct2d``...), timm's
notrace modules (``timm.layers.register_notrace_module``) and functions (``register_notrace_function``)
— the same registries timm's own feature extraction uses.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import fx, nn
from torch.fx.node import map_aggregate
from timm.layers import get_notrace_functions, get_notrace_modules

from .errors import RetrofitError, first_line
from .graph_forward import traced_as_root


def output_marker(x):
    """Identity; marks a value as the output of the module call recorded in its node's meta."""
    return x


@dataclass(eq=False)
class Call:
    """One module call seen while tracing."""

    path: str                     # qualified name of the module ("" for the root)
    module: nn.Module
    parent: "Call | None"
    leaf: bool                    # a leaf is one call_module node; others are traced through
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    result: Any = None            # what the forward returned (Proxies), for non-leaf calls
    events: list = field(default_factory=list)  # fx.Node | Call, in creation order, at this level
    node: fx.Node | None = None   # the call_module node, for leaf calls

    def __repr__(self) -> str:
        return f"Call({self.path or '<root>'}: {type(self.module).__name__})"

    def children(self) -> Iterator["Call"]:
        return (e for e in self.events if isinstance(e, Call))

    def walk(self) -> Iterator["Call"]:
        """This call and every call below it."""
        yield self
        for child in self.children():
            yield from child.walk()

    def nodes(self) -> Iterator[fx.Node]:
        """Every node made during this call, children's included, in order."""
        for e in self.events:
            if isinstance(e, Call):
                if e.leaf:
                    if e.node is not None:
                        yield e.node
                else:
                    yield from e.nodes()
            else:
                yield e


def _same(value: Any) -> Any:
    return value


def level_of(node: fx.Node) -> Call:
    """The call whose own forward made ``node`` (for a leaf module's node: the caller's)."""
    call = node.meta["call"]
    return call.parent if call.leaf else call


@functools.lru_cache(maxsize=None)
def _is_torch_layer(cls: type) -> bool:
    """A torch.nn layer or a subclass of one (containers excluded)."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    for base in cls.__mro__:
        if base is nn.Module or base in containers:
            continue
        module = getattr(base, "__module__", "")
        if module.startswith(("torch.nn.", "torch.ao.nn.")):
            return True
    return False


class RetrofitTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that knows timm's leaves and records the module call tree.

    Args:
        leaf_modules: extra module classes to keep as single nodes.
    """

    def __init__(self, leaf_modules: tuple[type[nn.Module], ...] = (), opaque: frozenset[int] = frozenset()):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaf_modules = tuple(get_notrace_modules()) + tuple(leaf_modules)
        self.opaque = opaque  # ids of module instances fx failed to trace through: kept as leaves
        self.root_call: Call | None = None
        self.failed_in: Call | None = None  # innermost call where tracing raised
        self._stack: list[Call] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_modules) or _is_torch_layer(type(m)) or id(m) in self.opaque

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.root_call = Call("", root, None, leaf=False)
        self._stack = [self.root_call]
        with traced_as_root(self, root):  # a root retrofitted before: its rewritten forward, not its class's
            graph = super().trace(root, concrete_args)
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        self.root_call.result = output.args[0]
        return graph

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        call = self._stack[-1]
        node.meta["call"] = call
        call.events.append(node)
        return node

    def call_module(self, m, forward, args, kwargs):
        if getattr(m, "fuses_residual_sum", False) and len(args) == 2 and not kwargs:
            # an SE block fused with its residual sum (retrofit.se): analysed as the block, then the sum
            return self.call_module(m, forward, args[:1], {}) + args[1]
        path = self.path_of_module(m)
        # copies of the containers: a forward may change a list it was given (HRNet's x[i] = ...)
        call = Call(path, m, self._stack[-1], self.is_leaf_module(m, path), map_aggregate(args, _same),
                    map_aggregate(dict(kwargs), _same))
        self._stack[-1].events.append(call)
        self._stack.append(call)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or call
            raise
        finally:
            self._stack.pop()
        if call.leaf:
            call.node = out.node if isinstance(out, fx.Proxy) else None
            return out
        call.result = map_aggregate(out, _same)
        return self._mark(call, out, ())

    def _mark(self, call: Call, value: Any, path: tuple) -> Any:
        if isinstance(value, fx.Proxy):
            proxy = self.create_proxy("call_function", output_marker, (value,), {})
            proxy.node.meta["output_of"] = call
            proxy.node.meta["output_path"] = path
            return proxy
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            return type(value)(*(self._mark(call, v, path + (i,)) for i, v in enumerate(value)))
        if isinstance(value, (tuple, list)):
            return type(value)(self._mark(call, v, path + (i,)) for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: self._mark(call, v, path + (k,)) for k, v in value.items()}
        return value


@dataclass(eq=False)
class Traced:
    """A model's flat analysis graph, its call tree and (after shape propagation) its shapes.

    ``constants``: values fx stores as new attributes of the traced root (``_tensor_constant0``...,
    for tensors a forward makes); they are taken back off the model and kept here, so tracing leaves
    the model untouched. ``tensor_attrs``: plain tensor attributes of the modules, by identity.
    """

    model: nn.Module
    graph: fx.Graph
    root_call: Call
    input_size: tuple[int, ...]
    constants: dict[str, Any] = field(default_factory=dict)
    tensor_attrs: dict = field(default_factory=dict)
    opaque: list[tuple[str, str]] = field(default_factory=list)  # (module path, why fx failed in it)

    def calls(self) -> Iterator[Call]:
        return self.root_call.walk()


# How many modules may be made opaque before a model counts as untraceable: each costs a new trace.
MAX_OPAQUE = 16


def trace(model: nn.Module, input_size: tuple[int, ...], none_inputs: bool = False) -> Traced:
    """Trace ``model`` (any ``nn.Module`` or ``fx.GraphModule``) with :class:`RetrofitTracer`.

    Graceful degradation: when fx fails inside a submodule (data-dependent control flow, say), that
    module instance is kept as one opaque leaf node and the model is traced again; the rest of the
    model is analysed as usual, and ``Traced.opaque`` lists each such module with the reason (the site
    analysis reports them as skipped). Sites inside an opaque module are not seen.
    ``none_inputs``: trace the forward's optional inputs that default to None as None (see
    :func:`retrofit.sites.scan`, which retries so when shapes fail on the traced graph).

    Raises:
        RetrofitError: when fx cannot trace the model's own forward (or more than ``MAX_OPAQUE``
            submodules), with the module and the reason.
    """
    from .se import SqueezeExcite  # leaf: a retrofitted model re-traces with one node per block

    opaque: dict[int, tuple[str, str]] = {}
    while True:
        tracer = RetrofitTracer(leaf_modules=(SqueezeExcite,), opaque=frozenset(opaque))
        constants: dict[str, Any] = {}
        try:
            with attributes_kept(model, constants), eval_caches_cleared(model):
                graph = tracer.trace(model, concrete_args=_none_defaults(model) if none_inputs else None)
            break
        except Exception as err:  # fx raises many kinds: TraceError, TypeError, NameError...
            where = tracer.failed_in
            reason = first_line(err)
            if where is not None and where.parent is not None and id(where.module) not in opaque \
                    and len(opaque) < MAX_OPAQUE:
                opaque[id(where.module)] = (where.path, f"{type(where.module).__name__}: {reason}")
                continue
            inside = f", in its module {where.path} ({type(where.module).__name__})" if where else ""
            raise RetrofitError(f"torch.fx cannot trace {type(model).__name__}{inside}: {reason}; "
                                f"mark that module as a leaf with timm.layers.register_notrace_module "
                                f"or pass a model fx can trace") from err
    return Traced(model, graph, tracer.root_call, tuple(input_size), constants, dict(tracer.tensor_attrs),
                  list(opaque.values()))


def _none_defaults(model: nn.Module) -> dict[str, Any] | None:
    """Optional inputs after the first that default to None (Hiera's ``mask``) are traced as None:
    a placeholder would make ``if mask is not None`` take the branch the model is not called with."""
    if isinstance(model, fx.GraphModule):
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    found = {p.name: None for p in params if p.default is None and p.kind is p.POSITIONAL_OR_KEYWORD}
    return found or None


@contextlib.contextmanager
def eval_caches_cleared(model: nn.Module):
    """Empty the caches eval-mode forwards fill (timm's LeViT and EfficientFormer attention biases)
    before and after tracing: a trace would read a cached tensor as a constant, and a traced eval
    forward would leave fx Proxies in the user's model. Those modules clear their caches in
    ``train()``; the training flags are put back as they were, so the model's mode is unchanged."""
    def clear():
        if any(type(m).train is not nn.Module.train for m in model.modules()):
            modes = [(m, m.training) for m in model.modules()]
            model.train()
            for m, mode in modes:
                m.training = mode
    clear()
    try:
        yield
    finally:
        clear()


@contextlib.contextmanager
def attributes_kept(module: nn.Module, taken: dict[str, Any]):
    """Undo the attributes fx's ``create_arg`` sets on the traced root, moving them into ``taken``."""
    before = set(module.__dict__)
    try:
        yield
    finally:
        for name in set(module.__dict__) - before:
            taken[name] = module.__dict__.pop(name)
