"""Modules fx cannot trace: keep their forward as it is and retrofit the parts they call.

A detector whose forward loops over a list of images, a Hugging Face model that returns a
``ModelOutput``, a forward with data-dependent control flow: torch.fx cannot trace such a module.
Its own forward is then *kept* (never rewritten), and the pass goes down into the modules it calls:
every maximal subtree fx can trace is analysed and retrofitted as usual (:mod:`retrofit.graph.trace`).

What a kept forward hands to its children cannot be known without running it, so the model is run
once, in eval mode and without gradients, on a random input of the traced size, with hooks that
record each module call: its arguments (as meta tensors: shapes, not values) and the calls made
inside it (:func:`record_calls`). Each call a kept forward makes is then traced as a sub-root with
placeholders shaped like what it received there.

A child is traced as a sub-root only when what the kept forward passes it is tensors (alone or in
lists, tuples and dicts): a rewritten forward is specialised to the call it was traced from, and a
flag (``output_hidden_states``), a size or an object (torchvision's ``ImageList``) that the kept
forward may pass differently next time would be baked in. Such a child is kept as well and the
pass goes down into it in turn. A child the kept forward calls more than once is left alone (one
forward serves every call).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RetrofitError, first_line
from .restore import eval_caches_cleared

# Containers a sub-root's arguments may come in: rebuilt as they are, each tensor a placeholder.
PLAIN = (list, tuple, dict, OrderedDict)


@dataclass(eq=False)
class Recorded:
    """The first call of one module in the recorded forward."""

    module: nn.Module
    path: str
    args: tuple
    kwargs: dict
    callees: list[Recorded] = field(default_factory=list)  # calls made inside this one, in order

    def __repr__(self) -> str:
        return f"Recorded({self.path or '<root>'}: {type(self.module).__name__})"


@dataclass(eq=False)
class Recording:
    """Every module's first call in one real forward, and how often each module was called."""

    first: dict[int, Recorded]
    count: Counter

    def of(self, module: nn.Module) -> Recorded | None:
        return self.first.get(id(module))


def record_calls(model: nn.Module, input_size: tuple[int, ...]) -> Recording:
    """Run ``model`` once on a random ``(1, *input_size)`` input (eval mode, no gradients, the model's
    device and dtype) and record every module call.

    Raises:
        RetrofitError: the model does not run on such an input.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    if device.type == "meta":
        x = torch.empty((1, *input_size), dtype=dtype, device="meta")
    else:
        x = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    paths = {id(m): name for name, m in model.named_modules()}
    first: dict[int, Recorded] = {}
    count: Counter = Counter()
    stack: list[Recorded | None] = []

    def pre(module, args, kwargs):
        count[id(module)] += 1
        record = None
        if id(module) not in first:
            record = Recorded(module, paths.get(id(module), "?"), _meta(args), _meta(kwargs))
            first[id(module)] = record
            parent = stack[-1] if stack else None
            if parent is not None:
                parent.callees.append(record)
        stack.append(record)  # None for a later call: its callees are not anyone's first ones

    def post(module, args, output):
        stack.pop()

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, always_call=True))
        model.eval()
        with torch.no_grad(), eval_caches_cleared(model):
            model(x)
    except Exception as err:
        size = "x".join(map(str, input_size))
        raise RetrofitError(
            f"{type(model).__name__} did not run on a random 1x{size} input ({first_line(err)}): "
            f"retrofit runs a model whose forward fx cannot trace once, to see what its parts "
            f"receive; give the input size it takes (input_size=, --input-size C,H,W)"
        ) from err
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return Recording(first, count)


def _meta(value: Any) -> Any:
    """``value`` with every tensor in plain containers replaced by a meta tensor of its shape."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if is_plain(value):
        return rebuild(value, _meta)
    return value


def is_plain(value: Any) -> bool:
    """Whether ``value`` is a container :func:`rebuild` rebuilds: one of :data:`PLAIN` or a namedtuple."""
    return type(value) in PLAIN or _is_namedtuple(value)


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def rebuild(value: Any, fn) -> Any:
    """``value``'s plain containers rebuilt with ``fn`` applied to each item (their types kept)."""
    if _is_namedtuple(value):
        return type(value)(*(fn(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(fn(v) for v in value)
    return type(value)((k, fn(v)) for k, v in value.items())


LITERALS = (type(None), bool, int, float, str)


def not_tensors(value: Any, literals: bool = False) -> str | None:
    """What in a call's arguments is not a tensor (in plain containers), or None when all are
    (``literals``: None, bools, numbers and strings are accepted too)."""
    if isinstance(value, torch.Tensor) or (literals and isinstance(value, LITERALS)):
        return None
    if is_plain(value):
        items = value.values() if isinstance(value, dict) else value
        return next((found for v in items if (found := not_tensors(v, literals)) is not None), None)
    return "None" if value is None else f"a value of type {type(value).__name__}"


def fixed_length(args: tuple, kwargs: dict) -> str | None:
    """A list or tuple among a call's arguments (``"a list of 5"``), or None. A rewritten forward
    unrolls it to the length it was traced with: right for a traced parent, which passes as many every
    time, not for a forward kept as is, which may pass one per image."""
    return next((f for v in (*args, *kwargs.values()) if (f := _sequence(v)) is not None), None)


def _sequence(value: Any) -> str | None:
    if isinstance(value, (list, tuple)) and not _is_namedtuple(value):
        return f"{'a list' if isinstance(value, list) else 'a tuple'} of {len(value)}"
    items = value if _is_namedtuple(value) else value.values() if isinstance(value, dict) else ()
    return next((f for v in items if (f := _sequence(v)) is not None), None)


def why_not_a_sub_root(record: Recorded, recording: Recording) -> str | None:
    """Why the call ``record`` cannot be traced as a sub-root (None: it can)."""
    calls = recording.count[id(record.module)]
    if calls > 1:
        return f"called {calls} times"
    found = not_tensors((record.args, record.kwargs))
    if found is not None:
        return f"gets {found} from a forward kept as is, which a rewritten forward would bake in"
    return None
