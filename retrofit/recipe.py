"""Recipes: where the SE blocks go and how they are built.

A :class:`Recipe` is a frozen dataclass. The same fields are the keys of a recipe YAML file, the
keyword arguments of :func:`retrofit.add_se` and the options of ``retrofit add-se``; one validator per
field checks all three, so every bad value is reported the same way, naming the field and the allowed
values. Built-in recipes live in ``recipes/`` (shipped inside the wheel as ``retrofit/recipes``)::

    >>> Recipe.load("timm")                      # a built-in, by name
    >>> Recipe.load("my_recipe.yaml")            # any YAML file
    >>> Recipe(position="inside", r=8).replace(stages=[4])
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from timm.layers import make_divisible

from .errors import RecipeError
from .positions import POSITIONS
from .se import GATES, SQUEEZES
from .sites import KINDS, NAMED

INITS = ("preserve", "paper")


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
            accepted for it), ``module`` (the ``at`` sites); ``None`` means every kind the position
            applies to (with ``at``: the ``at`` sites only).
        only: module-path globs (``fnmatch``, e.g. ``layer3.*``); only sites whose owning module, or
            one of its parents, matches one of them get blocks. ``None``: every site.
        skip: module-path globs of sites that get no block (matched like ``only``).
        at: module-path globs (``features.denseblock*``; ``*`` within one name, ``**`` across names):
            a block on the output of each module they match, as sites of kind ``module``
            (:mod:`retrofit.named`), whatever the position. With ``at`` and no ``kinds``, these are
            the only sites; ``kinds: [residual, module]`` adds the discovered ones.
    """

    position: str = "standard"
    r: float = 16
    squeeze: str = "avg"
    gate: str = "sigmoid"
    stages: tuple[int, ...] | None = None
    divisor: int = 1
    min_width: int = 1
    bias: bool = True
    init: str = "preserve"
    module: str = "se"
    kinds: tuple[str, ...] | None = None
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    at: tuple[str, ...] | None = None

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name)))
        _check_module(self)
        found = [k for k in self.kinds or () if k != NAMED]  # `at` sites take any position
        if found and not set(found) & set(POSITIONS[self.position].kinds):
            raise RecipeError(f"recipe fields 'kinds', 'position': position '{self.position}' applies to "
                              f"{' and '.join(POSITIONS[self.position].kinds)} sites, not to "
                              f"{', '.join(found)}; choose kinds it applies to or another position")
        if (NAMED in (self.kinds or ())) != (self.at is not None) and self.kinds is not None:
            raise RecipeError("recipe fields 'kinds', 'at': kind 'module' is the sites `at` names; give both "
                              "(at: [module globs] and module in kinds) or neither")
        if self.init == "preserve" and not self.bias and GATES[self.gate].at_zero == 0:
            raise RecipeError(
                f"recipe fields 'init', 'bias', 'gate': init 'preserve' without biases needs a gate "
                f"that is non-zero at 0 ({', '.join(g for g, s in GATES.items() if s.at_zero)}); "
                f"gate '{self.gate}' is 0 there. Use bias: true, another gate, or init: paper")

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
        for name in ("kinds", "only", "skip", "at"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    # -- what the recipe implies ---------------------------------------------------------------
    def width(self, channels: int) -> int:
        """Reduced width of a block on ``channels`` channels (timm's ``make_divisible`` rounding)."""
        return make_divisible(channels / self.r, self.divisor, min_value=self.min_width, round_limit=0.0)

    def describe(self) -> str:
        stages = "all stages" if self.stages is None else "stages " + ",".join(map(str, self.stages))
        return (f"position {self.position}, r {self.r}, {self.squeeze} squeeze, {self.gate} gate, "
                f"{stages}, divisor {self.divisor}, min width {self.min_width}, "
                f"{'with' if self.bias else 'no'} bias, init {self.init}" + self._describe_selection())

    def _describe_selection(self) -> str:
        """Module and selection, named only when they differ from the defaults (SE on every site)."""
        parts = [] if self.module == "se" else [f"module {self.module}"]
        for name in ("kinds", "only", "skip", "at"):
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


def _choice(name: str, allowed: Callable[[], Any]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        options = list(allowed())
        if not isinstance(value, str) or value.lower() not in options:
            raise RecipeError(f"recipe field '{name}': unknown value {value!r}; allowed: {', '.join(options)}")
        return value.lower()
    return check


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _ratio(value: Any) -> float:
    r = _number(value)
    if r is None or not math.isfinite(r) or r <= 0:
        raise RecipeError(f"recipe field 'r': the reduction ratio must be a positive number, got {value!r}")
    return int(r) if r.is_integer() else r


def _positive_int(name: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        n = _number(value)
        if n is None or not n.is_integer() or n < 1:
            raise RecipeError(f"recipe field '{name}': must be a whole number >= 1, got {value!r}")
        return int(n)
    return check


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


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise RecipeError(f"recipe field 'bias': expected true or false, got {value!r}")


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


def _check_module(recipe: "Recipe") -> None:
    """The fields a module ignores must keep their defaults; preserve needs a gate that can preserve."""
    from .attention import ATTENTIONS, BLOCK_FIELDS, preserve_needs_gate, zero_gate_gates

    spec = ATTENTIONS[recipe.module]
    defaults = Recipe.__dataclass_fields__
    ignored = [f for f in BLOCK_FIELDS if f not in spec.fields and getattr(recipe, f) != defaults[f].default]
    if ignored:
        raise RecipeError(f"recipe field '{ignored[0]}' does not apply to module '{recipe.module}' (it reads "
                          f"{', '.join(spec.fields) or 'no block field'}); leave it at its default "
                          f"({defaults[ignored[0]].default}) or use module se")
    if recipe.init == "preserve" and preserve_needs_gate(recipe.module) and recipe.gate in zero_gate_gates():
        raise RecipeError(f"recipe fields 'init', 'gate', 'module': init 'preserve' for module "
                          f"'{recipe.module}' needs a gate that is non-zero at 0 (sigmoid, hard_sigmoid); "
                          f"gate '{recipe.gate}' is 0 there. Use another gate or init: paper")


def _attentions():
    from .attention import ATTENTIONS

    return ATTENTIONS


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "position": _choice("position", lambda: POSITIONS),
    "r": _ratio,
    "squeeze": _choice("squeeze", lambda: SQUEEZES),
    "gate": _choice("gate", lambda: GATES),
    "stages": _stages,
    "divisor": _positive_int("divisor"),
    "min_width": _positive_int("min_width"),
    "bias": _bool,
    "init": _choice("init", lambda: INITS),
    "module": _choice("module", _attentions),
    "kinds": _names("kinds", lambda: KINDS + (NAMED,), aliases={"inside": "conv3x3"}),
    "only": _names("only"),
    "skip": _names("skip"),
    "at": _names("at"),
}
