"""What a module class's ``forward`` does, read off its bytecode, without running or tracing it.

The code of a class's ``forward`` is its own function, the functions nested in it (comprehensions,
lambdas) and the methods of the class it names (``self._attn(x)``), followed as far as they go. From
it: the names it reads (:func:`names_read`: attributes, and the strings it passes to ``getattr``) and
whether it adds or concatenates tensors (:func:`may_merge`). The first tells which attributes a
rewritten forward depends on (:mod:`retrofit.graph.specialise`) and whether a forward reads
``training`` (:mod:`retrofit.graph.two_modes`); the second whether a module fx cannot see into could
hold a merge (:func:`retrofit.graph.trace.notrace_blocks`).
"""

from __future__ import annotations

import dis
import functools
import inspect
import types

# Python 3.11+: BINARY_OP with "+" or "+="; before, BINARY_ADD and INPLACE_ADD
_ADD_OPS = frozenset({"BINARY_ADD", "INPLACE_ADD"})
_MERGE_NAMES = frozenset({"add", "add_", "cat", "concat", "concatenate"})


@functools.cache
def forward_code(cls: type) -> tuple[types.CodeType, ...]:
    """The code objects of ``cls.forward`` and of what it reaches: nested functions and the methods of
    ``cls`` it names (properties by their getter)."""
    seen: dict[types.CodeType, None] = {}
    todo = [getattr(cls, "forward", None)]
    while todo:
        fn = todo.pop()
        if isinstance(fn, property):
            fn = fn.fget
        code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
        stack = [code] if code is not None else []
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen[c] = None
            stack.extend(k for k in c.co_consts if inspect.iscode(k))
            for name in c.co_names:
                member = inspect.getattr_static(cls, name, None)
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    todo.append(member)
    return tuple(seen)


@functools.cache
def names_read(cls: type) -> frozenset[str]:
    """Every name the forward's code mentions, and its string constants (``getattr(self, "flag")``)."""
    names: set[str] = set()
    for code in forward_code(cls):
        names.update(code.co_names)
        names.update(k for k in code.co_consts if isinstance(k, str) and k.isidentifier())
    return frozenset(names)


@functools.cache
def may_merge(cls: type) -> bool:
    """Whether the forward's code adds (``+``, ``+=``, ``.add``) or concatenates anything."""
    for code in forward_code(cls):
        if _MERGE_NAMES & set(code.co_names):
            return True
        for ins in dis.get_instructions(code):
            if ins.opname in _ADD_OPS or (ins.opname == "BINARY_OP" and ins.argrepr in ("+", "+=")):
                return True
    return False
