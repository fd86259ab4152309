"""Recipes: where the SE blocks go and how they are built.

A :class:`Recipe` is a frozen dataclass. The same fields are the keys of a recipe YAML file, the
keyword arguments of :func:`retrofit.add_se` and the options of ``retrofit add-se``; one validator per
field checks all three, so every bad value is reported the same way, naming the field and the allowed
values. The fields that shape a block (``r``, ``squeeze``, ``gate``, ``divisor``, ``min_width``,
``bias``, ``init``, ``module``) belong to :class:`retrofit.block.BlockConfig`, which holds their
defaults, checks and width rule; a recipe carries them as keys and :attr:`Recipe.block` is the
:class:`~retrofit.block.BlockConfig` they make. Built-in recipes live in ``recipes/`` (shipped inside
the wheel as ``retrofit/recipes``)::

    >>> Recipe.load("timm")                      # a built-in, by name
    >>> Recipe.load("my_recipe.yaml")            # any YAML file
    >>> Recipe(position="inside", r=8).replace(stages=[4])
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .block import BLOCK_FIELDS, CHECKS as BLOCK_CHECKS, DEFAULTS as _BLOCK, BlockConfig
from .block import choice as _choice, positive_int as _positive_int
from .errors import RecipeError
from .positions import POSITIONS
from .sites import KINDS


@dataclass(frozen=True)
class Recipe:
    """How to retrofit SE blocks into a model.

    Args:
        position: where each block goes: ``standard``, ``pre``, ``post``, ``identity`` or ``inside``
            (see :mod:`retrofit.positions`).
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
        module: the block to insert, by name (:mod:`retrofit.attention`): ``se`` (the default),
            ``ese``, ``eca``, ``ceca``, ``cbam``, ``gc``.
        kinds: site kinds that get blocks: ``residual``, ``inception``, ``conv3x3`` (``inside`` is
            accepted for it); ``None`` means every kind the position applies to.
        only: module-path globs (``fnmatch``, e.g. ``layer3.*``); only sites whose owning module, or
            one of its parents, matches one of them get blocks. ``None``: every site.
        skip: module-path globs of sites that get no block (matched like ``only``).
    """

    position: str = "standard"
    r: float = _BLOCK["r"]
    squeeze: str = _BLOCK["squeeze"]
    gate: str = _BLOCK["gate"]
    stages: tuple[int, ...] | None = None
    divisor: int = _BLOCK["divisor"]
    min_width: int = _BLOCK["min_width"]
    bias: bool = _BLOCK["bias"]
    init: str = _BLOCK["init"]
    module: str = _BLOCK["module"]
    kinds: tuple[str, ...] | None = None
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name)))
        self.block  # noqa: B018 - the block fields together: a module's fields, the init's gate
        if self.kinds is not None and not set(self.kinds) & set(POSITIONS[self.position].kinds):
            raise RecipeError(f"recipe fields 'kinds', 'position': position '{self.position}' applies to "
                              f"{' and '.join(POSITIONS[self.position].kinds)} sites, not to "
                              f"{', '.join(self.kinds)}; choose kinds it applies to or another position")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path) -> "Recipe":
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
    def from_dict(cls, data: Mapping[str, Any], origin: str = "recipe") -> "Recipe":
        """Build from a mapping of field names; unknown keys are an error."""
        _check_keys(data, origin)
        try:
            return cls(**data)
        except RecipeError as err:
            raise RecipeError(f"{origin}: {err}") from None

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (``None`` values are ignored, as unset CLI flags)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_keys(changes, "recipe")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as in a YAML file (``stages`` is a list or ``"all"``)."""
        d = dataclasses.asdict(self)
        d["stages"] = "all" if self.stages is None else list(self.stages)
        for name in ("kinds", "only", "skip"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    # -- what the recipe implies ---------------------------------------------------------------
    @functools.cached_property
    def block(self) -> BlockConfig:
        """The block fields as a :class:`~retrofit.block.BlockConfig` (checked together on creation)."""
        return BlockConfig(**{name: getattr(self, name) for name in BLOCK_FIELDS})

    def width(self, channels: int) -> int:
        """Reduced width of a block on ``channels`` channels (timm's ``make_divisible`` rounding)."""
        return self.block.width(channels)

    def describe(self) -> str:
        stages = "all stages" if self.stages is None else "stages " + ",".join(map(str, self.stages))
        return (f"position {self.position}, r {self.r}, {self.squeeze} squeeze, {self.gate} gate, "
                f"{stages}, divisor {self.divisor}, min width {self.min_width}, "
                f"{'with' if self.bias else 'no'} bias, init {self.init}" + self._describe_selection())

    def _describe_selection(self) -> str:
        """Module and selection, named only when they differ from the defaults (SE on every site)."""
        parts = [] if self.module == "se" else [f"module {self.module}"]
        for name in ("kinds", "only", "skip"):
            if getattr(self, name) is not None:
                parts.append(f"{name} {','.join(getattr(self, name))}")
        return "".join(", " + p for p in parts)


def resolve_recipe(recipe: "Recipe | str | Path | Mapping | None" = None, **fields_: Any) -> Recipe:
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


def _stages(value: Any) -> tuple[int, ...] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "")):
        return None
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, numbers.Integral) and not isinstance(items, bool):
        items = [items]
    try:
        stages = tuple(sorted({_positive_int("stages")(s) for s in items}))
    except (TypeError, RecipeError):
        raise RecipeError(f"recipe field 'stages': expected 'all' or stage numbers such as 2,3 "
                          f"(stage = log2 of the output stride), got {value!r}") from None
    if not stages:
        raise RecipeError("recipe field 'stages': empty; use 'all' or stage numbers such as 2,3")
    return stages


def _names(name: str, allowed: Callable[[], Any] | None = None,
           aliases: Mapping[str, str] | None = None) -> Callable[[Any], tuple[str, ...] | None]:
    """A list of names (or globs, ``allowed`` None), or one comma-separated string; None means all."""
    def check(value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or \
                not all(isinstance(i, str) and i.strip() for i in items) or not items:
            raise RecipeError(f"recipe field '{name}': expected a list of "
                              f"{'names' if allowed else 'module-path globs such as layer3.*'}, got {value!r}")
        out = []
        for item in (i.strip() for i in items):
            if allowed is not None:
                item = (aliases or {}).get(item.lower(), item.lower())
                options = list(allowed())
                if item not in options:
                    raise RecipeError(f"recipe field '{name}': unknown value {item!r}; allowed: "
                                      f"{', '.join(options + list(aliases or {}))}")
            if item not in out:
                out.append(item)
        return tuple(out)
    return check


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "position": _choice("position", lambda: POSITIONS),
    "stages": _stages,
    "kinds": _names("kinds", lambda: KINDS, aliases={"inside": "conv3x3"}),
    "only": _names("only"),
    "skip": _names("skip"),
    **BLOCK_CHECKS,  # the block fields: retrofit.block owns their checks
}
