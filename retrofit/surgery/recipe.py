"""Recipes: where the SE blocks go and how they are built.

A :class:`Recipe` is a frozen dataclass. The same fields are the keys of a recipe YAML file, the
keyword arguments of :func:`retrofit.add_se` and the options of ``retrofit add-se``; one validator per
field (:mod:`retrofit.surgery.recipe_fields`) checks all three, so every bad value is reported the same
way, naming the field and the allowed values; a site's block is resolved by
:mod:`retrofit.surgery.per_site`. The fields that shape a block (``r``, ``squeeze``, ``gate``, ``divisor``,
``min_width``, ``bias``, ``init``, ``module``, ``allow_wide``) belong to
:class:`retrofit.blocks.config.BlockConfig`, which holds their defaults, checks and width rule; a recipe
carries them as keys and :attr:`Recipe.block` is the :class:`~retrofit.blocks.config.BlockConfig` they make.
Built-in recipes live in ``recipes/`` (shipped inside the wheel as ``retrofit/recipes``)::

    >>> Recipe.load("timm").divisor               # a built-in, by name (timm's seresnet layout)
    8
    >>> recipe = Recipe.load("my_recipe.yaml")    # any YAML file
    >>> Recipe(position="inside", r=8).replace(stages=[4]).stages
    (4,)

Block fields may vary by stage and by module (see :class:`Recipe` for the priority)::

    >>> Recipe(r={2: 8, 3: 8, 4: 16, 5: 32}, gate={5: "hard_sigmoid"}).r   # per-stage maps
    StageMap(base=16, values=((2, 8), (3, 8), (4, 16), (5, 32)))
    >>> Recipe(r="2:8,5:32").r                                               # the CLI's spelling
    StageMap(base=16, values=((2, 8), (5, 32)))
    >>> recipe = Recipe(overrides=[{"stages": [4, 5], "r": 32}, {"only": ["layer4.2"], "module": "eca"}])
    >>> Recipe(r={5: 32}).block_for(stage=5, path="layer4.2")              # one site's BlockConfig
    BlockConfig(r=32, squeeze='avg', gate='sigmoid', divisor=1, min_width=1, bias=True, init='preserve',
                module='se', allow_wide=False)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..blocks.attention import ATTENTIONS
from ..blocks.config import BLOCK_FIELDS, INITS, BlockConfig, described
from ..blocks.config import DEFAULTS as _BLOCK
from ..blocks.config import HELP as _BLOCK_HELP
from ..blocks.se import GATES, SQUEEZES
from ..errors import RecipeError, excerpt
from ..inputs import read_yaml, regular_file
from .help import RECIPE_HELP
from .per_site import check_resolvable, resolve_block
from .positions import POSITIONS
from .recipe_fields import CHECKS, Override, StageMap, base_value, show, show_bias, staged
from .sites import KINDS, NAMED


def _block(name: str) -> Any:
    """A recipe's block field: BlockConfig's default and help (its owner's)."""
    return dataclasses.field(default=_BLOCK[name], metadata=_BLOCK_HELP[name])


@dataclass(frozen=True)
class Recipe:
    """How to retrofit SE blocks into a model.

    Args:
        {fields}

    Per stage and per module: every block field (``r``, ``squeeze``, ``gate``, ``divisor``,
    ``min_width``, ``bias``, ``init``, ``module``, ``allow_wide``) may also be a map from stage to
    value, e.g. ``r={2: 8, 3: 8, 4: 16, 5: 32}`` or, as text, ``"2:8,3:8,4:16,5:32"``; its ``default``
    key (e.g. ``{"default": 8, 5: 32}``) is the value of the stages it does not name, else the field's
    base value (``replace`` and the CLI keep the recipe's own; a new recipe, the field's default). The
    :class:`~retrofit.blocks.config.BlockConfig` of a site (:meth:`block_for`) takes each field from, lowest
    priority first: the base fields; the per-stage maps; the ``overrides`` that select the site, in
    order (a later entry wins). A field the site's module does not read (ECA has no ``r``) is an
    error when it is set by the same entry as the module or a higher-priority one; set by a lower one,
    it does not apply to that site. Stage keys and override globs are checked against the model when
    it is planned (:func:`retrofit.surgery.plan.plan`): a stage it does not have, a glob that matches no
    site is an error there, the structure and the values here.
    """

    # Each field's help is written once (the block fields' in blocks/help.py, with their defaults in
    # BlockConfig, each of them may be a StageMap, see above; the others' in surgery/help.py: modules without
    # torch, so `add-se --help` reads them) and kept in the field's metadata; the Args above, `add-se --help`,
    # the table and YAML reference of docs/reference/options.md are made from it.
    position: str = described("standard", *RECIPE_HELP["position"])
    r: float | StageMap = _block("r")
    squeeze: str | StageMap = _block("squeeze")
    gate: str | StageMap = _block("gate")
    stages: tuple[int, ...] | None = described(None, *RECIPE_HELP["stages"])
    divisor: int | StageMap = _block("divisor")
    min_width: int | StageMap = _block("min_width")
    bias: bool | StageMap = _block("bias")
    init: str | StageMap = _block("init")
    module: str | StageMap = _block("module")
    allow_wide: bool | StageMap = _block("allow_wide")
    kinds: tuple[str, ...] | None = described(None, *RECIPE_HELP["kinds"])
    only: tuple[str, ...] | None = described(None, *RECIPE_HELP["only"])
    skip: tuple[str, ...] | None = described(None, *RECIPE_HELP["skip"])
    overrides: tuple[Override, ...] = described((), *RECIPE_HELP["overrides"])
    at: tuple[str, ...] | None = described(None, *RECIPE_HELP["at"])

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, CHECKS[f.name](getattr(self, f.name)))
        self.block  # noqa: B018 - the block fields together: a module's fields, the init's gate
        check_resolvable(self)
        found = [k for k in self.kinds or () if k != NAMED]  # `at` sites take any position
        if found and not set(found) & set(POSITIONS[self.position].kinds):
            raise RecipeError(
                f"recipe fields 'kinds', 'position': position '{self.position}' applies to "
                f"{' and '.join(POSITIONS[self.position].kinds)} sites, not to "
                f"{', '.join(found)}; choose kinds it applies to or another position"
            )
        if (NAMED in (self.kinds or ())) != (self.at is not None) and self.kinds is not None:
            raise RecipeError(
                "recipe fields 'kinds', 'at': kind 'module' is the sites `at` names; give both "
                "(at: [module globs] and module in kinds) or neither"
            )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path) -> Recipe:
        """A built-in recipe by name (``"timm"``, ``"post"``...) or a YAML file by path."""
        path = _find(source)
        data = read_yaml(path, "recipe", error=RecipeError)  # bounded: size, depth, no aliases
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise RecipeError(
                f"recipe {excerpt(source, bare=True)}: expected a mapping of fields, e.g. 'position: post'"
            )
        return cls.from_dict(data, origin=f"recipe {excerpt(source, bare=True)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "recipe") -> Recipe:
        """Build from a mapping of field names; unknown keys are an error."""
        _check_keys(data, origin)
        try:
            return cls(**data)
        except RecipeError as err:
            raise RecipeError(f"{origin}: {err}") from None

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (``None`` values are ignored, as unset CLI flags). A
        per-stage map without a ``default`` keeps this recipe's base value for the other stages."""
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_keys(changes, "recipe")
        for name in set(changes) & set(BLOCK_FIELDS):
            changes[name] = staged(name)(changes[name], base=base_value(getattr(self, name)))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as in a YAML file (``stages`` is a list or ``"all"``, a per-stage map a dict
        with its ``default``). ``overrides``, ``allow_wide`` and ``at`` are left out when unused (none, false),
        so files and training checkpoints written before they existed compare equal."""
        d: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            d[f.name] = value.to_dict() if isinstance(value, StageMap) else value
        d["stages"] = "all" if self.stages is None else list(self.stages)
        for name in ("kinds", "only", "skip", "at"):
            d[name] = None if d[name] is None else list(d[name])
        if self.overrides:
            d["overrides"] = [o.to_dict() for o in self.overrides]
        else:
            del d["overrides"]
        if self.allow_wide is False:
            del d["allow_wide"]
        if self.at is None:
            del d["at"]
        return d

    # -- what the recipe implies ---------------------------------------------------------------
    @functools.cached_property
    def block(self) -> BlockConfig:
        """The base block fields (a per-stage map's base value) as a :class:`~retrofit.blocks.config.BlockConfig`,
        checked together on creation: the block of every site no map entry or override names."""
        return BlockConfig(**{name: base_value(getattr(self, name)) for name in BLOCK_FIELDS})

    @property
    def varies(self) -> bool:
        """Whether block fields differ between sites (a per-stage map or an override)."""
        return bool(self.overrides) or any(isinstance(getattr(self, n), StageMap) for n in BLOCK_FIELDS)

    def block_for(self, stage: int, path: str = "") -> BlockConfig:
        """The :class:`~retrofit.blocks.config.BlockConfig` of the site in ``stage`` whose forward is the module
        at ``path`` (see the class docstring for the priority). Raises RecipeError for a combination
        that cannot be built (e.g. ``r`` set on top of a module that has none)."""
        if not self.varies:
            return self.block
        applying = tuple(i for i, o in enumerate(self.overrides) if o.selects(stage, path))
        return resolve_block(self, stage, applying)

    def width(self, channels: int) -> int:
        """Reduced width of a base block on ``channels`` channels (timm's ``make_divisible`` rounding);
        a site's own: ``block_for(stage, path).width(channels)``."""
        return self.block.width(channels)

    def describe(self) -> str:
        stages = "all stages" if self.stages is None else "stages " + ",".join(map(str, self.stages))
        return (
            f"position {self.position}, r {show(self.r)}, {show(self.squeeze)} squeeze, "
            f"{show(self.gate)} gate, {stages}, divisor {show(self.divisor)}, min width "
            f"{show(self.min_width)}, {show_bias(self.bias)}, init {show(self.init)}" + self._describe_selection()
        )

    def _describe_selection(self) -> str:
        """Module, selection and overrides, named only when they differ from the defaults (SE on
        every site)."""
        parts = [] if self.module == "se" else [f"module {show(self.module)}"]
        if self.allow_wide is not False:
            parts.append(f"allow wide {show(self.allow_wide)}")
        for name in ("kinds", "only", "skip", "at"):
            if getattr(self, name) is not None:
                parts.append(f"{name} {','.join(getattr(self, name))}")
        if self.overrides:
            parts.append("overrides " + "; ".join(f"{i + 1}. {o.describe()}" for i, o in enumerate(self.overrides)))
        return "".join(", " + p for p in parts)


def field_doc() -> str:
    """The Args of :class:`Recipe`'s docstring, made from its fields' help."""
    return "\n".join(
        textwrap.fill(f"{f.name}: {f.metadata['help']}", 108, initial_indent=" " * 8, subsequent_indent=" " * 12)
        for f in fields(Recipe)
    )


Recipe.__doc__ = Recipe.__doc__.replace("        {fields}", field_doc())  # field_doc indents its lines itself


def allowed_values() -> dict[str, str]:
    """The values a choice field takes, from the registries (a new position or block shows up here)."""
    return {
        "position": " \\| ".join(POSITIONS),
        "squeeze": " \\| ".join(SQUEEZES),
        "gate": " \\| ".join(GATES),
        "init": " \\| ".join(INITS),
        "module": " \\| ".join(ATTENTIONS),
        "kinds": " \\| ".join((*KINDS, NAMED)),
        "bias": "true \\| false",
        "allow_wide": "true \\| false",
    }


def reference_table() -> str:
    """The recipe's fields as a markdown table (``docs/reference/options.md``): field, default, allowed values, help."""
    allowed = allowed_values()
    rows = ["| field | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    for f in fields(Recipe):
        default = Recipe.__dataclass_fields__[f.name].default
        shown = "all" if f.name == "stages" and default is None else yaml_value(default)
        rows.append(f"| `{f.name}` | `{shown}` | {allowed.get(f.name, '')} | {f.metadata['help']} |")
    return "\n".join(rows)


def reference_yaml() -> str:
    """Every field at its default, each with its help as a comment: the YAML reference of a recipe file."""
    lines = []
    for f in fields(Recipe):
        default = Recipe.__dataclass_fields__[f.name].default
        lines += textwrap.wrap(f.metadata["help"], 100, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"{f.name}: {'all' if f.name == 'stages' and default is None else yaml_value(default)}")
    return "\n".join(lines)


def yaml_value(value: Any) -> str:
    return (
        yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
        .strip()
        .removesuffix("\n...")
        .removesuffix("...")
        .strip()
    )


def resolve_recipe(recipe: Recipe | str | Path | Mapping | None = None, **fields_: Any) -> Recipe:
    """Turn what users pass (a Recipe, a name, a path, a dict or nothing) plus overrides into a Recipe."""
    if recipe is None:
        base = Recipe()
    elif isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, Mapping):
        base = Recipe.from_dict(recipe)
    elif isinstance(recipe, (str, Path)):
        base = Recipe.load(recipe)
    else:
        raise RecipeError(f"recipe must be a Recipe, a name, a YAML path or a dict, not {type(recipe).__name__}")
    return base.replace(**fields_)


def builtin_recipes() -> dict[str, Path]:
    """Names and files of the recipes shipped with the package."""
    root = resources.files("retrofit.recipes")
    return {p.name[:-5]: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")}


# -- validation ---------------------------------------------------------------------------------
def _find(source: str | Path) -> Path:
    text = str(source)
    builtins = builtin_recipes()
    if isinstance(source, str) and text in builtins:
        return builtins[text]
    path = Path(text).expanduser()
    if os.path.lexists(path):  # a directory, a FIFO, a device, a symlink loop: said as what it is
        return regular_file(path, "recipe file", error=RecipeError)
    looks_like_path = any(s in text for s in "/\\") or path.suffix in (".yaml", ".yml")
    if looks_like_path:
        raise RecipeError(
            f"recipe file {excerpt(text, bare=True)} not found; give an existing YAML file or a "
            f"built-in name ({', '.join(builtins)})"
        )
    raise RecipeError(
        f"unknown recipe {excerpt(text)}; built-in recipes: {', '.join(builtins)} (or give the path of a YAML file)"
    )


def _check_keys(data: Mapping[str, Any], origin: str) -> None:
    allowed = [f.name for f in fields(Recipe)]
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{origin}: unknown field {excerpt(key)}; allowed fields: {', '.join(allowed)}")
