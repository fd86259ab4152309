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
from dataclasses import dataclass
from typing import Any

from torch import fx, nn
from torch.fx.node import map_aggregate

from ..errors import RetrofitError

_COMPILED: dict[tuple, Compiled] = {}
_COUNTER = itertools.count()
_DEF = "def forward("
_CODE_ATTRIBUTE = "_retrofit_forward"
_TRACED = "_retrofit_traced_forward"  # a class attribute only while an fx tracer traces a retrofitted root
INSTALLED = ("forward", "_replicate_for_data_parallel", "__constants__", _CODE_ATTRIBUTE)  # instance attributes


@dataclass(frozen=True)
class Compiled:
    """The code of one set of graphs: what runs in each mode, and the function bound as the forward."""

    fns: dict[bool, Callable]  # training flag -> forward(module, ...) generated from that mode's graph
    method: Callable           # forward(holder, ...): runs fns[module.training]; __wrapped__: the scripted source
    code: str
    name: str                  # the file name of the code, one per compiled structure


# The function installed as every rewritten forward, appended to each generated source: it shares the
# file (and so the name TorchScript reports errors under) of the forward TorchScript reads.
_CALL = """

def _retrofit_call(holder, *args, **kwargs):
    module = holder.module
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
        fns = {mode: _exec(c.src, c.globals, f"{label}, {'train' if mode else 'eval'} mode")["forward"]
               for mode, c in codes.items()}
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
        raise RetrofitError(f"the train and eval forwards take different parameters ({definition} vs "
                            f"{eval_definition})")
    namespace = dict(train.globals)
    for name, value in evaluation.globals.items():
        if name in namespace and namespace[name] is not value:  # two objects under one name: rename
            new = next(f"{name}_eval{k}" for k in itertools.count() if f"{name}_eval{k}" not in namespace)
            eval_body = [re.sub(rf"(?<![\w.]){re.escape(name)}\b", new, line) for line in eval_body]
            name = new
        namespace[name] = value
    head += [line for line in eval_head if line not in head]
    lines = [*head, definition, "    if self.training:", *("    " + _kept(x) for x in train_body),
             "    else:", *("    " + _kept(x) for x in eval_body)]
    return "\n".join(lines) + "\n", namespace


def _kept(line: str) -> str:
    """A line without fx's ``;  x = y = None`` (memory released early): in a branch, TorchScript
    refuses to give a variable of the enclosing scope another type."""
    return re.sub(r";  (?:\w+ = )+None$", "", line)


def _split(src: str) -> tuple[list[str], str, list[str]]:
    """fx's code as (lines before the def, the def line, the body lines)."""
    lines = src.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(_DEF))
    return lines[:at], lines[at], [line for line in lines[at + 1:] if line.strip()]


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


class GraphForward:
    """The rewritten ``forward`` of ``module``: runs ``graphs[module.training]`` with ``module`` as ``self``.

    It holds its module weakly (see the module docstring); :meth:`install` puts its bound methods on
    the module.
    """

    def __init__(self, module: nn.Module, graphs: dict[bool, fx.Graph], compiled: Compiled | None = None):
        self._module = weakref.ref(module)
        self.graphs = graphs
        self.compiled = compiled or compile_graphs(graphs, type(module).__qualname__)
        self.fns = self.compiled.fns

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

    def _replicate_for_data_parallel(self) -> nn.Module:
        """``nn.Module._replicate_for_data_parallel``, with a forward of the replica's own."""
        module = self.module
        replica = type(module)._replicate_for_data_parallel(module)
        GraphForward(replica, self.graphs, self.compiled).install()
        return replica

    def __reduce__(self):
        module = self.module
        rows = {id(g): _flatten(g, module) for g in self.graphs.values()}  # one list when both modes share
        return _restore, (module, {mode: rows[id(g)] for mode, g in self.graphs.items()})

    def __deepcopy__(self, memo: dict) -> GraphForward:
        # the copy of the module (memo: the one being copied); graphs and compiled code are shared
        return GraphForward(copy.deepcopy(self.module, memo), self.graphs, self.compiled)

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


def install_forward(module: nn.Module, graphs: fx.Graph | dict[bool, fx.Graph]) -> None:
    """Make ``graphs`` the forward of ``module``: one graph, or {True: train graph, False: eval graph}
    (a GraphModule, whose forward is its graph, is recompiled in place instead)."""
    if isinstance(graphs, fx.Graph):
        graphs = {True: graphs, False: graphs}
    for graph in {id(g): g for g in graphs.values()}.values():
        graph.lint()
    if isinstance(module, fx.GraphModule):
        if graphs[True] is not graphs[False]:
            raise RetrofitError("a GraphModule has one graph for both modes")
        module.graph = graphs[True]
        module.recompile()
    else:
        GraphForward(module, graphs).install()


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
    raise RetrofitError(f"cannot pickle the rewritten forward of {type(module).__name__}: it calls {target!r}, "
                        f"which cannot be imported by name; save the weights with retrofit.save and "
                        f"retrofit.load them instead")


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


def _restore(module: nn.Module, flat: dict[bool, list[tuple]]) -> GraphForward:
    graphs = {mode: _unflatten(rows) for mode, rows in flat.items()}
    if flat[True] is flat[False]:
        graphs[False] = graphs[True]
    return GraphForward(module, graphs)
