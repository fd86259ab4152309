"""Positions: where, relative to a site, the SE block goes.

Each position is one small function registered by name. It receives a :class:`~retrofit.surgery.sites.Site`
and returns an :class:`Insertion`: the tensor the block scales (``value``) and the nodes that read the
scaled tensor instead (``users``; ``None``: every reader, the module's output included). Surgery
then rewrites the smallest module whose forward holds those edges. A new position is one function::

    @register_position("after_fork", kinds=("residual",), summary="...")
    def after_fork(site):
        return Insertion(site, site.refs.fork, None)

For a residual unit ``out = act(F(x) + shortcut(x))`` (see ``shared/se-notes.md``):

============  ===================================================================================
standard      ``act(SE(F(x)) + shortcut(x))``: on the branch, before the sum (and before a trailing
              drop-path/dropout, as in timm's SE models)
pre           ``act(F(SE(x)) + shortcut(x))``: on the unit's input, feeding the branch only
post          ``SE(act(F(x) + shortcut(x)))``: after the sum and the unit's closing activation
identity      ``act(F(x) + SE(shortcut(x)))``: on the shortcut
inside        after each 3x3 convolution of the branch and its norm/activation ("SE_3x3"), on the
              bottleneck width; a 3x3 conv whose chain already ends the branch (the second conv of
              a BasicBlock) is left out, since a block there is the standard position
============  ===================================================================================

A unit whose identity covers only its first channels, ``cat([F(x)[:, :C] + x, F(x)[:, C:]])``
(ReXNet), takes each position on the same terms: ``standard`` on all of ``F(x)``, before it is split,
``post`` on the concatenation, ``identity`` on ``x`` before the sum.

Inception merges have no sum and no shortcut: for ``standard``, ``pre``, ``post`` and ``identity``
their block goes on the module's output (the concatenation), the one placement the paper defines.

Feature-pyramid merges (``pyramid`` sites, only when a recipe's ``kinds`` names them) take ``standard``,
on the upsampled top-down map before the sum, and ``post``, on the merged map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from ..graph import nodes as N
from .sites import Site, chain_end


@dataclass(frozen=True)
class Insertion:
    """An SE block to insert: it scales ``value``; ``users`` read its output instead (None: all)."""

    site: Site
    value: fx.Node
    users: tuple[fx.Node, ...] | None
    position: str = ""


class SkipSite(Exception):
    """A position does not apply to this particular site; the message says why."""


@dataclass(frozen=True)
class Position:
    name: str
    kinds: tuple[str, ...]
    summary: str
    place: Callable[..., Insertion]


#: The positions by name (``standard``, ``pre``, ``post``, ``identity``, ``inside`` and any added with
#: :func:`register_position`): where a block goes at each site, and which site kinds it takes.
POSITIONS: dict[str, Position] = {}


def register_position(name: str, kinds: tuple[str, ...], summary: str):
    """Register a position function under ``name`` for the given site kinds."""

    def register(fn):
        def place(site) -> Insertion:
            ins = fn(site)
            return Insertion(ins.site, ins.value, ins.users, name)

        POSITIONS[name] = Position(name, kinds, summary, place)
        return fn

    return register


def _inception_output(site) -> Insertion:
    return Insertion(site, site.refs.anchor, None)


def regularized_input(node: fx.Node) -> fx.Node | None:
    """The input of a drop-path/dropout/identity node, else None."""
    if N.is_marker(node):  # the output of a traced-through module: step over it if it regularizes
        call = node.meta["output_of"]
        first = call.args[0] if call.args else None
        if N.is_regularizer_module(call.module) and isinstance(first, fx.Proxy):
            return first.node
        return None
    if N.is_regularizer(node) and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def branch_end(site) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """The residual branch's output before trailing regularizers, and the nodes that read it: the
    merge, or for a partial unit (``site.refs.sum``) the slices of it that the merge takes."""
    value = site.refs.branch
    users = (site.refs.anchor,) if site.refs.sum is None else tuple(value.users)
    while (before := regularized_input(value)) is not None and len(value.users) == 1:
        value, users = before, (value,)
    return value, users


def closing(site) -> fx.Node:
    """The unit's output: the sum, or the activation that follows it in the same forward."""
    return chain_end(site.refs.anchor, N.is_activation)


@register_position("standard", ("residual", "inception", "pyramid"), "on the residual branch, before the sum")
def standard(site) -> Insertion:
    if site.kind == "inception":
        return _inception_output(site)
    value, users = branch_end(site)
    return Insertion(site, value, users)


@register_position("pre", ("residual", "inception"), "on the unit's input, feeding the residual branch only")
def pre(site) -> Insertion:
    if site.kind == "inception":
        return _inception_output(site)
    fork, branch = site.refs.fork, site.refs.branch_nodes
    users = tuple(u for u in fork.users if u in branch)
    if not users:
        raise SkipSite("the branch does not read the unit's input directly")
    return Insertion(site, fork, users)


@register_position("post", ("residual", "inception", "pyramid"), "after the sum and the unit's closing activation")
def post(site) -> Insertion:
    if site.kind == "inception":
        return _inception_output(site)
    return Insertion(site, closing(site), None)


@register_position("identity", ("residual", "inception"), "on the shortcut branch")
def identity(site) -> Insertion:
    if site.kind == "inception":
        return _inception_output(site)
    return Insertion(site, site.refs.shortcut, (site.refs.sum or site.refs.anchor,))


@register_position("inside", ("conv3x3",), "after the 3x3 conv of the residual branch (and its norm/activation)")
def inside(site) -> Insertion:
    end = site.refs.chain_end
    tail = branch_end(site.refs.unit)[0]
    if end is tail or end is site.refs.unit.refs.branch or _only_excitation_after(end, site.refs.unit):
        raise SkipSite("its output already ends the residual branch: a block there is the standard position")
    return Insertion(site, end, None)


def _only_excitation_after(end: fx.Node, unit, limit: int = 256) -> bool:
    """Nothing but excitation blocks (a standard SE inserted before, timm's own SE) between ``end``
    and the unit's sum: the branch still ends at ``end`` as far as positions go."""
    seen, todo = set(), list(end.users)
    while todo:
        n = todo.pop()
        if n in seen or n is unit.refs.anchor:
            continue
        if len(seen) > limit or (N.is_weighted(n) and not N.in_excitation(n)):
            return False
        seen.add(n)
        todo.extend(n.users)
    return True
