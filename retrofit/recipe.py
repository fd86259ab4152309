"""Recipes: where the SE blocks go and how they are built.

A :class:`Recipe` is a frozen dataclass. The same fields are the keys of a recipe YAML file, the
keyword arguments of :func:`retrofit.add_se` and the options of ``retrofit add-se``; one validator per
field checks all three, so every bad value is reported the same way, naming the field and the allowed
values. The fields that shape a block (``r``, ``squeeze``, ``gate``, ``divisor``, ``min_width``,
``bias``, ``init``, ``module``, ``allow_wide``) belong to :class:`retrofit.block.BlockConfig`, which holds their
defaults, checks and width rule; a recipe carries them as keys and :attr:`Recipe.block` is the
:class:`~retrofit.block.BlockConfig` they make. Built-in recipes live in ``recipes/`` (shipped inside
the wheel as ``retrofit/recipes``)::

    >>> Recipe.load("timm")                      # a built-in, by name
    >>> Recipe.load("my_recipe.yaml")            # any YAML file
    >>> Recipe(position="inside", r=8).replace(stages=[4])

Block fields may vary by stage and by module (see :class:`Recipe` for the priority)::

    >>> Recipe(r={2: 8, 3: 8, 4: 16, 5: 32}, gate={5: "hard_sigmoid"})   # per-stage maps
    >>> Recipe(r="2:8,5:32")                                             # the CLI's spelling
    >>> Recipe(overrides=[{"stages": [4, 5], "r": 32}, {"only": ["layer4.2"], "module": "eca"}])
    >>> Recipe(r={5: 32}).block_for(stage=5, path="layer4.2")            # one site's BlockConfig
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import fnmatch
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .attention import ATTENTIONS
from .block import ALWAYS_READ, BLOCK_FIELDS, CHECKS as BLOCK_CHECKS, DEFAULTS as _BLOCK, BlockConfig
from .block import choice as _choice, positive_int as _positive_int
from .errors import RecipeError
from .positions import POSITIONS
from .sites import KINDS, NAMED


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
        allow_wide: allow r below 1 (blocks wider than their input); without it such an r is refused,
            and even with it r is at least 1/16 (``divisor``/``min_width``: at most 1024), so no
            recipe, file or flag can ask for a block far larger than the layer it serves.
        kinds: site kinds that get blocks: ``residual``, ``inception``, ``conv3x3`` (``inside`` is
            accepted for it), ``module`` (the ``at`` sites); ``None`` means every kind the position
            applies to (with ``at``: the ``at`` sites only).
        only: module-path globs (``fnmatch``, e.g. ``layer3.*``); only sites whose owning module, or
            one of its parents, matches one of them get blocks. ``None``: every site.
        skip: module-path globs of sites that get no block (matched like ``only``).
        overrides: an ordered list of entries, each selecting sites by ``stages`` and/or ``only``
            (module-path globs, matched like ``only``; both given: sites in both) and setting block
            fields for them, e.g. ``[{"stages": [4, 5], "r": 32}, {"only": ["layer4.2"], "module": "eca"}]``.
        at: module-path globs (``features.denseblock*``; ``*`` within one name, ``**`` across names):
            a block on the output of each module they match, as sites of kind ``module``
            (:mod:`retrofit.named`), whatever the position. With ``at`` and no ``kinds``, these are
            the only sites; ``kinds: [residual, module]`` adds the discovered ones.

    Per stage and per module: every block field (``r``, ``squeeze``, ``gate``, ``divisor``,
    ``min_width``, ``bias``, ``init``, ``module``, ``allow_wide``) may also be a map from stage to
    value, e.g. ``r={2: 8, 3: 8, 4: 16, 5: 32}`` or, as text, ``"2:8,3:8,4:16,5:32"``; its ``default``
    key (e.g. ``{"default": 8, 5: 32}``) is the value of the stages it does not name, else the field's
    base value (``replace`` and the CLI keep the recipe's own; a new recipe, the field's default). The
    :class:`~retrofit.block.BlockConfig` of a site (:meth:`block_for`) takes each field from, lowest
    priority first: the base fields; the per-stage maps; the ``overrides`` that select the site, in
    order (a later entry wins). A field the site's module does not read (ECA has no ``r``) is an
    error when it is set by the same entry as the module or a higher-priority one; set by a lower one,
    it does not apply to that site. Stage keys and override globs are checked against the model when
    it is planned (:func:`retrofit.insert.plan`): a stage it does not have, a glob that matches no
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
            object.__setattr__(self, f.name, _CHECKS[f.name](getattr(self, f.name)))
        self.block  # noqa: B018 - the block fields together: a module's fields, the init's gate
        _check_resolvable(self)
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
        """A copy with some fields changed (``None`` values are ignored, as unset CLI flags). A
        per-stage map without a ``default`` keeps this recipe's base value for the other stages."""
        changes = {k: v for k, v in changes.items() if v is not None}
        _check_keys(changes, "recipe")
        for name in set(changes) & set(BLOCK_FIELDS):
            changes[name] = _staged(name)(changes[name], base=base_value(getattr(self, name)))
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
        """The base block fields (a per-stage map's base value) as a :class:`~retrofit.block.BlockConfig`,
        checked together on creation: the block of every site no map entry or override names."""
        return BlockConfig(**{name: base_value(getattr(self, name)) for name in BLOCK_FIELDS})

    @property
    def varies(self) -> bool:
        """Whether block fields differ between sites (a per-stage map or an override)."""
        return bool(self.overrides) or any(isinstance(getattr(self, n), StageMap) for n in BLOCK_FIELDS)

    def block_for(self, stage: int, path: str = "") -> BlockConfig:
        """The :class:`~retrofit.block.BlockConfig` of the site in ``stage`` whose forward is the module
        at ``path`` (see the class docstring for the priority). Raises RecipeError for a combination
        that cannot be built (e.g. ``r`` set on top of a module that has none)."""
        if not self.varies:
            return self.block
        applying = tuple(i for i, o in enumerate(self.overrides) if o.selects(stage, path))
        return _resolve(self, stage, applying)

    def width(self, channels: int) -> int:
        """Reduced width of a base block on ``channels`` channels (timm's ``make_divisible`` rounding);
        a site's own: ``block_for(stage, path).width(channels)``."""
        return self.block.width(channels)

    def describe(self) -> str:
        stages = "all stages" if self.stages is None else "stages " + ",".join(map(str, self.stages))
        return (f"position {self.position}, r {_show(self.r)}, {_show(self.squeeze)} squeeze, "
                f"{_show(self.gate)} gate, {stages}, divisor {_show(self.divisor)}, min width "
                f"{_show(self.min_width)}, {_show_bias(self.bias)}, init {_show(self.init)}"
                + self._describe_selection())

    def _describe_selection(self) -> str:
        """Module, selection and overrides, named only when they differ from the defaults (SE on
        every site)."""
        parts = [] if self.module == "se" else [f"module {_show(self.module)}"]
        if self.allow_wide is not False:
            parts.append(f"allow wide {_show(self.allow_wide)}")
        for name in ("kinds", "only", "skip", "at"):
            if getattr(self, name) is not None:
                parts.append(f"{name} {','.join(getattr(self, name))}")
        if self.overrides:
            parts.append("overrides " + "; ".join(f"{i + 1}. {o.describe()}" for i, o in enumerate(self.overrides)))
        return "".join(", " + p for p in parts)


@dataclass(frozen=True)
class StageMap:
    """A block field given per stage: ``values`` names stages, ``base`` holds for the others."""

    base: Any
    values: tuple[tuple[int, Any], ...]  # (stage, value), by stage

    def get(self, stage: int | None) -> Any:
        return dict(self.values).get(stage, self.base)

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.values)

    def to_dict(self) -> dict[Any, Any]:
        return {"default": self.base, **dict(self.values)}

    def label(self, implied: Any = None) -> str:
        """The CLI's spelling, e.g. ``default:8,2:4,5:32``; without ``default`` when the base is
        ``implied`` (the field's default, say), e.g. ``2:4,5:32``."""
        d = self.to_dict()
        if self.base == implied:
            del d["default"]
        return ",".join(f"{k}:{_plain(v)}" for k, v in d.items())

    def __str__(self) -> str:
        return f"{_plain(self.base)} ({', '.join(f'stage {s}: {_plain(v)}' for s, v in self.values)})"


@dataclass(frozen=True)
class Override:
    """One entry of :attr:`Recipe.overrides`: block field values for the sites it selects."""

    stages: tuple[int, ...] | None = None  # None: any stage
    only: tuple[str, ...] | None = None    # None: any module
    values: tuple[tuple[str, Any], ...] = ()  # (block field, value), in BLOCK_FIELDS order

    def selects(self, stage: int | None, path: str | None) -> bool:
        """Whether the site in ``stage`` of the module at ``path`` is selected (``None``: unknown,
        not selected unless the entry does not ask)."""
        if self.stages is not None and stage not in self.stages:
            return False
        return self.only is None or (path is not None and any(matches(path, p) for p in self.only))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.stages is not None:
            d["stages"] = list(self.stages)
        if self.only is not None:
            d["only"] = list(self.only)
        return {**d, **dict(self.values)}

    def describe(self) -> str:
        where = " ".join(p for p in (self.stages and "stages " + ",".join(map(str, self.stages)),
                                     self.only and "only " + ",".join(self.only)) if p)
        return f"{where}: " + ", ".join(f"{k} {_plain(v)}" for k, v in self.values)


def base_value(value: Any) -> Any:
    """A field's value where no stage is named: the value itself, or a per-stage map's base."""
    return value.base if isinstance(value, StageMap) else value


def matches(path: str, pattern: str) -> bool:
    """Whether a site's owning module ``path``, or one of its parents, matches the glob ``pattern``
    (so ``layer3`` selects every site inside ``layer3``; ``<model>`` is the model's own forward)."""
    parts = path.split(".") if path else []
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] or ["<model>"]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _show(value: Any) -> str:
    return str(value) if isinstance(value, StageMap) else _plain(value)


def _show_bias(value: Any) -> str:
    if isinstance(value, StageMap):
        return f"bias {value}"
    return "with bias" if value else "no bias"


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


# -- per-stage maps and overrides -------------------------------------------------------------------
_PAIRS = "give stage:value pairs such as 2:8,5:32 ('default:V' for the stages not named)"


def _staged(name: str) -> Callable[..., Any]:
    """The check of block field ``name`` (:data:`retrofit.block.CHECKS`), also taking a per-stage map:
    a mapping ``{stage: value}``, a :class:`StageMap`, or text ``"2:8,5:32"``; each value checked by
    the field's own validator, each key a stage number (or ``default``). ``base`` is the value of the
    stages a map does not name, unless it has a ``default`` key."""
    check = BLOCK_CHECKS[name]

    def parse(value: Any, base: Any = _BLOCK[name]) -> Any:
        if isinstance(value, StageMap):
            value, base = dict(value.values), value.base
        elif isinstance(value, str) and ":" in value:
            value = _pairs(name, value)
        if not isinstance(value, Mapping):
            return check(value)
        if not value:
            raise RecipeError(f"recipe field '{name}': an empty per-stage map; {_PAIRS}")
        entries: dict[int, Any] = {}
        for key, item in value.items():
            stage = _stage_key(name, key)
            if isinstance(item, (Mapping, list, tuple, set)):
                raise RecipeError(f"recipe field '{name}': stage {key} maps to {item!r}, not to one value; {_PAIRS}")
            try:
                checked = check(item)
            except RecipeError as err:
                where = "default" if stage is None else f"stage {stage}"
                raise RecipeError(str(err).replace(f"recipe field '{name}':", f"recipe field '{name}' ({where}):", 1)) from None
            if stage is None:
                base = checked
            elif stage in entries:
                raise RecipeError(f"recipe field '{name}': stage {stage} is given twice")
            else:
                entries[stage] = checked
        base = check(base)
        return StageMap(base, tuple(sorted(entries.items()))) if entries else base
    return parse


def _pairs(name: str, text: str) -> dict[str, str]:
    """``"2:8,5:32"`` -> ``{"2": "8", "5": "32"}`` (checked as a mapping afterwards)."""
    out: dict[str, str] = {}
    for entry in text.split(","):
        key, sep, value = (part.strip() for part in entry.partition(":"))
        if not sep or not key or not value:
            raise RecipeError(f"recipe field '{name}': bad entry {entry.strip()!r} in {text!r}; {_PAIRS}")
        if key in out:
            raise RecipeError(f"recipe field '{name}': stage {key} is given twice in {text!r}")
        out[key] = value
    return out


def _stage_key(name: str, key: Any) -> int | None:
    """A map key: a stage number (int or its text), or ``default`` (None)."""
    if isinstance(key, str) and key.strip().lower() == "default":
        return None
    n = None if isinstance(key, bool) else key if isinstance(key, int) else \
        int(key.strip()) if isinstance(key, str) and key.strip().isdigit() else None
    if n is None or n < 1:
        raise RecipeError(f"recipe field '{name}': {key!r} is not a stage number (stage = log2 of the "
                          f"output stride, e.g. 2..5 on a ResNet); {_PAIRS}")
    return n


_OVERRIDE_EXAMPLE = "e.g. [{stages: [4, 5], r: 32}, {only: [layer4.2], module: eca}]"


def _overrides(value: Any) -> tuple[Override, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise RecipeError(f"recipe field 'overrides': expected a list of entries, {_OVERRIDE_EXAMPLE}; "
                          f"got {value!r}")
    return tuple(_override(i, entry) for i, entry in enumerate(value))


def _override(i: int, entry: Any) -> Override:
    where = f"recipe field 'overrides', entry {i + 1}"
    if isinstance(entry, Override):
        entry = entry.to_dict()
    if not isinstance(entry, Mapping):
        raise RecipeError(f"{where}: expected a mapping such as {{stages: [4, 5], r: 32}}, got {entry!r}")
    allowed = ["stages", "only", *BLOCK_FIELDS]
    for key in entry:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")
    try:
        stages = None if entry.get("stages") is None else _stages(entry["stages"])
        only = _names("only")(entry.get("only"))
        values = []
        for name in BLOCK_FIELDS:
            if name in entry:
                if isinstance(entry[name], (Mapping, StageMap)) or isinstance(entry[name], str) and ":" in entry[name]:
                    raise RecipeError(f"recipe field '{name}': an override gives one value per field (per-stage "
                                      f"maps go outside overrides)")
                values.append((name, BLOCK_CHECKS[name](entry[name])))
    except RecipeError as err:
        raise RecipeError(f"{where}: {str(err).removeprefix('recipe ')}") from None
    if stages is None and only is None:
        raise RecipeError(f"{where}: selects every site; give stages and/or only (module-path globs), "
                          f"{_OVERRIDE_EXAMPLE}")
    if not values:
        raise RecipeError(f"{where}: sets no block field; give one of {', '.join(BLOCK_FIELDS)}")
    return Override(stages, only, tuple(values))


def _sources(recipe: "Recipe", stage: int | None, applying: tuple[int, ...]) -> tuple[dict, dict]:
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
def _resolve(recipe: "Recipe", stage: int | None, applying: tuple[int, ...]) -> BlockConfig:
    """The BlockConfig at a site of ``stage`` that the overrides ``applying`` select (cached: a model
    has many sites and few distinct combinations)."""
    values, layers = _sources(recipe, stage, applying)
    module = values["module"]
    reads = set(ATTENTIONS[module].fields) | set(ALWAYS_READ)

    def origin(name):
        layer = layers[name]
        return ("the base fields" if layer <= 0 else "its per-stage map" if layer == 1
                else f"override {layer - 1}")
    where = "the stages no map names" if stage is None else f"stage {stage}"
    if applying:
        where += f" with override{'s' if len(applying) > 1 else ''} {', '.join(str(i + 1) for i in applying)}"
    for name in BLOCK_FIELDS:
        if name in reads or layers[name] < 0:
            continue
        if layers[name] >= layers["module"]:  # set with or over the module: a mistake, not a leftover
            raise RecipeError(f"recipe field '{name}' ({origin(name)}) does not apply to module '{module}' "
                              f"({origin('module')}) at {where}: it reads "
                              f"{', '.join(ATTENTIONS[module].fields) or 'no block field'}; remove it there")
        values[name] = _BLOCK[name]  # from below the module's entry: that module has no use for it
    try:
        return BlockConfig(**values)
    except RecipeError as err:
        raise RecipeError(f"recipe at {where}: {err}") from None


def _check_resolvable(recipe: "Recipe") -> None:
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
        maybe = [i for i, o in enumerate(recipe.overrides)
                 if o.only is not None and (o.stages is None or stage in o.stages)]
        _resolve(recipe, stage, tuple(sure))
        for i in maybe:
            _resolve(recipe, stage, tuple(sorted([*sure, i])))


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "position": _choice("position", lambda: POSITIONS),
    "stages": _stages,
    "kinds": _names("kinds", lambda: KINDS + (NAMED,), aliases={"inside": "conv3x3"}),
    "only": _names("only"),
    "skip": _names("skip"),
    "overrides": _overrides,
    "at": _names("at"),
    **{name: _staged(name) for name in BLOCK_FIELDS},  # the block fields: retrofit.block owns their checks
}
