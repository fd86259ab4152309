"""The recipe's fields, one validator each, and the two ways a block field varies across a model:
per-stage maps (:class:`StageMap`) and ordered overrides (:class:`Override`).

Every value a recipe takes, from YAML, the CLI or keyword arguments, goes through :data:`CHECKS`, so
a bad value is reported the same way wherever it came from, naming the field and the allowed values.
The block fields' own checks are :data:`retrofit.blocks.config.CHECKS`; here they also take per-stage
maps (``{2: 8, 5: 32}``, or as text ``"2:8,5:32"``).
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..blocks.config import BLOCK_FIELDS
from ..blocks.config import CHECKS as BLOCK_CHECKS
from ..blocks.config import DEFAULTS as _BLOCK
from ..blocks.config import choice as _choice
from ..blocks.config import positive_int as _positive_int
from ..errors import RecipeError, excerpt
from .positions import POSITIONS
from .sites import KINDS, NAMED


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
        return ",".join(f"{k}:{plain(v)}" for k, v in d.items())

    def __str__(self) -> str:
        return f"{plain(self.base)} ({', '.join(f'stage {s}: {plain(v)}' for s, v in self.values)})"


@dataclass(frozen=True)
class Override:
    """One entry of :attr:`Recipe.overrides`: block field values for the sites it selects."""

    stages: tuple[int, ...] | None = None  # None: any stage
    only: tuple[str, ...] | None = None  # None: any module
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
        where = " ".join(
            p
            for p in (
                self.stages and "stages " + ",".join(map(str, self.stages)),
                self.only and "only " + ",".join(self.only),
            )
            if p
        )
        return f"{where}: " + ", ".join(f"{k} {plain(v)}" for k, v in self.values)


def base_value(value: Any) -> Any:
    """A field's value where no stage is named: the value itself, or a per-stage map's base."""
    return value.base if isinstance(value, StageMap) else value


def matches(path: str, pattern: str) -> bool:
    """Whether a site's owning module ``path``, or one of its parents, matches the glob ``pattern``
    (so ``layer3`` selects every site inside ``layer3``; ``<model>`` is the model's own forward)."""
    parts = path.split(".") if path else []
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] or ["<model>"]
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def plain(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def show(value: Any) -> str:
    return str(value) if isinstance(value, StageMap) else plain(value)


def show_bias(value: Any) -> str:
    if isinstance(value, StageMap):
        return f"bias {value}"
    return "with bias" if value else "no bias"


def _stages(value: Any) -> tuple[int, ...] | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "")):
        return None
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, numbers.Integral) and not isinstance(items, bool):
        items = [items]
    try:
        stages = tuple(sorted({_positive_int("stages")(s) for s in items}))
    except (TypeError, RecipeError):
        raise RecipeError(
            f"recipe field 'stages': expected 'all' or stage numbers such as 2,3 "
            f"(stage = log2 of the output stride), got {excerpt(value)}"
        ) from None
    if not stages:
        raise RecipeError("recipe field 'stages': empty; use 'all' or stage numbers such as 2,3")
    return stages


def _names(
    name: str, allowed: Callable[[], Any] | None = None, aliases: Mapping[str, str] | None = None
) -> Callable[[Any], tuple[str, ...] | None]:
    """A list of names (or globs, ``allowed`` None), or one comma-separated string; None means all."""

    def check(value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        if (
            isinstance(items, (str, bytes))
            or not isinstance(items, (list, tuple))
            or not all(isinstance(i, str) and i.strip() for i in items)
            or not items
        ):
            raise RecipeError(
                f"recipe field '{name}': expected a list of "
                f"{'names' if allowed else 'module-path globs such as layer3.*'}, got {excerpt(value)}"
            )
        out = []
        for item in (i.strip() for i in items):
            if allowed is not None:
                item = (aliases or {}).get(item.lower(), item.lower())
                options = list(allowed())
                if item not in options:
                    raise RecipeError(
                        f"recipe field '{name}': unknown value {excerpt(item)}; allowed: "
                        f"{', '.join(options + list(aliases or {}))}"
                    )
            if item not in out:
                out.append(item)
        return tuple(out)

    return check


# -- per-stage maps and overrides -------------------------------------------------------------------
_PAIRS = "give stage:value pairs such as 2:8,5:32 ('default:V' for the stages not named)"


def staged(name: str) -> Callable[..., Any]:
    """The check of block field ``name`` (:data:`retrofit.blocks.config.CHECKS`), also taking a per-stage map:
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
                raise RecipeError(
                    f"recipe field '{name}': stage {excerpt(key, bare=True)} maps to {excerpt(item)}, "
                    f"not to one value; {_PAIRS}"
                )
            try:
                checked = check(item)
            except RecipeError as err:
                where = "default" if stage is None else f"stage {stage}"
                raise RecipeError(
                    str(err).replace(f"recipe field '{name}':", f"recipe field '{name}' ({where}):", 1)
                ) from None
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
            raise RecipeError(f"recipe field '{name}': bad entry {excerpt(entry.strip())} in {excerpt(text)}; {_PAIRS}")
        if key in out:
            raise RecipeError(
                f"recipe field '{name}': stage {excerpt(key, bare=True)} is given twice in {excerpt(text)}"
            )
        out[key] = value
    return out


def _stage_key(name: str, key: Any) -> int | None:
    """A map key: a stage number (int or its text), or ``default`` (None)."""
    if isinstance(key, str) and key.strip().lower() == "default":
        return None
    n = (
        None
        if isinstance(key, bool)
        else key
        if isinstance(key, int)
        else int(key.strip())
        if isinstance(key, str) and key.strip().isdigit()
        else None
    )
    if n is None or n < 1:
        raise RecipeError(
            f"recipe field '{name}': {excerpt(key)} is not a stage number (stage = log2 of the "
            f"output stride, e.g. 2..5 on a ResNet); {_PAIRS}"
        )
    return n


_OVERRIDE_EXAMPLE = "e.g. [{stages: [4, 5], r: 32}, {only: [layer4.2], module: eca}]"


def _overrides(value: Any) -> tuple[Override, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise RecipeError(
            f"recipe field 'overrides': expected a list of entries, {_OVERRIDE_EXAMPLE}; got {excerpt(value)}"
        )
    return tuple(_override(i, entry) for i, entry in enumerate(value))


def _override(i: int, entry: Any) -> Override:
    where = f"recipe field 'overrides', entry {i + 1}"
    if isinstance(entry, Override):
        entry = entry.to_dict()
    if not isinstance(entry, Mapping):
        raise RecipeError(f"{where}: expected a mapping such as {{stages: [4, 5], r: 32}}, got {excerpt(entry)}")
    allowed = ["stages", "only", *BLOCK_FIELDS]
    for key in entry:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {excerpt(key)}; allowed: {', '.join(allowed)}")
    try:
        stages = None if entry.get("stages") is None else _stages(entry["stages"])
        only = _names("only")(entry.get("only"))
        values = []
        for name in BLOCK_FIELDS:
            if name in entry:
                if isinstance(entry[name], (Mapping, StageMap)) or isinstance(entry[name], str) and ":" in entry[name]:
                    raise RecipeError(
                        f"recipe field '{name}': an override gives one value per field (per-stage "
                        f"maps go outside overrides)"
                    )
                values.append((name, BLOCK_CHECKS[name](entry[name])))
    except RecipeError as err:
        raise RecipeError(f"{where}: {str(err).removeprefix('recipe ')}") from None
    if stages is None and only is None:
        raise RecipeError(
            f"{where}: selects every site; give stages and/or only (module-path globs), {_OVERRIDE_EXAMPLE}"
        )
    if not values:
        raise RecipeError(f"{where}: sets no block field; give one of {', '.join(BLOCK_FIELDS)}")
    return Override(stages, only, tuple(values))


CHECKS: dict[str, Callable[[Any], Any]] = {
    "position": _choice("position", lambda: POSITIONS),
    "stages": _stages,
    "kinds": _names("kinds", lambda: KINDS + (NAMED,), aliases={"inside": "conv3x3"}),
    "only": _names("only"),
    "skip": _names("skip"),
    "overrides": _overrides,
    "at": _names("at"),
    **{name: staged(name) for name in BLOCK_FIELDS},  # the block fields: retrofit.blocks.config owns their checks
}
