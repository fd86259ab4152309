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

Modules fx cannot trace, the model itself included, are *kept*: their forward stays as it is, and the
modules they call are traced as sub-roots with placeholders shaped like what they received in one
recorded forward (:mod:`retrofit.graph.opaque`). Their nodes sit in the same flat graph, each sub-root a
separate island of data flow; a kept call records them as its children.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn
from torch.fx.node import map_aggregate

from ..blocks.se import SqueezeExcite
from ..errors import RetrofitError, first_line
from .code import may_merge
from .forward import traced_as_root
from .opaque import is_plain, not_tensors, rebuild, record_calls, why_not_a_sub_root
from .restore import attributes_kept, eval_caches_cleared


def output_marker(x):
    """Identity; marks a value as the output of the module call recorded in its node's meta."""
    return x


@dataclass(eq=False)
class Call:
    """One module call seen while tracing."""

    path: str  # qualified name of the module ("" for the root)
    module: nn.Module
    parent: Call | None
    leaf: bool  # a leaf is one call_module node; others are traced through
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    result: Any = None  # what the forward returned (Proxies), for non-leaf calls
    events: list = field(default_factory=list)  # fx.Node | Call, in creation order, at this level
    node: fx.Node | None = None  # the call_module node, for leaf calls
    # why this module's own forward is kept as is (retrofit.graph.opaque); its children are then sub-roots
    # traced apart. A kept call inside a traced forward is also a leaf node there; a kept call made
    # by another kept forward (or the kept model itself) has no node.
    kept: str | None = None

    def __repr__(self) -> str:
        return f"Call({self.path or '<root>'}: {type(self.module).__name__})"

    def children(self) -> Iterator[Call]:
        return (e for e in self.events if isinstance(e, Call))

    def walk(self) -> Iterator[Call]:
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


def _copied(value: Any) -> Any:
    """A copy of a forward's result, its lists, tuples and dicts copied with their types (an
    ``OrderedDict`` stays one: a rebuilt forward must return what the original did); any other
    object is kept as it is."""
    return rebuild(value, _copied) if is_plain(value) else value


def level_of(node: fx.Node) -> Call:
    """The call whose own forward made ``node`` (for a leaf module's node: the caller's)."""
    call = node.meta["call"]
    return call.parent if call.leaf else call


@functools.cache
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


def _proxies(value: Any) -> Iterator[fx.Proxy]:
    """Every Proxy in ``value`` (lists, tuples, dicts, nested)."""
    if isinstance(value, fx.Proxy):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _proxies(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _proxies(v)


class RetrofitTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that knows timm's leaves and records the module call tree.

    Args:
        leaf_modules: extra module classes to keep as single nodes.
    """

    def __init__(
        self, leaf_modules: tuple[type[nn.Module], ...] = (), kept: dict[int, str] | None = None, recording: Any = None
    ):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaf_modules = tuple(get_notrace_modules()) + tuple(leaf_modules)
        # ids of module instances whose forward is kept as is, and why (fx failed in them, or a kept
        # forward passes them values other than tensors): leaves, and their callees are sub-roots
        self.kept = dict(kept or {})
        self.recording = recording  # what each module received in one real forward (retrofit.graph.opaque)
        self.left_out: list[tuple[str, str]] = []  # callees of kept forwards not traced, and why
        self.root_call: Call | None = None
        self.failed_in: Call | None = None  # innermost call where tracing raised
        self._stack: list[Call] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self._is_layer(m) or id(m) in self.kept

    def _is_layer(self, m: nn.Module) -> bool:
        return isinstance(m, self.leaf_modules) or _is_torch_layer(type(m))

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self.root_call = Call("", root, None, leaf=False, kept=self.kept.get(id(root)))
        self._stack = [self.root_call]
        with traced_as_root(self, root):  # a root retrofitted before: its rewritten forward, not its class's
            graph = super().trace(root, concrete_args)
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        self.root_call.result = output.args[0]
        return graph

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        if self.root_call is None or self.root_call.kept is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)

        def kept_forward(root):  # stands for the model's own forward: its callees, each on its own
            return tuple(_proxies(self._descend(self.root_call)))

        return kept_forward, [self.root]

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        call = self._stack[-1]
        node.meta["call"] = call
        call.events.append(node)
        return node

    def call_module(self, m, forward, args, kwargs):
        if getattr(m, "fuses_residual_sum", False) and len(args) == 2 and not kwargs:
            # an SE block fused with its residual sum (retrofit.blocks.se): analysed as the block, then the sum
            return self.call_module(m, forward, args[:1], {}) + args[1]
        path = self.path_of_module(m)
        # copies of the containers: a forward may change a list it was given (HRNet's x[i] = ...)
        call = Call(
            path,
            m,
            self._stack[-1],
            self.is_leaf_module(m, path),
            map_aggregate(args, _same),
            map_aggregate(dict(kwargs), _same),
            kept=self.kept.get(id(m)),
        )
        self._stack[-1].events.append(call)
        self._stack.append(call)
        try:
            out = super().call_module(m, forward, args, kwargs)
            if call.kept is not None:  # one node in this forward; what it calls is traced apart
                self._descend(call)
        except Exception:
            self.failed_in = self.failed_in or call
            raise
        finally:
            self._stack.pop()
        if call.leaf:
            call.node = out.node if isinstance(out, fx.Proxy) else None
            return out
        call.result = _copied(out)
        return self._mark(call, out, ())

    # -- kept forwards (retrofit.graph.opaque) -------------------------------------------------------
    def _descend(self, call: Call) -> list:
        """Trace the calls the kept forward of ``call`` made in the recorded run, each as a sub-root
        fed by placeholders of the shapes it received there; return what they return."""
        record = self.recording.of(call.module) if self.recording is not None else None
        results = []
        for callee in record.callees if record is not None else ():
            why = why_not_a_sub_root(callee, self.recording)
            name = type(callee.module).__name__
            if why is not None and why.startswith("called"):
                self.left_out.append(
                    (callee.path, f"{name} is {why} by a forward kept as is: left as it is, no site inside")
                )
                continue
            if self._is_layer(callee.module):  # one node: literal arguments are fine, objects are not
                odd = not_tensors((callee.args, callee.kwargs), literals=True)
                if odd is not None:
                    self.left_out.append((callee.path, f"{name} gets {odd} from a forward kept as is: no node"))
                    continue
            elif why is not None or id(callee.module) in self.kept:
                reason = self.kept.setdefault(id(callee.module), f"{name} {why}")
                sub = Call(callee.path, callee.module, call, leaf=False, kept=reason)
                call.events.append(sub)
                self._stack.append(sub)
                try:
                    results.append(self._descend(sub))
                finally:
                    self._stack.pop()
                continue
            args, kwargs = self._placeholders(callee)
            results.append(callee.module(*args, **kwargs))  # through call_module: traced (or a leaf node)
        return results

    def _placeholders(self, callee) -> tuple[tuple, dict]:
        """The recorded arguments of ``callee`` with each tensor a new placeholder (shaped like it)."""
        stem = callee.path.replace(".", "_") or "input"

        def holder(value):
            if isinstance(value, torch.Tensor):
                proxy = self.create_proxy("placeholder", stem, (), {})
                proxy.node.meta["example"] = value  # a meta tensor: what shape propagation feeds it
                return proxy
            if is_plain(value):
                return rebuild(value, holder)
            return value

        return holder(callee.args), holder(callee.kwargs)

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
    # (module path, what happened to it): modules kept as is, or left out, and why (one line each)
    opaque: list[tuple[str, str]] = field(default_factory=list)
    # height and width of the image the model's feature maps are measured against (strides, stages,
    # token grids); None: the input's. See `image_size`.
    image: tuple[int, int] | None = None
    needs_real_run: bool = False  # a kept module could not be gone into on meta weights (retrofit.measure.meta)

    def calls(self) -> Iterator[Call]:
        return self.root_call.walk()

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the image the model's features are measured against. The input's, unless
        the model's own forward is kept (a detector resizes its input before the backbone sees it):
        then the largest 4-d input a traced part received in the recorded run."""
        return self.image or tuple(self.input_size[-2:])


# How many modules may be kept as is before a model counts as untraceable: each costs a new trace.
MAX_OPAQUE = 32


def trace(model: nn.Module, input_size: tuple[int, ...], none_inputs: bool = False) -> Traced:
    """Trace ``model`` (any ``nn.Module`` or ``fx.GraphModule``) with :class:`RetrofitTracer`.

    Graceful degradation: when fx fails inside a module, the model itself included (data-dependent
    control flow, a loop over a list of images, a ``ModelOutput``), that module's forward is kept as
    it is: it is one opaque node where a traced forward calls it, and the modules it calls are traced
    on their own with what they received in one recorded forward (:mod:`retrofit.graph.opaque`), so every
    maximal traceable subtree is analysed as usual. ``Traced.opaque`` lists each kept module with the
    reason (the site analysis reports them as skipped), and so are timm's notrace modules that hold
    layers of their own (:func:`notrace_blocks`): whatever they hold is one node to the pass.
    ``none_inputs``: trace the forward's optional inputs that default to None as None (see
    :func:`retrofit.surgery.sites.scan`, which retries so when shapes fail on the traced graph).

    Raises:
        RetrofitError: fx fails in more than ``MAX_OPAQUE`` modules, or the model's own forward cannot
            be traced and the model does not run on a random input of ``input_size``.
    """
    kept: dict[int, str] = {}  # id(module) -> why its forward is kept
    recording, cannot_record = None, None
    while True:
        # SqueezeExcite a leaf: a retrofitted model re-traces with one node per block
        tracer = RetrofitTracer(leaf_modules=(SqueezeExcite,), kept=kept, recording=recording)
        constants: dict[str, Any] = {}
        try:
            with attributes_kept(model, constants), eval_caches_cleared(model):
                graph = tracer.trace(model, concrete_args=none_defaults(model) if none_inputs else None)
            break
        except Exception as err:  # fx raises many kinds: TraceError, TypeError, NameError...
            where = tracer.failed_in
            module = model if where is None else where.module
            path = "" if where is None else where.path
            reason = first_line(err)
            if id(module) in kept or len(kept) >= MAX_OPAQUE or isinstance(err, RetrofitError):
                inside = f", in its module {path} ({type(module).__name__})" if path else ""
                raise RetrofitError(
                    f"torch.fx cannot trace {type(model).__name__}{inside}: {reason}; "
                    f"mark that module as a leaf with timm.layers.register_notrace_module "
                    f"or pass a model fx can trace"
                ) from err
            kept[id(module)] = f"torch.fx cannot trace {type(module).__name__}: {reason}"
            if recording is None and cannot_record is None:
                try:
                    recording = record_calls(model, input_size)
                except RetrofitError as run_err:
                    if module is model:
                        raise RetrofitError(
                            f"torch.fx cannot trace {type(model).__name__}: {reason}; and {run_err}"
                        ) from err
                    cannot_record = str(run_err)  # inner modules: kept as opaque nodes, not gone into
    opaque = [
        (call.path, _kept_line(call, recording, cannot_record))
        for call in tracer.root_call.walk()
        if call.kept is not None
    ]
    traced = Traced(
        model,
        graph,
        tracer.root_call,
        tuple(input_size),
        constants,
        dict(tracer.tensor_attrs),
        opaque + tracer.left_out + notrace_blocks(tracer.root_call),
    )
    traced.needs_real_run = cannot_record is not None and any(p.is_meta for p in model.parameters())
    if tracer.root_call.kept is not None:
        traced.image = _image_seen(graph)
    return traced


def notrace_blocks(root: Call) -> list[tuple[str, str]]:
    """The modules timm marks untraceable (``register_notrace_module``) that hold layers of their own
    and add or concatenate something (TinyViT's ``TinyVitBlock``, NF-Net's ``NormFreeBlock``): fx keeps
    each as one node, so a residual unit inside one is out of the pass's sight. One line each, as for a
    kept forward. A layer timm registers (``StdConv2d``, ``BatchNormAct2d``) or a stack without a merge
    (VGG's ``ConvMlp``) has no unit inside to miss."""
    notrace = tuple(get_notrace_modules())
    found: dict[str, str] = {}
    for call in root.walk():
        module = call.module
        if (
            call.leaf
            and isinstance(module, notrace)
            and not isinstance(module, SqueezeExcite)
            and not _is_torch_layer(type(module))
            and _may_hold_a_unit(module)
        ):
            found.setdefault(
                call.path,
                f"{type(module).__name__} is a timm notrace module (register_notrace_module): "
                "fx keeps it as one node, no site inside it is seen; `at:` puts a block on "
                "its output",
            )
    return list(found.items())


def _may_hold_a_unit(module: nn.Module) -> bool:
    """Weighted layers below it, and an addition or concatenation in its code or its children's."""
    return any(p.dim() > 1 for c in module.children() for p in c.parameters()) and any(
        may_merge(type(m)) for m in module.modules() if not _is_torch_layer(type(m))
    )


def _kept_line(call: Call, recording, cannot_record: str | None) -> str:
    """One line on a kept module: why, and what the pass did about it."""
    if recording is None:
        return f"{call.kept}; kept as one opaque node, no site inside (not gone into: {cannot_record})"
    record = recording.of(call.module)
    if record is None:
        return f"{call.kept}; kept as one opaque node, not called in the recorded forward: no site inside"
    if not record.callees:
        return f"{call.kept}; its forward is kept as is (it calls no module): no site inside"
    return (
        f"{call.kept}; its forward is kept as is, the {len(record.callees)} module call(s) it makes "
        f"are analysed on their own"
    )


def _image_seen(graph: fx.Graph) -> tuple[int, int] | None:
    """The largest (H, W) of the 4-d floating-point inputs the traced parts got in the recorded run."""
    sizes = [
        tuple(v.shape[-2:])
        for n in graph.nodes
        if n.op == "placeholder"
        and isinstance(v := n.meta.get("example"), torch.Tensor)
        and v.dim() == 4
        and v.is_floating_point()
    ]
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def none_defaults(model: nn.Module) -> dict[str, Any] | None:
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
