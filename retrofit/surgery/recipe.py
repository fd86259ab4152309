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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..blocks.config import BLOCK_FIELDS, BlockConfig
from ..blocks.config import DEFAULTS as _BLOCK
from ..errors import RecipeError
from .per_site import check_resolvable, resolve_block
from .positions import POSITIONS
from .recipe_fields import CHECKS, Override, StageMap, base_value, show, show_bias, staged
from .sites import NAMED


@dataclass(frozen=True)
class Recipe:
    """How to retrofit SE blocks into a model.

    Args:
        position: where each block goes: ``standard``, ``pre``, ``post``, ``identity`` or ``inside``
            (see :mod:`retrofit.surgery.positions`).
        r: reduction ratio; a block on C channels squeezes them to about C / r.
        squeeze: global pooling of the squeeze step: ``avg`` (the paper's) or ``max``.
        gate: the excitation's last activation: ``sigmoid``, ``hard_sigmoid``, ``tanh`` or ``relu``.
        stages: stages that get blocks (stage = log2 of the output stride: 2 is the first ResNet
            stage, 5 the last); ``None`` means all.
        divisor: the reduced width is rounded to a multiple of this (timm uses 8).
        min_width: smallest reduced width (timm uses the divisor).
        bias: whether the two 1x1 convolutions have biases (timm and the released models do; the
            paper's parameter count does not).
        init: ``preserve`` starts every block as an exact identity, so the model computes what it did
            before; ``paper`` uses PyTorch's default random initialisation.
        module: the block to insert, by name (:mod:`retrofit.blocks.attention`): ``se`` (the default),
            ``ese``, ``eca``, ``ceca``, ``cbam``, ``gc``.
        allow_wide: allow r below 1 (blocks wider than their input); without it such an r is refused,
            and even with it r is at least 1/16 (``divisor``/``min_width``: at most 1024), so no
            recipe, file or flag can ask for a block far larger than the layer it serves.
        kinds: site kinds that get blocks: ``residual``, ``inception``, ``conv3x3`` (``inside`` is
            accepted for it), ``pyramid`` (feature-pyramid merges: an FPN's top-down sums, not residual
            units), ``module`` (the ``at`` sites); ``None`` means every kind the position applies to
            except ``pyramid`` (with ``at``: the ``at`` sites only).
        only: module-path globs (``fnmatch``, e.g. ``layer3.*``); only sites whose owning module, or
            one of its parents, matches one of them get blocks. ``None``: every site.
        skip: module-path globs of sites that get no block (matched like ``only``).
        overrides: an ordered list of entries, each selecting sites by ``stages`` and/or ``only``
            (module-path globs, matched like ``only``; both given: sites in both) and setting block
            fields for them, e.g. ``[{"stages": [4, 5], "r": 32}, {"only": ["layer4.2"], "module": "eca"}]``.
        at: module-path globs (``features.denseblock*``; ``*`` within one name, ``**`` across names):
            a block on the output of each module they match, as sites of kind ``module``
            (:mod:`retrofit.surgery.named`), whatever the position. With ``at`` and no ``kinds``, these are
            the only sites; ``kinds: [residual, module]`` adds the discovered ones.

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

    # the block fields take their defaults from BlockConfig; each may be a StageMap (see above)
    position: str = "standard"
    r: float | StageMap = _BLOCK["r"]
    squeeze: str | StageMap = _BLOCK["squeeze"]
    gate: str | StageMap = _BLOCK["gate"]
    stages: tuple[int, ...] | None = None
    divisor: int | StageMap = _BLOCK["divisor"]
    min_width: int | StageMap = _BLOCK["min_width"]
    bias: bool | StageMap = _BLOCK["bias"]
    init: str | StageMap = _BLOCK["init"]
    module: str | StageMap = _BLOCK["module"]
    allow_wide: bool | StageMap = _BLOCK["allow_wide"]
    kinds: tuple[str, ...] | None = None
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    overrides: tuple[Override, ...] = ()
    at: tuple[str, ...] | None = None

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, CHECKS[f.name](getattr(self, f.name)))
        self.block  # noqa: B018 - the block fields together: a module's fields, the init's gate
        check_resolvable(self)
        found = [k for k in self.kinds or () if k != NAMED]  # `at` sites take any position
        if found and not set(found) & set(POSITIONS[self.position].kinds):
            raise RecipeError(f"recipe fields 'kinds', 'position': position '{self.position}' applies to "
                              f"{' and '.join(POSITIONS[self.position].kinds)} sites, not to "
                              f"{', '.join(found)}; choose kinds it applies to or another position")
        if (NAMED in (self.kinds or ())) != (self.at is not None) and self.kinds is not None:
            raise RecipeError("recipe fields 'kinds', 'at': kind 'module' is the sites `at` names; give both "
                              "(at: [module globs] and module in kinds) or neither")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path) -> Recipe:
        """A built-in recipe by name (``"timm"``, ``"post"``...) or a YAML file by path."""
        path = _find(source)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"recipe {source}: not valid YAML{where}; fix the file") from None
        except OSError as err:
            raise RecipeError(f"recipe {source}: cannot read it ({err.strerror})") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise RecipeError(f"recipe {source}: expected a mapping of fields, e.g. 'position: post'")
        return cls.from_dict(data, origin=f"recipe {source}")

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
        return (f"position {self.position}, r {show(self.r)}, {show(self.squeeze)} squeeze, "
                f"{show(self.gate)} gate, {stages}, divisor {show(self.divisor)}, min width "
                f"{show(self.min_width)}, {show_bias(self.bias)}, init {show(self.init)}"
                + self._describe_selection())

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
    return {p.name[:-5]: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


# -- validation ---------------------------------------------------------------------------------
def _find(source: str | Path) -> Path:
    text = str(source)
    builtins = builtin_recipes()
    if isinstance(source, str) and text in builtins:
        return builtins[text]
    path = Path(text).expanduser()
    if path.is_file():
        return path
    looks_like_path = any(s in text for s in "/\\") or path.suffix in (".yaml", ".yml")
    if looks_like_path:
        raise RecipeError(f"recipe file {text} not found; give an existing YAML file or a built-in "
                          f"name ({', '.join(builtins)})")
    raise RecipeError(f"unknown recipe '{text}'; built-in recipes: {', '.join(builtins)} "
                      f"(or give the path of a YAML file)")


def _check_keys(data: Mapping[str, Any], origin: str) -> None:
    allowed = [f.name for f in fields(Recipe)]
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{origin}: unknown field '{key}'; allowed fields: {', '.join(allowed)}")


