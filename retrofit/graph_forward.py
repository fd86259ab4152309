"""A module's ``forward`` regenerated from an edited fx graph.

Surgery installs a :class:`GraphForward` as the *instance's* ``forward``: the module keeps its class
(``isinstance`` checks, ``zero_init_last`` and every other method still work), its submodules and
its state-dict keys; only what its forward computes changes. ``torch.fx.GraphModule`` would do the
code generation too, but as a new module of a new class: here the generated function is bound to the
original instance instead. It pickles (``torch.save(model)``) and deep-copies (EMA copies) with the
model, and ``module.forward.code`` shows the generated source.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import linecache
import weakref
from typing import Any, Callable

from torch import fx, nn

_COMPILED: dict[tuple, tuple[Callable, str]] = {}
_COUNTER = itertools.count()


def _compile(graph: fx.Graph) -> tuple[Callable, str]:
    """Compile ``graph`` to a ``forward(self, ...)`` function. The units of a stage rebuild to equal
    graphs: those are generated and compiled once (keyed by structure, before any code is made)."""
    key = _structure(graph)
    if key is not None and key in _COMPILED:
        return _COMPILED[key]
    code = graph.python_code(root_module="self")
    filename = f"<retrofit-forward-{next(_COUNTER)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)  # tracebacks
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    compiled = (namespace["forward"], code.src)
    if key is not None:
        _COMPILED[key] = compiled
    return compiled


def _structure(graph: fx.Graph) -> tuple | None:
    """A hashable description of the graph's code (names, ops, targets, arguments), or None."""
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
        key = tuple((n.op, n.name, n.target, arg(n.args), arg(n.kwargs)) for n in graph.nodes)
        hash(key)
        return key
    except TypeError:  # an unhashable constant: compile without caching
        return None


def _signature(graph: fx.Graph) -> inspect.Signature:
    params = [inspect.Parameter(n.target, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=n.args[0] if n.args else inspect.Parameter.empty)
              for n in graph.nodes if n.op == "placeholder"]
    return inspect.Signature(params)


class GraphForward:
    """The rewritten ``forward`` of ``module``: runs ``graph`` with ``module`` as ``self``.

    It holds its module weakly: the module holds it, and a strong reference back would make every
    retrofitted model a reference cycle, freed only by the garbage collector, not when dropped.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph):
        self._module = weakref.ref(module)
        self.graph = graph
        self._fn, self.code = _compile(graph)
        self.__signature__ = _signature(graph)

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise ReferenceError("the module of this forward no longer exists")
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return GraphForward, (self.module, self.graph)

    def __deepcopy__(self, memo: dict) -> "GraphForward":
        new = copy.copy(self)  # the graph and the compiled code are shared: never mutated
        new._module = weakref.ref(copy.deepcopy(self.module, memo))
        return new

    def __repr__(self) -> str:
        return f"GraphForward({type(self.module).__name__}, {len(self.graph.nodes)} nodes)"


def install_forward(module: nn.Module, graph: fx.Graph) -> None:
    """Make ``graph`` the forward of ``module`` (a GraphModule is recompiled in place instead)."""
    graph.lint()
    if isinstance(module, fx.GraphModule):
        module.graph = graph
        module.recompile()
    else:
        module.forward = GraphForward(module, graph)
