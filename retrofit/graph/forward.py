"""A module's ``forward`` regenerated from edited fx graphs, installed on the module instance.

Surgery installs the rewritten forward on the *instance* (``module.forward``): the module keeps its
class (``isinstance`` checks, ``zero_init_last`` and every other method still work), its submodules
and its state-dict keys; only what its forward computes changes. ``torch.fx.GraphModule`` generates
code too, but as a new module of a new class: here the generated code runs with the original instance
as ``self``. What is installed, and why:

* ``module.forward`` is a real bound method of a :class:`GraphForward`, the per-instance holder of the
  graphs. It finds its module at call time through a weak reference (the module holds its forward: a
  strong reference back would make every retrofitted model a reference cycle, freed only by the
  garbage collector, not when dropped) and runs the code of the module's current mode,
  ``graphs[module.training]``. A module whose own forward differs between train and eval mode gets one
  graph per mode, as torchvision's ``feature_extraction`` keeps a train and an eval graph, and
  follows ``train()``/``eval()``; the other modules have one graph for both.
* TorchScript compiles a method from its source: the bound function's ``__wrapped__`` is the
  generated ``forward(self, ...)``, whose source is registered in ``linecache`` (as fx does for a
  GraphModule) and whose globals are the names it uses; a two-mode forward is one function with both
  bodies under ``if self.training:``. So ``torch.jit.script(model)`` scripts the rewritten forwards,
  and ``inspect.signature(module.forward)`` shows the forward's own parameters. TorchScript compiles
  one forward per class and set of attributes: the module also gets a constant naming its generated
  code (``_retrofit_forward``, listed in an instance ``__constants__``), so a rewritten module does
  not share the class's forward, or another rewrite's.
* ``module._replicate_for_data_parallel`` (what ``nn.DataParallel``'s ``replicate`` calls on every
  module) gives each replica a holder of its own: a replica's ``__dict__`` is a shallow copy of the
  module's, and a forward still bound to the original would compute with the original's weights.
* ``torch.save(model)``/pickle stores the graphs as plain node lists and compiles them again on load
  (a function pickle cannot name, such as ``F.max_pool2d``, a local ``boolean_dispatch`` wrapper, is
  stored under the public name it is imported by); ``copy.deepcopy`` (EMA copies) shares the compiled
  code, which is never mutated. Equal graphs (the units of a stage) are compiled once.

* A rewritten forward is specialised to the Python values its module's forward read when it was
  traced (a Swin block's window size and shift, a flag, a submodule that is None), as any fx code is:
  the holder keeps them (:class:`Specialisation`), compares them before each call, and when one has
  changed (timm's ``set_input_size``) it derives the forward again from the module's class forward
  with the values it has now (:mod:`retrofit.graph.specialise`) and installs that. TorchScript asks
  every module to prepare itself before it compiles (``__prepare_scriptable__``): it gets the current
  forward too, and so does an fx tracer through :func:`traced_as_root`.

``module.forward.code`` shows the generated source; :func:`installed` returns the holder (its
``graph``, ``graphs``, ``two_modes``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
import linecache
import pickle
import re
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from ..errors import RetrofitError

_COMPILED: dict[tuple, Compiled] = {}
_COUNTER = itertools.count()
_DEF = "def forward("
_CODE_ATTRIBUTE = "_retrofit_forward"
_TRACED = "_retrofit_traced_forward"  # a class attribute only while an fx tracer traces a retrofitted root
INSTALLED = (
    "forward",
    "_replicate_for_data_parallel",
    "__constants__",
    _CODE_ATTRIBUTE,
    "__prepare_scriptable__",
)  # instance attributes


@dataclass(frozen=True)
class Compiled:
    """The code of one set of graphs: what runs in each mode, and the function bound as the forward."""

    fns: dict[bool, Callable]  # training flag -> forward(module, ...) generated from that mode's graph
    method: Callable  # forward(holder, ...): runs fns[module.training]; __wrapped__: the scripted source
    code: str
    name: str  # the file name of the code, one per compiled structure


# The function installed as every rewritten forward, appended to each generated source: it shares the
# file (and so the name TorchScript reports errors under) of the forward TorchScript reads.
_CALL = """

def _retrofit_call(holder, *args, **kwargs):
    module = holder.module
    if holder.specialised is not None and holder.specialised.stale(module):
        holder = holder.specialised.again(module, holder)
    return holder.fns[module.training](module, *args, **kwargs)
"""


def _exec(src: str, globals_: dict[str, Any], label: str) -> dict[str, Any]:
    filename = f"<retrofit forward of {label} #{next(_COUNTER)}>"  # what tracebacks and TorchScript errors name
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # tracebacks, inspect, jit
    namespace = dict(globals_, __file__=filename)
    exec(compile(src, filename, "exec", dont_inherit=True), namespace)  # not this file's future annotations
    return namespace


def compile_graphs(graphs: dict[bool, fx.Graph], label: str = "a module") -> Compiled:
    """Generate and compile the code of ``graphs`` ({True: train graph, False: eval graph}, the same
    graph for a mode-independent forward); equal structures are compiled once. ``label`` (the module's
    class) goes into the file name the code is registered under."""
    train, evaluation = graphs[True], graphs[False]
    key = (_structure(train),) if train is evaluation else (_structure(train), _structure(evaluation))
    if None not in key and key in _COMPILED:
        return _COMPILED[key]
    if train is evaluation:
        code = train.python_code(root_module="self")
        src = code.src
        namespace = _exec(src + _CALL, code.globals, label)
        fns = {True: namespace["forward"], False: namespace["forward"]}
    else:
        codes = {mode: g.python_code(root_module="self") for mode, g in graphs.items()}
        fns = {
            mode: _exec(c.src, c.globals, f"{label}, {'train' if mode else 'eval'} mode")["forward"]
            for mode, c in codes.items()
        }
        src, globals_ = _two_mode_source(codes[True], codes[False])
        namespace = _exec(src + _CALL, globals_, label)  # its forward: read by TorchScript and inspect, never run
    method = namespace["_retrofit_call"]
    method.__name__ = method.__qualname__ = "forward"  # pickle looks the bound method up by name
    method.__wrapped__ = namespace["forward"]
    method.__doc__ = "The forward rewritten by retrofit (see retrofit.graph.forward)."
    method.code = src
    compiled = Compiled(fns, method, src, namespace["__file__"])
    if None not in key:
        _COMPILED[key] = compiled
    return compiled


def _two_mode_source(train: fx.graph.PythonCode, evaluation: fx.graph.PythonCode) -> tuple[str, dict]:
    """One ``forward`` holding both bodies under ``if self.training:``, for TorchScript: it compiles
    the train/eval switch itself (``training`` is an attribute of every scripted module)."""
    head, definition, train_body = _split(train.src)
    eval_head, eval_definition, eval_body = _split(evaluation.src)
    if definition != eval_definition:
        raise RetrofitError(
            f"the train and eval forwards take different parameters ({definition} vs {eval_definition})"
        )
    namespace = dict(train.globals)
    for name, value in evaluation.globals.items():
        if name in namespace and namespace[name] is not value:  # two objects under one name: rename
            new = next(f"{name}_eval{k}" for k in itertools.count() if f"{name}_eval{k}" not in namespace)
            eval_body = [re.sub(rf"(?<![\w.]){re.escape(name)}\b", new, line) for line in eval_body]
            name = new
        namespace[name] = value
    head += [line for line in eval_head if line not in head]
    lines = [
        *head,
        definition,
        "    if self.training:",
        *("    " + _kept(x) for x in train_body),
        "    else:",
        *("    " + _kept(x) for x in eval_body),
    ]
    return "\n".join(lines) + "\n", namespace


def _kept(line: str) -> str:
    """A line without fx's ``;  x = y = None`` (memory released early): in a branch, TorchScript
    refuses to give a variable of the enclosing scope another type."""
    return re.sub(r";  (?:\w+ = )+None$", "", line)


def _split(src: str) -> tuple[list[str], str, list[str]]:
    """fx's code as (lines before the def, the def line, the body lines)."""
    lines = src.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(_DEF))
    return lines[:at], lines[at], [line for line in lines[at + 1 :] if line.strip()]


def _structure(graph: fx.Graph) -> tuple | None:
    """A hashable description of the graph's code (names, ops, targets, arguments, types), or None."""

    def arg(a):
        if isinstance(a, fx.Node):
            return ("%", a.name)
        if isinstance(a, (tuple, list)):
            return (type(a).__name__, *map(arg, a))
        if isinstance(a, dict):
            return ("dict", *((k, arg(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", arg(a.start), arg(a.stop), arg(a.step))
        return (type(a), a)

    try:
        key = tuple((n.op, n.name, n.target, arg(n.args), arg(n.kwargs), n.type) for n in graph.nodes)
        hash(key)
        return key
    except TypeError:  # an unhashable constant: compile without caching
        return None


# -- what a forward was traced with -----------------------------------------------------------------
_ABSENT = object()  # an attribute the module no longer has
_WHERE = ("d", "p", "b", "m")  # a watched name is in __dict__, _parameters, _buffers or _modules
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, Enum)


def plain(value: Any) -> bool:
    """A value fx code holds as a constant and ``==`` compares: literals, dtypes, devices, enums, and
    tuples, lists, sets and dicts of them."""
    if isinstance(value, _PLAIN):
        return True
    if type(value) in (tuple, list, set, frozenset):
        return all(plain(v) for v in value)
    if type(value) is dict:
        return all(plain(k) and plain(v) for k, v in value.items())
    return False


def observe(module: nn.Module, watched: tuple[tuple[str, int], ...]) -> tuple:
    """What the ``watched`` attributes of ``module`` are now: a plain value (a copy: a list changed in
    place must not change the record), or whether a parameter, buffer or submodule is None."""
    d = module.__dict__
    where = (d, d["_parameters"], d["_buffers"], d["_modules"])
    out = []
    for name, kind in watched:
        value = where[kind].get(name, _ABSENT)
        out.append(value is None if kind else value if value is _ABSENT else copy.deepcopy(value))
    return tuple(out)


def _stale_check(watched: tuple[tuple[str, int], ...], values: tuple) -> Callable[[nn.Module], bool]:
    """``stale(module)``: whether a watched attribute differs from ``values``, as one generated
    expression (every call of the forward runs it: a loop over the names costs several times more)."""
    if not watched:
        return _never
    reads = ", ".join(f"{_WHERE[kind]}.get({name!r}, _ABSENT)" + (" is None" if kind else "") for name, kind in watched)
    src = (
        f"def stale(module):\n    d = module.__dict__\n"
        f"    p, b, m = d['_parameters'], d['_buffers'], d['_modules']\n    return ({reads},) != values\n"
    )
    namespace = {"values": values, "_ABSENT": _ABSENT}
    exec(compile(src, "<retrofit specialisation check>", "exec"), namespace)
    return namespace["stale"]


def _never(module: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class Specialisation:
    """The values a rewritten forward was traced with, and how to derive it again when they change.

    ``watched``: (name, where) of the module's attributes its class forward names (where 0: a plain
    value in ``__dict__``, compared by value; 1, 2, 3: a parameter, buffer or submodule, compared by
    being None); ``values``: what they were (:func:`observe`). ``blocks``: the inserted blocks'
    attribute names; ``was_none``: those that took the place of a None attribute (timm's
    ``self.se = None``), which the class forward tests. ``again(module, holder)`` derives, installs
    and returns the forward for the values the module has now
    (:func:`retrofit.graph.specialise.respecialise`).
    """

    watched: tuple[tuple[str, int], ...]
    values: tuple
    blocks: tuple[str, ...]
    was_none: tuple[str, ...]
    again: Callable[[nn.Module, GraphForward], GraphForward]
    stale: Callable[[nn.Module], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "stale", _stale_check(self.watched, self.values))

    def __reduce__(self):
        return Specialisation, (self.watched, self.values, self.blocks, self.was_none, self.again)

    def changed(self, module: nn.Module) -> list[str]:
        """``name: old -> new`` for each watched attribute that differs now."""
        now = observe(module, self.watched)
        return [
            f"{name}: {_shown(kind, a)} -> {_shown(kind, b)}"
            for (name, kind), a, b in zip(self.watched, self.values, now)
            if a != b
        ]


def _shown(kind: int, value: Any) -> str:
    if kind:
        return "None" if value else "set"
    return "absent" if value is _ABSENT else repr(value)[:40]


class GraphForward:
    """The rewritten ``forward`` of ``module``: runs ``graphs[module.training]`` with ``module`` as ``self``.

    It holds its module weakly (see the module docstring); :meth:`install` puts its bound methods on
    the module.
    """

    def __init__(
        self,
        module: nn.Module,
        graphs: dict[bool, fx.Graph],
        compiled: Compiled | None = None,
        specialised: Specialisation | None = None,
    ):
        self._module = weakref.ref(module)
        self.graphs = graphs
        self.compiled = compiled or compile_graphs(graphs, type(module).__qualname__)
        self.fns = self.compiled.fns
        self.specialised = specialised

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise ReferenceError("the module of this forward no longer exists")
        return module

    @property
    def code(self) -> str:
        return self.compiled.code

    @property
    def graph(self) -> fx.Graph:
        """The graph the module runs in its current mode."""
        return self.graphs[self.module.training]

    @property
    def two_modes(self) -> bool:
        """Whether train and eval mode run different graphs."""
        return self.graphs[True] is not self.graphs[False]

    @property
    def forward(self) -> types.MethodType:
        """What ``module.forward`` is (and what unpickling looks the forward up as)."""
        return types.MethodType(self.compiled.method, self)

    def install(self) -> None:
        module = self.module
        module.__dict__["forward"] = self.forward
        module.__dict__["_replicate_for_data_parallel"] = self._replicate_for_data_parallel
        # TorchScript compiles the methods of modules of one class and of equal attributes once, and
        # gives the other instances that code: a constant naming the compiled code keeps a rewritten
        # module from sharing the class's forward, or another rewrite's
        module.__dict__["__constants__"] = [*getattr(type(module), "__constants__", ()), _CODE_ATTRIBUTE]
        module.__dict__[_CODE_ATTRIBUTE] = self.compiled.name
        module.__dict__["__prepare_scriptable__"] = self._prepare_scriptable

    def current(self) -> GraphForward:
        """The module's forward for the attributes it has now: this one, or one derived again (and
        installed) when a value it was traced with has changed since."""
        module, spec = self.module, self.specialised
        return spec.again(module, self) if spec is not None and spec.stale(module) else self

    def _prepare_scriptable(self) -> nn.Module:
        """What ``torch.jit.script`` calls on each module before compiling it: the forward it reads
        is then the current one."""
        self.current()
        return self.module

    def _replicate_for_data_parallel(self) -> nn.Module:
        """``nn.Module._replicate_for_data_parallel``, with a forward of the replica's own."""
        module = self.module
        replica = type(module)._replicate_for_data_parallel(module)
        GraphForward(replica, self.graphs, self.compiled, self.specialised).install()
        return replica

    def __reduce__(self):
        module = self.module
        rows = {id(g): _flatten(g, module) for g in self.graphs.values()}  # one list when both modes share
        return _restore, (module, {mode: rows[id(g)] for mode, g in self.graphs.items()}, self.specialised)

    def __deepcopy__(self, memo: dict) -> GraphForward:
        # the copy of the module (memo: the one being copied); graphs and compiled code are shared
        return GraphForward(copy.deepcopy(self.module, memo), self.graphs, self.compiled, self.specialised)

    def __repr__(self) -> str:
        modes = ", train/eval" if self.two_modes else ""
        return f"GraphForward({type(self.module).__name__}, {len(self.graphs[True].nodes)} nodes{modes})"


def installed(module: nn.Module) -> GraphForward | None:
    """The holder of ``module``'s rewritten forward, or None if it runs its class's forward."""
    forward = module.__dict__.get("forward")
    holder = getattr(forward, "__self__", None)
    return holder if isinstance(holder, GraphForward) else None


def uninstall(module: nn.Module) -> None:
    """Give ``module`` its class's forward back."""
    if installed(module) is not None:
        for name in INSTALLED:
            module.__dict__.pop(name, None)


def forward_state(module: nn.Module) -> Any:
    """What makes ``module``'s forward what it is now (a GraphModule's graph, or the instance attributes
    :func:`install_forward` sets), for :func:`restore_forward` to put back."""
    if isinstance(module, fx.GraphModule):
        return module.graph
    return {name: module.__dict__[name] for name in INSTALLED if name in module.__dict__}


def restore_forward(module: nn.Module, state: Any) -> None:
    """Give ``module`` back the forward :func:`forward_state` saw (an install undone)."""
    if isinstance(module, fx.GraphModule):
        module.graph = state
        module.recompile()
        return
    for name in INSTALLED:
        module.__dict__.pop(name, None)
    module.__dict__.update(state)


@contextlib.contextmanager
def traced_as_root(tracer: fx.Tracer, root: Any):
    """Make ``tracer`` trace the forward installed on ``root``. fx traces a root module's *class*
    forward (``type(root).forward``), not one installed on the instance, so a module whose own forward
    was rewritten would be traced as it was before: while tracing, the installed code of the root's
    mode is put on the class under a private name, and the tracer traces that name. Whatever way the
    trace ends (a tracer that raises included), the class and the tracer are put back as they were: a
    trace nested in another one (two retrofitted instances of one class) finds the outer one's code."""
    holder = installed(root) if isinstance(root, nn.Module) else None
    if holder is None:
        yield
        return
    holder = holder.current()
    cls, saved = type(root), tracer.traced_func_name
    outer = cls.__dict__.get(_TRACED, _TRACED)  # _TRACED itself: no outer trace's code is there
    setattr(cls, _TRACED, holder.fns[root.training])
    tracer.traced_func_name = _TRACED
    try:
        yield
    finally:
        tracer.traced_func_name = saved
        if outer is _TRACED:
            delattr(cls, _TRACED)
        else:
            setattr(cls, _TRACED, outer)


@contextlib.contextmanager
def class_forward(module: nn.Module):
    """Within: ``module`` runs (and fx traces) its class's forward; the installed one is put back."""
    saved = {name: module.__dict__.pop(name) for name in INSTALLED if name in module.__dict__}
    try:
        yield
    finally:
        module.__dict__.update(saved)


def install_forward(
    module: nn.Module, graphs: fx.Graph | dict[bool, fx.Graph], specialised: Specialisation | None = None
) -> GraphForward | None:
    """Make ``graphs`` the forward of ``module``: one graph, or {True: train graph, False: eval graph}
    (a GraphModule, whose forward is its graph, is recompiled in place instead); ``specialised``: the
    values they were traced with (see :class:`Specialisation`). Returns the installed holder."""
    if isinstance(graphs, fx.Graph):
        graphs = {True: graphs, False: graphs}
    for graph in {id(g): g for g in graphs.values()}.values():
        graph.lint()
    if isinstance(module, fx.GraphModule):
        if graphs[True] is not graphs[False]:
            raise RetrofitError("a GraphModule has one graph for both modes")
        module.graph = graphs[True]
        module.recompile()
        return None
    holder = GraphForward(module, graphs, specialised=specialised)
    holder.install()
    return holder


# -- pickling -----------------------------------------------------------------------------------------
class _Node:
    """A reference to a node by name in a flattened graph."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return _Node, (self.name,)


class _Import:
    """Pickles as the import of ``module.name``: a function pickle cannot find by its qualified name."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce__(self):
        return _import, (self.module, self.name)


def _import(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _target(target: Any, module: nn.Module) -> Any:
    if isinstance(target, str):
        return target
    try:
        pickle.dumps(target)
        return target
    except Exception:  # pickle raises several kinds (PicklingError, AttributeError, TypeError)
        pass
    name = getattr(target, "__name__", "")
    try:
        if _import(target.__module__, name) is target:  # F.max_pool2d: a local wrapper, imported by name
            return _Import(target.__module__, name)
    except (AttributeError, ImportError, TypeError, ValueError):
        pass
    raise RetrofitError(
        f"cannot pickle the rewritten forward of {type(module).__name__}: it calls {target!r}, "
        f"which cannot be imported by name; save the weights with retrofit.save and "
        f"retrofit.load them instead"
    )


def _flatten(graph: fx.Graph, module: nn.Module) -> list[tuple]:
    """The graph as a flat list of nodes (pickling fx's linked nodes recurses once per node)."""

    def ref(a):
        return map_aggregate(a, lambda x: _Node(x.name) if isinstance(x, fx.Node) else x)

    return [(n.op, n.name, _target(n.target, module), ref(n.args), ref(n.kwargs), n.type) for n in graph.nodes]


def _unflatten(rows: list[tuple]) -> fx.Graph:
    graph, env = fx.Graph(), {}

    def look(a):
        return map_aggregate(a, lambda x: env[x.name] if isinstance(x, _Node) else x)

    for op, name, target, args, kwargs, type_expr in rows:
        env[name] = graph.create_node(op, target, look(args), look(kwargs), name=name, type_expr=type_expr)
    return graph


def _restore(
    module: nn.Module, flat: dict[bool, list[tuple]], specialised: Specialisation | None = None
) -> GraphForward:
    graphs = {mode: _unflatten(rows) for mode, rows in flat.items()}
    if flat[True] is flat[False]:
        graphs[False] = graphs[True]
    return GraphForward(module, graphs, specialised=specialised)
