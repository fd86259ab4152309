"""Rebuild and check every forward a plan touches, without changing the model.

Each insertion of a plan (:mod:`retrofit.surgery.plan`) belongs to the smallest module whose forward
holds its edges; that forward is rebuilt at its own level (:mod:`retrofit.graph.rebuild`, both modes
for a forward that reads ``training``: :mod:`retrofit.graph.two_modes`) and the insertion's value
and readers are found in it. All that can make an insertion fail is checked here, so
:func:`retrofit.sweep` counts exactly the blocks :func:`retrofit.add_se` would insert, and an error
leaves the model as it was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..blocks.attention import ATTENTIONS
from ..blocks.se_layout import channel_dim
from ..errors import RetrofitError
from ..graph import nodes as N
from ..graph.model import model_name
from ..graph.opaque import fixed_length
from ..graph.rebuild import CannotRewrite, OwnerGraph, clean_name
from ..graph.trace import Call, Traced
from ..graph.two_modes import Correspondence, other_mode
from .info import BlockInfo
from .plan import owner_of, plan, site_name
from .positions import Insertion
from .recipe import Recipe
from .recipe_fields import StageMap
from .sites import Scan, Skipped


@dataclass
class Rewrite:
    """One module's forward, rebuilt and checked, with the insertions it will hold (not applied yet)."""

    owner: Call
    graph: OwnerGraph
    spliced: list[tuple[Insertion, Any, Any]]  # (insertion, this level's value node, its users or None)
    names: list[str]  # the blocks' attribute names on the module
    fused: list[Any] = field(default_factory=list)  # per insertion: the residual sum it fuses, or None
    # a forward that differs by train/eval mode: the other mode's graph, with the same insertions
    other: OwnerGraph | None = None
    other_spliced: list[tuple[Any, Any]] = field(default_factory=list)  # (value node, users or None)
    other_fused: list[Any] = field(default_factory=list)

    def blocks(self, recipe: Recipe) -> list[BlockInfo]:
        """What the blocks will be, from the recipe alone (widths, sizes, stages)."""
        prefix = f"{self.owner.path}." if self.owner.path else ""
        out = []
        for (ins, _, _), name in zip(self.spliced, self.names):
            layout, shape = ins.site.layout, N.shape(ins.value)
            channels = shape[channel_dim(layout)]
            size = {"nchw": shape[2:4], "nhwc": shape[1:3]}.get(layout, ins.site.size)
            cfg = recipe.block_for(ins.site.stage, ins.site.module)
            out.append(
                BlockInfo(
                    prefix + name,
                    ins.position,
                    ins.site.kind,
                    ins.site.module,
                    ins.site.stage,
                    ins.site.stride,
                    channels,
                    cfg.reduced_width(channels),
                    tuple(size),
                    layout,
                    ins.site.prefix,
                    cfg,
                )
            )
        return out


@dataclass
class Prepared:
    """The rewrites a recipe asks for in a scanned model, every check done, nothing changed yet."""

    rewrites: list[Rewrite]
    skipped: list[Skipped]

    def blocks(self, recipe: Recipe) -> list[BlockInfo]:
        return [b for rw in self.rewrites for b in rw.blocks(recipe)]


def prepare(found: Scan, recipe: Recipe) -> Prepared:
    """Plan ``recipe`` on a scan and rebuild every forward it touches, without touching the model.

    All that can make an insertion fail is checked here (a shared module, a forward that cannot be
    rebuilt, an insertion with no counterpart in the forward's other train/eval mode), so
    :func:`retrofit.sweep` counts exactly the blocks :func:`add_se` would insert, and an error
    leaves the model as it was.

    Raises:
        RetrofitError: no site for the position or stage, or no block could be placed.
    """
    insertions, skipped = plan(found, recipe)
    calls_of = Counter(id(call.module) for call in found.traced.calls())
    by_owner: dict[int, tuple[Call, list[Insertion]]] = {}
    for ins in insertions:
        owner = owner_of(ins)
        if calls_of[id(owner.module)] > 1:  # one forward serves every call: they would all change
            skipped.append(
                Skipped(
                    site_name(ins.site),
                    f"{owner.path or '<model>'} is called "
                    f"{calls_of[id(owner.module)]} times (a shared module): not rewritten",
                )
            )
            continue
        by_owner.setdefault(id(owner), (owner, []))[1].append(ins)
    rewrites, failures, planned = [], Counter(), len(skipped)
    for owner, group in by_owner.values():
        try:
            rewrites.append(_prepare(owner, group, found.traced, recipe))
        except CannotRewrite as err:
            skipped += [Skipped(site_name(ins.site), f"{owner.path or '<model>'}: {err}") for ins in group]
            failures[f"{err}"] += len(group)
    if not rewrites:
        why = Counter(s.reason for s in skipped[:planned]) + failures  # a rewrite's reason once, not per module
        reasons = "; ".join(f"{n} site(s): {reason}" for reason, n in why.most_common())
        block = "" if isinstance(recipe.module, StageMap) or recipe.overrides else f"{recipe.module} "
        raise RetrofitError(f"no {block}block could be inserted in {model_name(found.traced.model)} ({reasons})")
    return Prepared(rewrites, skipped)


# -- surgery ------------------------------------------------------------------------------------
def _prepare(owner: Call, group: list[Insertion], traced: Traced, recipe: Recipe) -> Rewrite:
    if owner.kept is not None:  # retrofit.graph.opaque: fx cannot trace it, its forward stays as it is
        raise CannotRewrite("its forward is kept as is (fx cannot trace it)")
    if (
        owner.parent is not None
        and owner.parent.kept is not None
        and (sequence := fixed_length(owner.args, owner.kwargs)) is not None
    ):
        raise CannotRewrite(
            f"a forward kept as is passes it {sequence}: a rewritten forward would take only that many (one per image?)"
        )
    rebuilt = OwnerGraph(owner, traced)
    # the scanned module (the target is it or a copy of it) in the mode it was not traced in
    other = other_mode(owner.module, frozenset(rebuilt.constants))
    spliced, specs = [], []
    for ins in group:
        layout = ins.site.layout
        spec = ATTENTIONS[recipe.block_for(ins.site.stage, ins.site.module).module]
        if len(N.shape(ins.value)) != (3 if layout == "tokens" else 4):
            raise CannotRewrite(f"the tensor at the {ins.position} position is not {layout} like its site")
        if layout not in spec.layouts:
            raise CannotRewrite(f"module {spec.name} works on {'/'.join(spec.layouts)} maps, this site is {layout}")
        specs.append(spec)
        value = rebuilt.rep(ins.value)
        users = None if ins.users is None else rebuilt.rep_users(ins.value, ins.users)
        spliced.append((ins, value, users))
    if other is not None:  # a forward that differs by mode: the insertions in the other mode's graph too
        spliced, other_spliced = _in_both_modes(rebuilt.graph, other.graph, spliced, owner.module.training)
    bases = [_base_name(ins, owner) for ins, _, _ in spliced]
    names, taken = [], set()
    for (_, value, _), base in zip(spliced, bases):
        if bases.count(base) > 1:
            base = f"{base}_{clean_name(value.name)}"
        name = _free_name(owner.module, base, taken)
        taken.add(name)
        names.append(name)
    # fused per insertion: only some modules fuse
    rewrite = Rewrite(
        owner,
        rebuilt,
        spliced,
        names,
        [
            _fusable_sum(ins, value, users) if spec.fuses_residual_sum else None
            for (ins, value, users), spec in zip(spliced, specs)
        ],
    )
    if other is not None:
        rewrite.other, rewrite.other_spliced = other, other_spliced
        rewrite.other_fused = [
            _fusable_sum(ins, value, users) if spec.fuses_residual_sum else None
            for (ins, _, _), (value, users), spec in zip(spliced, other_spliced, specs)
        ]
    return rewrite


def _in_both_modes(graph: fx.Graph, other: fx.Graph, spliced: list, traced_mode: bool) -> tuple[list, list]:
    """The insertions made in ``graph`` (one mode of a forward), and where they go in ``other`` (its
    other mode): at the counterpart of each value, before the counterparts of its readers (of every
    reader, when the block took every reader). A value with no counterpart that only modifies one input
    (train mode's drop-path mask ``y * mask``) moves to that input in both modes: the block goes before
    the mask, as it goes before timm's DropPath module."""
    mode = "eval" if traced_mode else "train"
    inputs = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    twins = [n for n in other.nodes if n.op == "placeholder"]
    if [n.name for n in twins] != list(inputs):
        raise CannotRewrite(f"its forward takes other inputs in {mode} mode")
    for n in twins:  # one signature for both: annotations as the rebuilt graph has them (evaluated)
        n.type, n.args = inputs[n.name].type, inputs[n.name].args
    match = Correspondence(graph, other)
    here, there = [], []
    for ins, value, users in spliced:
        anchor = match.anchor(value, match.pairs)
        if anchor is None:
            raise CannotRewrite(
                f"its forward differs in {mode} mode, and the tensor at the {ins.position} "
                f"position ({value.name}) has no counterpart there"
            )
        twin = match.get(anchor)
        if anchor is not value:
            here.append((ins, anchor, list(anchor.users)))
            there.append((twin, list(twin.users)))
        elif users is None or set(users) == set(value.users):
            here.append((ins, value, users))
            there.append((twin, list(twin.users)))
        else:
            readers = [match.get(u) for u in users]
            if any(r is None or twin not in r.all_input_nodes for r in readers):
                raise CannotRewrite(
                    f"its forward differs in {mode} mode, and what reads the tensor at the "
                    f"{ins.position} position ({value.name}) has no counterpart there"
                )
            here.append((ins, value, users))
            there.append((twin, readers))
    return here, there


def _fusable_sum(ins: Insertion, value, users):
    """The residual sum a standard-position block feeds directly (no drop-path between), at this level:
    the block then computes ``x * s + shortcut`` in one pass (``torch.addcmul``), which saves a pass
    over the activations; None when the block feeds anything else."""
    if (
        ins.position != "standard"
        or ins.site.kind != "residual"
        or ins.site.layout != "nchw"
        or users is None
        or len(users) != 1
    ):
        return None
    (add,) = users
    operands = N.add_operands(add)
    if operands is None or add.kwargs or value not in operands or operands[0] is operands[1]:
        return None
    return add


def _base_name(ins: Insertion, owner: Call) -> str:
    """``se`` at the standard position (timm's name), ``se_<position>`` at the others; a block on a
    named module's output (``at``) is ``se_<its path from there>`` in the forward that reads it
    (``features.se_denseblock1``, ``se_blocks_0``), or ``se_out`` at the end of its own forward."""
    if ins.position == "at":
        if ins.site.module == owner.path:
            return "se_out"
        relative = ins.site.module[len(owner.path) + 1 :] if owner.path else ins.site.module
        return "se_" + relative.replace(".", "_")
    return "se" if ins.position == "standard" else f"se_{ins.position}"


def _free_name(module: nn.Module, base: str, taken: set = frozenset()) -> str:
    name, k = base, 2
    while getattr(module, name, None) is not None or name in taken:
        name, k = f"{base}_{k}", k + 1
    return name
