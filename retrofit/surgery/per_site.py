"""A recipe resolved at one site: the :class:`~retrofit.blocks.config.BlockConfig` its block is built by.

Each block field's value at a site comes from, lowest priority first: the recipe's base fields, its
per-stage maps, the overrides that select the site, in order (:class:`~retrofit.surgery.Recipe`
documents the rule). A field the site's module does not read is an error when it is set with or
over the module, and is dropped when it comes from below.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..blocks.attention import ATTENTIONS
from ..blocks.config import ALWAYS_READ, BLOCK_FIELDS, BlockConfig
from ..blocks.config import DEFAULTS as _BLOCK
from ..errors import RecipeError
from .recipe_fields import StageMap, base_value

if TYPE_CHECKING:
    from .recipe import Recipe


def _sources(recipe: Recipe, stage: int | None, applying: tuple[int, ...]) -> tuple[dict, dict]:
    """Each block field's value at a site and where it comes from: -1 its default, 0 the base fields,
    1 a per-stage map, 2 + i override i (a higher number wins)."""
    values, layers = {}, {}
    for name in BLOCK_FIELDS:
        field_value = getattr(recipe, name)
        if isinstance(field_value, StageMap) and stage in field_value.stages:
            values[name], layers[name] = field_value.get(stage), 1
        else:
            values[name] = base_value(field_value)
            layers[name] = 0 if values[name] != _BLOCK[name] else -1
    for i in applying:
        for name, value in recipe.overrides[i].values:
            values[name], layers[name] = value, 2 + i
    return values, layers


@functools.lru_cache(maxsize=1024)
def resolve_block(recipe: Recipe, stage: int | None, applying: tuple[int, ...]) -> BlockConfig:
    """The BlockConfig at a site of ``stage`` that the overrides ``applying`` select (cached: a model
    has many sites and few distinct combinations)."""
    values, layers = _sources(recipe, stage, applying)
    module = values["module"]
    reads = set(ATTENTIONS[module].fields) | set(ALWAYS_READ)

    def origin(name):
        layer = layers[name]
        return "the base fields" if layer <= 0 else "its per-stage map" if layer == 1 else f"override {layer - 1}"

    where = "the stages no map names" if stage is None else f"stage {stage}"
    if applying:
        where += f" with override{'s' if len(applying) > 1 else ''} {', '.join(str(i + 1) for i in applying)}"
    for name in BLOCK_FIELDS:
        if name in reads or layers[name] < 0:
            continue
        if layers[name] >= layers["module"]:  # set with or over the module: a mistake, not a leftover
            raise RecipeError(
                f"recipe field '{name}' ({origin(name)}) does not apply to module '{module}' "
                f"({origin('module')}) at {where}: it reads "
                f"{', '.join(ATTENTIONS[module].fields) or 'no block field'}; remove it there"
            )
        values[name] = _BLOCK[name]  # from below the module's entry: that module has no use for it
    try:
        return BlockConfig(**values)
    except RecipeError as err:
        raise RecipeError(f"recipe at {where}: {err}") from None


def check_resolvable(recipe: Recipe) -> None:
    """Every combination the recipe can resolve to, as far as it is known without a model: each
    stage a map or an override names (and the stages none names), with the overrides that select
    every site of it, and each override with a glob added alone. The rest is checked per site when
    a model is planned."""
    if not recipe.varies:
        return
    named = {s for n in BLOCK_FIELDS if isinstance(getattr(recipe, n), StageMap) for s in getattr(recipe, n).stages}
    named |= {s for o in recipe.overrides for s in o.stages or ()}
    for stage in [*sorted(named), None]:
        sure = [i for i, o in enumerate(recipe.overrides) if o.only is None and o.selects(stage, None)]
        maybe = [
            i for i, o in enumerate(recipe.overrides) if o.only is not None and (o.stages is None or stage in o.stages)
        ]
        resolve_block(recipe, stage, tuple(sure))
        for i in maybe:
            resolve_block(recipe, stage, tuple(sorted([*sure, i])))
