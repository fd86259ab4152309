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
from typing import Any, Callable

from torch import fx, nn

_COMPILED: dict[tuple, Callable] = {}
_COUNTER = itertools.count()


def _compile(graph: fx.Graph) -> tuple[Callable, str]:
    """Compile ``graph`` to a ``forward(self, ...)`` function; identical code is compiled once."""
    code = graph.python_code(root_module="self")
    key = (code.src, tuple(sorted((k, id(v)) for k, v in code.globals.items())))
    fn = _COMPILED.get(key)
    if fn is None:
        filename = f"<retrofit-forward-{next(_COUNTER)}>"
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)  # tracebacks
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)
        fn = _COMPILED[key] = namespace["forward"]
    return fn, code.src


def _signature(graph: fx.Graph) -> inspect.Signature:
    params = [inspect.Parameter(n.target, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=n.args[0] if n.args else inspect.Parameter.empty)
              for n in graph.nodes if n.op == "placeholder"]
    return inspect.Signature(params)


class GraphForward:
    """The rewritten ``forward`` of ``module``: runs ``graph`` with ``module`` as ``self``."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        self.module = module
        self.graph = graph
        self._fn, self.code = _compile(graph)
        self.__signature__ = _signature(graph)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return GraphForward, (self.module, self.graph)

    def __deepcopy__(self, memo: dict) -> "GraphForward":
        new = copy.copy(self)  # the graph and the compiled code are shared: never mutated
        new.module = copy.deepcopy(self.module, memo)
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
