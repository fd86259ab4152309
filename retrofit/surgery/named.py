"""Sites the user names: a block on the output of any module, by path or glob (the recipe's ``at``).

Where the pass recognises no merge (DenseNet's and VoVNet's concatenations of a layer's input with
its output, VGG's plain stack, NF-Net's notrace blocks taken as a whole) or a user wants a block
somewhere else, ``at: ["features.denseblock*", "features.transition*"]`` puts one on the output of
each module a glob matches, as the ``post`` position does for a residual unit: every reader of the
module's output reads the scaled map. The sites are of kind ``module`` (:data:`retrofit.surgery.sites.NAMED`)
and get the same block, preserving init, overhead report, save/load and strip as the others.

Globs match module paths name by name: ``*`` stays within one name (``features.denseblock*`` matches
``features.denseblock1``, not the layers inside it), ``**`` spans any number of names. A glob that
matches no module, a module the traced forward does not call, one called more than once, and one
whose output is not a 4-d feature map (NCHW or NHWC) or a token sequence (B, N, C) are errors.

The block is installed in the forward that reads the module's output (its parent's); where that
forward is kept as is (:mod:`retrofit.graph.opaque`), at the end of the module's own forward.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

import torch
from torch import fx

from ..errors import RetrofitError, excerpt
from ..graph import nodes as N
from ..graph.trace import Call, Traced, level_of
from .info import get_info
from .sites import NAMED, Site, SiteRefs, layout_of, stage_of


def path_matches(path: str, pattern: str) -> bool:
    """Whether module ``path`` matches ``pattern`` name by name (``*`` within a name, ``**`` across)."""
    return _match(path.split(".") if path else [], pattern.split("."))


def _match(parts: list[str], pats: list[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def named_sites(traced: Traced, globs: Iterable[str], name: str) -> list[Site]:
    """One ``module`` site per module a glob matches, in the model's module order.

    Raises:
        RetrofitError: a glob that matches no module, or a matched module the traced forward does not
            call (once), or whose output is not a feature map or a token sequence.
    """
    info = get_info(traced.model)  # a retrofitted model: its blocks are not candidates
    blocks = tuple(b.path for b in info.blocks) if info is not None else ()
    modules = [
        p for p, _ in traced.model.named_modules() if p and not any(p == b or p.startswith(f"{b}.") for b in blocks)
    ]
    calls: dict[str, list[Call]] = {}
    for call in traced.calls():
        calls.setdefault(call.path, []).append(call)
    chosen: list[str] = []
    for glob in globs:
        found = [p for p in modules if path_matches(p, glob)]
        if not found:
            close = difflib.get_close_matches(glob, modules, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise RetrofitError(
                f"at: {excerpt(glob)} matches no module of {name}; {hint}(`*` stays within one name "
                f"of the path, `**` spans several; model.named_modules() lists the paths)"
            )
        chosen += [p for p in found if p not in chosen]
    order = {p: i for i, p in enumerate(modules)}
    return [_site(traced, path, calls.get(path, []), name) for path in sorted(chosen, key=order.get)]


def _site(traced: Traced, path: str, calls: list[Call], name: str) -> Site:
    module = traced.model.get_submodule(path)
    what = f"at: {path} ({type(module).__name__})"
    if not calls:
        raise RetrofitError(f"{what} is not called where the pass sees {name}'s forward: {_unseen(traced, path)}")
    if len(calls) > 1:
        raise RetrofitError(
            f"{what} is called {len(calls)} times (a shared module): one block on its output "
            f"would change every call; name a module called once"
        )
    call = calls[0]
    caller = call.parent
    if caller is not None and caller.kept is not None and (call.leaf or call.kept is not None):
        raise RetrofitError(
            f"{what} is called by a forward kept as is ({caller.path or '<model>'}: fx cannot "
            f"trace it) and is {'a layer' if call.kept is None else 'kept as is too'}: no "
            f"forward can take the block; name a module inside it, or the one that calls it"
        )
    value = _output(traced, call)
    shape = N.shape(value) if value is not None else None
    layout = layout_of(traced, value, shape) if shape is not None and len(shape) in (3, 4) else None
    if not isinstance(layout, tuple):
        got = f"a {tuple(shape)} tensor" if shape is not None else _kind_of(value, call)
        why = f" ({layout})" if isinstance(layout, str) else ""
        raise RetrofitError(
            f"{what} outputs {got}{why}, not a 4-d feature map or a (B, N, C) token sequence; "
            f"choose a module whose output is one"
        )
    kind, size, prefix = layout
    channels = shape[1] if kind == "nchw" else shape[-1]
    stage = stage_of(traced, size[0])
    return Site(
        NAMED,
        path,
        value.name,
        channels,
        tuple(size),
        2**stage,
        stage,
        f"{type(module).__name__} output",
        SiteRefs(value),
        kind,
        prefix,
    )


def _output(traced: Traced, call: Call) -> fx.Node | None:
    """The node that is ``call``'s output where the block can go: in the caller's forward (the leaf
    node, or the marker of a traced call), or, when the caller's forward is kept as is, the value
    the module's own forward returns. None when there is no such single tensor."""
    caller = call.parent
    if caller is not None and caller.kept is None:
        if call.leaf:
            return call.node
        return next(
            (
                n
                for n in caller.events
                if isinstance(n, fx.Node)
                and N.is_marker(n)
                and n.meta["output_of"] is call
                and n.meta["output_path"] == ()
            ),
            None,
        )
    if call.leaf or call.kept is not None or not isinstance(call.result, fx.Proxy):
        return None
    node = call.result.node
    inside = level_of(node) is call and all(_is_marker_of(u, call) for u in node.users)
    return node if inside else None


def _is_marker_of(node: fx.Node, call: Call) -> bool:
    return N.is_marker(node) and node.meta.get("output_of") is call


def _kind_of(value, call: Call) -> str:
    """What a module outputs when it is not a single tensor the block can go on (for the error)."""
    result = call.result if not call.leaf else None
    if isinstance(result, (tuple, list, dict)):
        return f"a {type(result).__name__} of values"
    if isinstance(value, fx.Node) and not isinstance(value.meta.get("val"), torch.Tensor):
        return f"a {type(value.meta.get('val')).__name__}"
    return "no single tensor its forward computes"


def _unseen(traced: Traced, path: str) -> str:
    """Why a module is not in the traced call tree: the innermost module kept as is around it."""
    around = [(where, line) for where, line in traced.opaque if where and path.startswith(f"{where}.")]
    if around:
        where, line = max(around, key=lambda wl: len(wl[0]))
        return f"it is inside {where}: {line}"
    return "its forward does not call it at this input size"
