"""Plan a recipe on a scanned model: which sites get a block and where each block goes.

The sites the recipe's position applies to, narrowed by its kinds, stages and ``only``/``skip``
globs, plus the modules its ``at`` globs name (:mod:`retrofit.surgery.named`); each site placed by its
position (:mod:`retrofit.surgery.positions`). A stage, glob or kind that selects nothing is a typo and
an error, named with what the model has. Nothing is changed: :mod:`retrofit.surgery.prepare` rebuilds
the forwards the plan touches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ..blocks.config import BLOCK_FIELDS
from ..errors import RetrofitError, excerpt
from ..graph.model import model_name
from ..graph.trace import Call, level_of
from .named import named_sites
from .positions import POSITIONS, Insertion, SkipSite
from .recipe import Recipe
from .recipe_fields import StageMap, matches
from .sites import DEFAULT_OFF, KINDS, NAMED, Scan, Skipped


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
            skipped.append(Skipped(site_name(site), f"{recipe.position}: {err}"))
    if not insertions:
        raise RetrofitError(f"position '{recipe.position}' has no usable site in {name}: {skipped[0].reason}")
    return insertions, skipped


def _discovered(found: Scan, recipe: Recipe, kinds: tuple[str, ...] | None, name: str) -> list:
    """The discovered sites (residual, Inception, 3x3 conv; pyramid merges only when ``kinds`` names
    them) of the kinds asked for that the recipe's position applies to."""
    position = POSITIONS[recipe.position]
    candidates = [
        s for s in found.sites if s.kind in position.kinds and (kinds is not None or s.kind not in DEFAULT_OFF)
    ]
    if kinds is not None:
        candidates = [s for s in candidates if s.kind in kinds]
        if not candidates and found.sites:
            wanted = [k for k in kinds if k != NAMED]
            raise RetrofitError(
                f"kinds {','.join(wanted)} have no site in {name} for position "
                f"'{recipe.position}': the model has {found.summary()}"
            )
    if not candidates:
        usable = [p for p, spec in POSITIONS.items() if any(s.kind in spec.kinds for s in found.sites)]
        if usable:
            hint = f"positions that fit it: {', '.join(usable)}"
        elif found.skipped:
            reason, n = Counter(s.reason for s in found.skipped).most_common(1)[0]
            hint = f"it has no residual or Inception merge the pass supports ({n} candidates skipped: {reason})"
        else:
            hint = "it has no residual or Inception merge at all"
        raise RetrofitError(
            f"position '{recipe.position}' has no site in {name}: it needs "
            f"{' or '.join(position.kinds)} sites and the model has {found.summary()}; {hint}; "
            f"`at:` puts blocks on the outputs of modules you name"
        )
    return candidates


def require_stages(
    keys: Iterable[int], present: Iterable[int], name: str, *, position: str | None = None, what: str | None = None
) -> None:
    """A stage key (of ``stages``, a per-stage map, an override, a sweep axis: ``what``) that no site of
    model ``name`` (of ``position``'s sites) lies in is a typo: one error naming the stages there are."""
    present = sorted(set(present))
    absent = [k for k in keys if k not in present]
    if absent:
        where = f" for position '{position}'" if position else ""
        raise RetrofitError(
            f"{f'{what}: ' if what else ''}stage {excerpt(','.join(map(str, absent[:20])), bare=True)} "
            "does not exist in "
            f"{name}{where}: its sites are in stages {','.join(map(str, present))} "
            f"(stage = log2 of the output stride)"
        )


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
                raise RetrofitError(
                    f"{what}: only glob {excerpt(pattern)} matches no site of position "
                    f"'{recipe.position}'{where} in {name}; site modules: {shown} "
                    f"(`retrofit sites MODEL` lists them)"
                )


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
                raise RetrofitError(
                    f"{field_name} glob {excerpt(pattern)} matches no site of position "
                    f"'{recipe.position}' in {name}; site modules: {shown} "
                    f"(`retrofit sites MODEL` lists them)"
                )
    kept = [
        s
        for s in candidates
        if (recipe.only is None or any(matches(s.module, p) for p in recipe.only))
        and not any(matches(s.module, p) for p in recipe.skip or ())
    ]
    if not kept:
        raise RetrofitError(
            f"only {excerpt(','.join(recipe.only or ['*']), bare=True)} and skip "
            f"{excerpt(','.join(recipe.skip or []), bare=True)} "
            f"leave no site of position '{recipe.position}' in {name}"
        )
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


def site_name(site) -> str:
    return f"{site.module or '<model>'} ({site.kind} {site.node})"
