"""Insert SE blocks: plan the insertions a recipe asks for, then rewrite the modules that own them.

Surgery touches the smallest module whose forward holds an insertion's edges: that forward is rebuilt
at its own level (:mod:`retrofit.rebuild`), the SE node is spliced in, and the result is installed on
the same instance (:mod:`retrofit.graph_forward`): the model keeps its class, methods and state-dict
keys. Sites that cannot be rewritten safely are skipped and reported with the reason.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import fx, nn

from . import nodes as N
from .attention import ATTENTIONS, build_attention
from .block import BLOCK_FIELDS, BlockConfig
from .errors import RetrofitError, RetrofitWarning
from .graph_forward import install_forward
from .positions import POSITIONS, Insertion, SkipSite
from .rebuild import CannotRewrite, Correspondence, OwnerGraph, clean_name, other_mode
from .recipe import Recipe, StageMap, matches, resolve_recipe
from .se_layout import channel_dim
from .named import named_sites
from .opaque import fixed_length
from .sites import KINDS, NAMED, Scan, Skipped, scan
from .trace import Call, Traced, level_of


@dataclass(frozen=True)
class BlockInfo:
    """One inserted block and the site it serves."""

    path: str          # the block's module path, e.g. "layer1.0.se"
    position: str
    site_kind: str
    site_module: str   # the module whose forward holds the site
    stage: int
    stride: int
    channels: int
    width: int
    size: tuple[int, int] = (0, 0)  # height and width of the feature map it scales (tokens: the patch grid)
    layout: str = "nchw"            # nchw, nhwc or tokens (see retrofit.se_layout)
    prefix: int = 0                 # tokens: class/register tokens before the patch grid
    config: BlockConfig = BlockConfig()  # how the block is built (the recipe resolved for its site)


@dataclass
class RetrofitInfo:
    """What :func:`add_se` did to a model; kept on it as ``model._retrofit``."""

    recipe: Recipe
    input_size: tuple[int, ...]
    architecture: str | None
    blocks: list[BlockInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # blocks that took the place of an attribute set to None (timm's `self.se = None`): strip restores it
    was_none: list[str] = field(default_factory=list)


def add_se(model: nn.Module, recipe: Recipe | str | dict | None = None, *, inplace: bool = False,
           input_size: tuple[int, ...] | None = None, **fields: Any) -> nn.Module:
    """Insert Squeeze-and-Excitation blocks into ``model`` following a recipe.

    Args:
        model: any ``nn.Module`` or ``torch.fx.GraphModule`` (a timm model, or your own).
        recipe: a :class:`~retrofit.Recipe`, a built-in recipe name (``"timm"``, ``"post"``...), a
            YAML path or a dict; default: ``Recipe()`` (standard position, r=16, preserving init).
        inplace: modify ``model`` itself instead of a deep copy.
        input_size: ``(C, H, W)`` used to trace shapes; default: the model's own
            (:func:`retrofit.models.own_input_size`: timm's ``pretrained_cfg``, a torchvision
            detector's transform, a Hugging Face config), else ``(3, 224, 224)``.
        **fields: recipe fields overriding the recipe's (``position``, ``r``, ``gate``, ``stages``...;
            ``module="eca"`` inserts another block, ``only``/``skip``/``kinds`` choose the sites,
            ``at=["features.denseblock*"]`` puts blocks on the outputs of the modules named); a block
            field may be a per-stage map (``r={2: 8, 5: 32}``) and ``overrides`` set block fields by
            stage and module glob (see :class:`~retrofit.Recipe`).

    Returns:
        The retrofitted model: the same class as ``model``, every original state-dict key unchanged,
        plus one block per site (``<module>.se`` for the standard position).

    Raises:
        RetrofitError: a bad recipe, a position with no site in this model, a stage it does not have
            (in ``stages``, a per-stage map or an override), an ``only``/``skip``/override glob that
            matches no site, an ``at`` glob that names no module or a module whose output is not a
            feature map.

    Example::

        >>> model = timm.create_model("resnet50")
        >>> se_model = retrofit.add_se(model, position="inside", r=8, stages=[4])
        >>> se_model = retrofit.add_se(model, recipe="timm")   # timm's seresnet50 layout
        >>> eca_model = retrofit.add_se(model, module="eca", only=["layer3.*", "layer4.*"])
        >>> mixed = retrofit.add_se(model, r={2: 8, 3: 8, 4: 16, 5: 32},
        ...                         overrides=[{"only": ["layer4.2"], "module": "eca"}])
        >>> dense = retrofit.add_se(timm.create_model("densenet121"), at=["features.denseblock*"])
    """
    from .models import resolve_input_size

    recipe = resolve_recipe(recipe, **fields)
    with paused_gc():
        found = scan(model, resolve_input_size(model, input_size))
        target = model if inplace else copy.deepcopy(model)
        retrofit_scanned(found, target, recipe)
    return target


@contextlib.contextmanager
def paused_gc():
    """Tracing makes many short-lived objects; on a process holding a large model each full
    collection they trigger walks the whole heap (seen: 0.2 s pauses in a 0.1 s resnet101 pass).
    Cycles made meanwhile are collected as usual once the pass is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def retrofit_scanned(found: Scan, target: nn.Module, recipe: Recipe) -> RetrofitInfo:
    """Insert the blocks of ``recipe`` into ``target`` (the scanned model or a copy of it)."""
    prepared = prepare(found, recipe)
    info = RetrofitInfo(recipe, found.traced.input_size, architecture_of(found.traced.model),
                        skipped=list(found.skipped) + prepared.skipped)
    narrow: list[BlockInfo] = []
    for rewrite in prepared.rewrites:
        info.blocks += _install(rewrite, target, recipe, narrow, info.was_none)
    by_config: dict[tuple, list[int]] = {}
    for b in narrow:
        by_config.setdefault((b.config.r, b.config.min_width), []).append(b.channels)
    for (r, min_width), channels in by_config.items():
        warnings.warn(RetrofitWarning(
            f"r={r:g} gives a reduced width below 1 for {len(channels)} block(s) "
            f"(fewest channels: {min(channels)}); raised to min_width={min_width}"), stacklevel=3)
    previous = getattr(target, "_retrofit", None)
    if isinstance(previous, RetrofitInfo):  # a second retrofit adds to the first
        info.blocks = previous.blocks + info.blocks
        info.was_none = previous.was_none + info.was_none
    target._retrofit = info
    if isinstance(target, fx.GraphModule):  # GraphModule's deepcopy keeps only attributes listed here
        target.meta.setdefault("_user_preserved_attributes", {})["_retrofit"] = info
    return info


@dataclass
class Rewrite:
    """One module's forward, rebuilt and checked, with the insertions it will hold (not applied yet)."""

    owner: Call
    graph: OwnerGraph
    spliced: list[tuple[Insertion, Any, Any]]  # (insertion, this level's value node, its users or None)
    names: list[str]                            # the blocks' attribute names on the module
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
            out.append(BlockInfo(prefix + name, ins.position, ins.site.kind, ins.site.module, ins.site.stage,
                                 ins.site.stride, channels, cfg.reduced_width(channels), tuple(size),
                                 layout, ins.site.prefix, cfg))
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
    :func:`retrofit.sweep.sweep` counts exactly the blocks :func:`add_se` would insert, and an error
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
            skipped.append(Skipped(_site_name(ins.site), f"{owner.path or '<model>'} is called "
                                   f"{calls_of[id(owner.module)]} times (a shared module): not rewritten"))
            continue
        by_owner.setdefault(id(owner), (owner, []))[1].append(ins)
    rewrites, failures, planned = [], Counter(), len(skipped)
    for owner, group in by_owner.values():
        try:
            rewrites.append(_prepare(owner, group, found.traced, recipe))
        except CannotRewrite as err:
            skipped += [Skipped(_site_name(ins.site), f"{owner.path or '<model>'}: {err}") for ins in group]
            failures[f"{err}"] += len(group)
    if not rewrites:
        why = Counter(s.reason for s in skipped[:planned]) + failures  # a rewrite's reason once, not per module
        reasons = "; ".join(f"{n} site(s): {reason}" for reason, n in why.most_common())
        block = "" if isinstance(recipe.module, StageMap) or recipe.overrides else f"{recipe.module} "
        raise RetrofitError(f"no {block}block could be inserted in {model_name(found.traced.model)} "
                            f"({reasons})")
    return Prepared(rewrites, skipped)


# -- planning -----------------------------------------------------------------------------------
def plan(found: Scan, recipe: Recipe) -> tuple[list[Insertion], list[Skipped]]:
    """The insertions ``recipe`` asks for in a scanned model: at the discovered sites its position
    applies to, and on the modules its ``at`` globs name (site kinds and stages checked, and the
    per-stage maps and overrides: their stages and globs exist, every site's block can be built)."""
    name = model_name(found.traced.model)
    kinds = recipe.kinds if recipe.kinds is not None or recipe.at is None else (NAMED,)
    candidates = _discovered(found, recipe, kinds, name) if set(kinds or KINDS) - {NAMED} else []
    if recipe.at is not None and NAMED in (kinds or ()):
        candidates += named_sites(found.traced, recipe.at, name)
    if recipe.stages is not None:
        require_stages(recipe.stages, {s.stage for s in candidates}, name, position=recipe.position)
    check_variations(candidates, recipe, name)
    if recipe.stages is not None:
        candidates = [s for s in candidates if s.stage in recipe.stages]
    candidates = select(candidates, recipe, name)
    position = POSITIONS[recipe.position]
    insertions, skipped = [], []
    for site in candidates:
        recipe.block_for(site.stage, site.module)  # a combination that cannot be built: RecipeError
        if site.kind == NAMED:  # on the module's output, whatever the position
            insertions.append(Insertion(site, site.refs.anchor, None, "at"))
            continue
        try:
            insertions.append(position.place(site))
        except SkipSite as err:
            skipped.append(Skipped(_site_name(site), f"{recipe.position}: {err}"))
    if not insertions:
        raise RetrofitError(f"position '{recipe.position}' has no usable site in {name}: "
                            f"{skipped[0].reason}")
    return insertions, skipped


def _discovered(found: Scan, recipe: Recipe, kinds: tuple[str, ...] | None, name: str) -> list:
    """The discovered sites (residual, Inception, 3x3 conv) of the kinds asked for that the recipe's
    position applies to."""
    position = POSITIONS[recipe.position]
    candidates = [s for s in found.sites if s.kind in position.kinds]
    if kinds is not None:
        candidates = [s for s in candidates if s.kind in kinds]
        if not candidates and found.sites:
            wanted = [k for k in kinds if k != NAMED]
            raise RetrofitError(f"kinds {','.join(wanted)} have no site in {name} for position "
                                f"'{recipe.position}': the model has {found.summary()}")
    if not candidates:
        usable = [p for p, spec in POSITIONS.items() if any(s.kind in spec.kinds for s in found.sites)]
        if usable:
            hint = f"positions that fit it: {', '.join(usable)}"
        elif found.skipped:
            reason, n = Counter(s.reason for s in found.skipped).most_common(1)[0]
            hint = f"it has no residual or Inception merge the pass supports ({n} candidates skipped: {reason})"
        else:
            hint = "it has no residual or Inception merge at all"
        raise RetrofitError(f"position '{recipe.position}' has no site in {name}: it needs "
                            f"{' or '.join(position.kinds)} sites and the model has {found.summary()}; {hint}; "
                            f"`at:` puts blocks on the outputs of modules you name")
    return candidates


def require_stages(keys: Iterable[int], present: Iterable[int], name: str, *, position: str | None = None,
                   what: str | None = None) -> None:
    """A stage key (of ``stages``, a per-stage map, an override, a sweep axis: ``what``) that no site of
    model ``name`` (of ``position``'s sites) lies in is a typo: one error naming the stages there are."""
    present = sorted(set(present))
    absent = [k for k in keys if k not in present]
    if absent:
        where = f" for position '{position}'" if position else ""
        raise RetrofitError(f"{f'{what}: ' if what else ''}stage {','.join(map(str, absent))} does not exist in "
                            f"{name}{where}: its sites are in stages {','.join(map(str, present))} "
                            f"(stage = log2 of the output stride)")


def check_variations(candidates: list, recipe: Recipe, name: str) -> None:
    """The stage keys of the recipe's per-stage maps and the selections of its overrides, against the
    sites of its position in the model (before ``stages``/``only``/``skip`` narrow them, so one
    recipe file serves several selections): a stage the model does not have, an override glob that
    matches no site, is a typo and an error."""
    if not recipe.varies:
        return
    stages = {s.stage for s in candidates}

    def missing(keys, what):
        require_stages(keys, stages, name, position=recipe.position, what=what)
    for field_name in BLOCK_FIELDS:
        value = getattr(recipe, field_name)
        if isinstance(value, StageMap):
            missing(value.stages, f"recipe field '{field_name}'")
    modules = sorted({s.module or "<model>" for s in candidates})
    shown = ", ".join(modules[:8]) + (f" ... ({len(modules)} in all)" if len(modules) > 8 else "")
    for i, o in enumerate(recipe.overrides):
        what = f"recipe field 'overrides', entry {i + 1}"
        missing(o.stages or (), what)
        in_stages = [s for s in candidates if o.stages is None or s.stage in o.stages]
        for pattern in o.only or ():
            if not any(matches(s.module, pattern) for s in in_stages):
                where = f" in stages {','.join(map(str, o.stages))}" if o.stages else ""
                raise RetrofitError(f"{what}: only glob '{pattern}' matches no site of position "
                                    f"'{recipe.position}'{where} in {name}; site modules: {shown} "
                                    f"(`retrofit sites MODEL` lists them)")


def select(candidates: list, recipe: Recipe, name: str) -> list:
    """The candidates that the recipe's ``only``/``skip`` globs keep; a glob that matches no candidate
    is an error (it is a typo, or a part of the model without sites for this position)."""
    if recipe.only is None and recipe.skip is None:
        return candidates
    modules = sorted({s.module or "<model>" for s in candidates})
    shown = ", ".join(modules[:8]) + (f" ... ({len(modules)} in all)" if len(modules) > 8 else "")
    for field_name in ("only", "skip"):
        for pattern in getattr(recipe, field_name) or ():
            if not any(matches(s.module, pattern) for s in candidates):
                raise RetrofitError(f"{field_name} glob '{pattern}' matches no site of position "
                                    f"'{recipe.position}' in {name}; site modules: {shown} "
                                    f"(`retrofit sites MODEL` lists them)")
    kept = [s for s in candidates
            if (recipe.only is None or any(matches(s.module, p) for p in recipe.only))
            and not any(matches(s.module, p) for p in recipe.skip or ())]
    if not kept:
        raise RetrofitError(f"only {','.join(recipe.only or ['*'])} and skip {','.join(recipe.skip or [])} "
                            f"leave no site of position '{recipe.position}' in {name}")
    return kept


def owner_of(ins: Insertion) -> Call:
    """The innermost module call whose own forward holds the insertion's edges."""
    if ins.users is None:
        return level_of(ins.value)
    calls = [level_of(u) for u in ins.users]
    owner = calls[0]
    for call in calls[1:]:
        ancestors = set()
        c = owner
        while c is not None:
            ancestors.add(id(c))
            c = c.parent
        while id(call) not in ancestors:
            call = call.parent
        owner = call
    return owner


# -- surgery ------------------------------------------------------------------------------------
def _prepare(owner: Call, group: list[Insertion], traced: Traced, recipe: Recipe) -> Rewrite:
    if owner.kept is not None:  # retrofit.opaque: fx cannot trace it, its forward stays as it is
        raise CannotRewrite("its forward is kept as is (fx cannot trace it)")
    if owner.parent is not None and owner.parent.kept is not None and \
            (sequence := fixed_length(owner.args, owner.kwargs)) is not None:
        raise CannotRewrite(f"a forward kept as is passes it {sequence}: a rewritten forward would take "
                            f"only that many (one per image?)")
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
    for (ins, value, users), base in zip(spliced, bases):
        if bases.count(base) > 1:
            base = f"{base}_{clean_name(value.name)}"
        name = _free_name(owner.module, base, taken)
        taken.add(name)
        names.append(name)
    # fused per insertion: only some modules fuse
    rewrite = Rewrite(owner, rebuilt, spliced, names,
                      [_fusable_sum(ins, value, users) if spec.fuses_residual_sum else None
                       for (ins, value, users), spec in zip(spliced, specs)])
    if other is not None:
        rewrite.other, rewrite.other_spliced = other, other_spliced
        rewrite.other_fused = [_fusable_sum(ins, value, users) if spec.fuses_residual_sum else None
                               for (ins, _, _), (value, users), spec in zip(spliced, other_spliced, specs)]
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
            raise CannotRewrite(f"its forward differs in {mode} mode, and the tensor at the {ins.position} "
                                f"position ({value.name}) has no counterpart there")
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
                raise CannotRewrite(f"its forward differs in {mode} mode, and what reads the tensor at the "
                                    f"{ins.position} position ({value.name}) has no counterpart there")
            here.append((ins, value, users))
            there.append((twin, readers))
    return here, there


def _fusable_sum(ins: Insertion, value, users):
    """The residual sum a standard-position block feeds directly (no drop-path between), at this level:
    the block then computes ``x * s + shortcut`` in one pass (``torch.addcmul``), which saves a pass
    over the activations; None when the block feeds anything else."""
    if ins.position != "standard" or ins.site.kind != "residual" or ins.site.layout != "nchw" \
            or users is None or len(users) != 1:
        return None
    (add,) = users
    operands = N.add_operands(add)
    if operands is None or add.kwargs or value not in operands or operands[0] is operands[1]:
        return None
    return add


def _install(rewrite: Rewrite, target: nn.Module, recipe: Recipe, narrow: list[BlockInfo],
             none_attributes: list[str]) -> list[BlockInfo]:
    """Build the blocks of one prepared rewrite on ``target`` and install the rebuilt forward."""
    owner, rebuilt = rewrite.owner, rewrite.graph
    module = target.get_submodule(owner.path) if owner.path else target
    infos = rewrite.blocks(recipe)
    buffers, blocks, was_none = [], [], []  # registered so far, removed again if the rewrite fails
    try:
        graphs = [rebuilt] + ([rewrite.other] if rewrite.other is not None else [])
        for name, tensor in (item for g in graphs for item in g.constants.items()):
            module.register_buffer(name, tensor.clone(), persistent=False)  # kept aside by fx: now the module's
            buffers.append(name)
        for (ins, _, _), name, info in zip(rewrite.spliced, rewrite.names, infos):
            if info.channels / info.config.r < 1 and info.config.reads("r"):
                narrow.append(info)
            block = build_attention(info.config, info.channels, layout=info.layout, prefix=info.prefix,
                                    device=_device_of(module, target), dtype=N.tensor(ins.value).dtype)
            if name in vars(module):  # _free_name reuses an attribute only when it is None
                was_none.append(name)
            setattr(module, name, block)
            blocks.append(name)
        _splice(rebuilt, [(v, u) for _, v, u in rewrite.spliced], rewrite.names, rewrite.fused)
        if rewrite.other is None:
            install_forward(module, rebuilt.graph)
        else:
            other = rewrite.other
            _splice(other, rewrite.other_spliced, rewrite.names, rewrite.other_fused)
            mode = owner.module.training  # the mode the analysis graph was traced in
            install_forward(module, {mode: rebuilt.graph, not mode: other.graph})
    except BaseException:
        for name in buffers + blocks:
            delattr(module, name)
        for name in was_none:  # timm's `self.se = None`: its forward still reads it
            setattr(module, name, None)
        raise
    prefix = f"{owner.path}." if owner.path else ""
    none_attributes += [prefix + name for name in was_none]
    return infos


def _base_name(ins: Insertion, owner: Call) -> str:
    """``se`` at the standard position (timm's name), ``se_<position>`` at the others; a block on a
    named module's output (``at``) is ``se_<its path from there>`` in the forward that reads it
    (``features.se_denseblock1``, ``se_blocks_0``), or ``se_out`` at the end of its own forward."""
    if ins.position == "at":
        if ins.site.module == owner.path:
            return "se_out"
        relative = ins.site.module[len(owner.path) + 1:] if owner.path else ins.site.module
        return "se_" + relative.replace(".", "_")
    return "se" if ins.position == "standard" else f"se_{ins.position}"


def _splice(owner: OwnerGraph, spliced: list[tuple[Any, Any]], names: list[str], fused: list[Any]) -> None:
    """Call the blocks ``names`` on the values of ``spliced`` in ``owner``'s graph; a fused residual sum
    is replaced by ``block(value, shortcut)``."""
    graph, replaced = owner.graph, {}  # a fused sum -> the block now computing it (a nested unit's branch may end in it)
    for (value, users), name, add in zip(spliced, names, fused or [None] * len(spliced)):
        value = replaced.get(value, value)
        if add is None:
            owner.splice(value, users, name)
        else:  # block(value, shortcut) replaces the sum
            a, b = N.add_operands(add)
            with graph.inserting_after(add):
                se = graph.call_module(name, (value, b if a is value else a))
            add.replace_all_uses_with(se)
            graph.erase_node(add)
            replaced[add] = se


def _free_name(module: nn.Module, base: str, taken: set = frozenset()) -> str:
    name, k = base, 2
    while getattr(module, name, None) is not None or name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _device_of(module: nn.Module, model: nn.Module):
    for source in (module, model):
        for t in source.parameters():
            return t.device
        for t in source.buffers():
            return t.device
    return None


def _site_name(site) -> str:
    return f"{site.module or '<model>'} ({site.kind} {site.node})"


# -- names --------------------------------------------------------------------------------------------
def architecture_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def model_name(model: nn.Module) -> str:
    return architecture_of(model) or type(model).__name__
