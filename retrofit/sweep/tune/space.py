"""The search space of a tune, and one trial's recipe from the sampler's draws.

Flags in the sweep's syntax (``--position standard,identity``, ``--r 4,16 --stages all,4+5``, ``--module
se,eca``, ``--gate``, ``--squeeze``, ``--lr 1e-4:1e-1`` for a log-uniform range, ``--phase2-epochs 0,2``), or
a YAML file with the same keys. ``r`` has two forms:

* one ratio shared by the chosen stages: ``--r 4,16 --stages all,4+5`` (an item may be a per-stage map, as in
  the sweep: ``'16;2:8,5:32'``);
* one independent choice per stage: ``--r off,4,8,16,32 --per-stage`` (every stage of the model, or the one
  stage set ``--stages 3+4+5``), or in YAML a mapping ``r: {2: [off, 4, 8], 5: [16, 32]}``. ``off`` means no
  block in that stage, so the stages are searched too.

Every value goes through the recipe's own validators (:func:`retrofit.sweep.grid.parse_axis`, so a bad one
reads as it does in the sweep), and the stages are checked on the model's scan. A draw becomes a
:class:`Candidate`: the recipe (the fields a module does not read take their defaults, so ``module: eca``
ignores the ``r`` draws), the fine-tune settings it searched, and its key (canonical JSON of both), by which
draws that build the same model are recognised as one recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...blocks.attention import ATTENTIONS
from ...blocks.config import DEFAULTS, BlockConfig
from ...errors import RecipeError, RetrofitError, excerpt
from ...graph.model import model_name
from ...inputs import read_yaml
from ...surgery.plan import require_stages
from ...surgery.recipe import Recipe
from ...surgery.recipe_fields import StageMap
from ...surgery.sites import Scan
from ..grid import check_stages, parse_axis, parse_stages, split_axis
from ..rows import r_label, stages_label

OFF = "off"
KEYS = ("position", "r", "stages", "per_stage", "module", "gate", "squeeze", "lr", "phase2_epochs")


class Infeasible(Exception):
    """A draw that makes no recipe (no block in any stage, fields that do not go together)."""


@dataclass(frozen=True)
class Candidate:
    """One trial's recipe: what to build, the fine-tune settings it searched, its key and its label."""

    recipe: Recipe
    train: dict[str, Any]
    key: str
    label: str


@dataclass(frozen=True)
class Space:
    """Axes of a tune; an empty ``gate``/``squeeze`` keeps the base recipe's value. ``per_stage``: the choices
    of each stage (``off`` included), or ``None`` for the shared form (``r`` x ``stages``); ``every_stage``:
    the choices given for every stage of the model, until :meth:`on_model` names them."""

    position: tuple[str, ...] = ("standard",)
    module: tuple[str, ...] = ("se",)
    r: tuple[Any, ...] = (16,)
    stages: tuple[tuple[int, ...] | None, ...] = (None,)
    per_stage: tuple[tuple[int, tuple[Any, ...]], ...] | None = None
    every_stage: tuple[Any, ...] | None = None
    gate: tuple[str, ...] = ()
    squeeze: tuple[str, ...] = ()
    lr: tuple[float, float] | None = None
    phase2_epochs: tuple[int, ...] = (0,)
    base: Recipe = Recipe()

    # -- from the model ---------------------------------------------------------------------------
    def on_model(self, found: Scan) -> Space:
        """The space with every stage named and checked against the model's sites: a stage the model does
        not have, or a space whose every recipe has no block, is one error."""
        present = {s.stage for s in found.sites}
        space = self
        if self.every_stage is not None:
            chosen = self.stages[0] or tuple(sorted(present))
            check_stages(found, [self.stages[0]])
            space = dataclasses.replace(self, every_stage=None, per_stage=tuple((s, self.every_stage) for s in chosen))
        elif self.per_stage is not None:
            require_stages([s for s, _ in self.per_stage], present, model_name(found.traced.model), what="--r")
        else:
            check_stages(found, self.stages)
            check_stages(found, [v.stages for v in self.r if isinstance(v, StageMap)], "--r")
        if space.per_stage is not None and all(set(v) == {OFF} for _, v in space.per_stage):
            raise RetrofitError("the space has no recipe with a block: every stage is 'off'; give some stage a ratio")
        return space

    # -- size ---------------------------------------------------------------------------------------
    def axes(self) -> dict[str, tuple]:
        """The categorical axes the sampler draws, by parameter name (axes of one value are not drawn)."""
        out: dict[str, tuple] = {
            "position": self.position,
            "module": self.module,
            "gate": self.gate,
            "squeeze": self.squeeze,
            "phase2_epochs": self.phase2_epochs,
        }
        if self.per_stage is not None:
            out.update({f"r{s}": tuple(v) for s, v in self.per_stage})
        else:
            out["r"] = tuple(r_label(v) for v in self.r)
            out["stages"] = tuple(stages_label(st) for st in self.stages)
        return {k: v for k, v in out.items() if len(v) > 1}

    def size(self) -> float:
        """How many draws there are (``inf`` with a learning-rate range)."""
        return math.inf if self.lr is not None else math.prod(len(v) for v in self.axes().values())

    def grid(self) -> list[dict[str, Any]]:
        """Every draw of a finite space, as parameters (for a space no larger than the trials asked)."""
        axes = self.axes()
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]

    # -- one trial ----------------------------------------------------------------------------------
    def suggest(self, trial) -> Candidate:
        """Draw one recipe through ``trial`` (an Optuna trial: its ``suggest_*`` calls) and resolve it."""
        params = {name: trial.suggest_categorical(name, list(choices)) for name, choices in self.axes().items()}
        if self.lr is not None:
            params["lr"] = trial.suggest_float("lr", self.lr[0], self.lr[1], log=True)
        return self.candidate(params)

    def candidate(self, params: Mapping[str, Any]) -> Candidate:
        """The candidate of a set of draws; :class:`Infeasible` when they make no recipe."""

        def pick(name, axis):
            return params.get(name, axis[0] if axis else None)

        module = pick("module", self.module)
        reads = ATTENTIONS[module].fields
        fields: dict[str, Any] = {"position": pick("position", self.position), "module": module}
        for name in ("gate", "squeeze"):
            if getattr(self, name) and name in reads:
                fields[name] = pick(name, getattr(self, name))
        stages, r = self._stages_and_r(params)
        if "r" in reads:
            fields["r"] = r
        for name in set(DEFAULTS) - set(reads) - {"init", "module"}:
            fields[name] = DEFAULTS[name]  # a field the module does not read: its default, so the draw is one recipe
        try:
            recipe = dataclasses.replace(self.base.replace(**fields), stages=stages)
        except RecipeError as err:
            raise Infeasible(str(err)) from None
        train = {}
        if self.lr is not None:
            train["lr"] = float(params.get("lr", self.lr[0]))
        if self.phase2_epochs != (0,):
            train["phase2_epochs"] = int(pick("phase2_epochs", self.phase2_epochs))
        key = canonical({"recipe": recipe.to_dict(), "train": train})
        return Candidate(recipe, train, key, self._label(recipe, params, train))

    def _stages_and_r(self, params: Mapping[str, Any]) -> tuple[tuple[int, ...] | None, Any]:
        if self.per_stage is None:
            r = next(v for v in self.r if r_label(v) == params.get("r", r_label(self.r[0])))
            st_label = params.get("stages", stages_label(self.stages[0]))
            st = next(st for st in self.stages if stages_label(st) == st_label)
            return st, r
        on = {s: params.get(f"r{s}", v[0]) for s, v in self.per_stage}
        on = {s: v for s, v in on.items() if v != OFF}
        if not on:
            raise Infeasible("no block in any stage")
        ratios = set(on.values())
        return tuple(sorted(on)), ratios.pop() if len(ratios) == 1 else on

    def _label(self, recipe: Recipe, params: Mapping[str, Any], train: dict) -> str:
        parts = [recipe.position, recipe.module if isinstance(recipe.module, str) else str(recipe.module)]
        if self.per_stage is not None:
            shown = ",".join(f"{s}:{params.get(f'r{s}', v[0])}" for s, v in self.per_stage)
            parts.append(
                f"r {shown}" if "r" in ATTENTIONS[recipe.module].fields else "stages " + stages_label(recipe.stages)
            )
        else:
            if "r" in ATTENTIONS[recipe.module].fields:
                parts.append(f"r {r_label(recipe.r)}")
            parts.append(f"stages {stages_label(recipe.stages)}")
        for name in ("gate", "squeeze"):
            if len(getattr(self, name)) > 1 and name in ATTENTIONS[recipe.module].fields:
                parts.append(f"{name} {getattr(recipe, name)}")
        if "lr" in train:
            parts.append(f"lr {train['lr']:.2e}")
        if "phase2_epochs" in train:
            parts.append(f"phase 2 {train['phase2_epochs']}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the study's identity: a resumed study must search the same space)."""
        return {
            "position": list(self.position),
            "module": list(self.module),
            "r": ([v.to_dict() if isinstance(v, StageMap) else v for v in self.r] if self.per_stage is None else None),
            "stages": [stages_label(st) for st in self.stages] if self.per_stage is None else None,
            "per_stage": {str(s): list(v) for s, v in self.per_stage} if self.per_stage is not None else None,
            "gate": list(self.gate),
            "squeeze": list(self.squeeze),
            "lr": list(self.lr) if self.lr is not None else None,
            "phase2_epochs": list(self.phase2_epochs),
            "base": self.base.to_dict(),
        }


def canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, every key a string: a per-stage map's stage keys are numbers)."""

    def plain(v):
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"))


# -- parsing --------------------------------------------------------------------------------------
def parse_space(
    base: Recipe,
    *,
    position: Any = None,
    r: Any = None,
    stages: Any = None,
    per_stage: bool = False,
    module: Any = None,
    gate: Any = None,
    squeeze: Any = None,
    lr: Any = None,
    phase2_epochs: Any = None,
) -> Space:
    """A :class:`Space` from the CLI's axes (strings in the sweep's syntax) or Python values (lists, a
    per-stage mapping for ``r``); ``None``: the axis's default (the base recipe's value)."""
    positions = parse_axis(
        "position", position if position is not None else base.position, lambda v: base.replace(position=v).position
    )
    modules = parse_axis("module", module if module is not None else "se", lambda v: BlockConfig(module=v).module)
    gates = parse_axis("gate", gate, lambda v: BlockConfig(gate=v).gate) if gate is not None else []
    squeezes = parse_axis("squeeze", squeeze, lambda v: BlockConfig(squeeze=v).squeeze) if squeeze is not None else []
    phase2 = parse_axis("phase2-epochs", phase2_epochs if phase2_epochs is not None else 0, _epochs)
    stage_sets = parse_axis("stages", stages if stages is not None else "all", parse_stages)
    fields: dict[str, Any] = dict(
        position=tuple(positions),
        module=tuple(modules),
        gate=tuple(gates),
        squeeze=tuple(squeezes),
        phase2_epochs=tuple(phase2),
        lr=parse_lr(lr)[1],
        base=base,
    )
    if isinstance(r, Mapping):  # a per-stage mapping: {stage: choices}
        if stages is not None:
            raise RetrofitError("--stages: a per-stage r mapping names its stages itself; leave --stages out")
        fields["per_stage"] = tuple(
            (_stage(s), tuple(parse_axis("r", v, _stage_ratio(base))))
            for s, v in sorted(r.items(), key=lambda kv: _stage(kv[0]))
        )
    elif per_stage:
        if len(stage_sets) != 1:
            raise RetrofitError("--stages: with --per-stage give one stage set, the stages searched (e.g. 3+4+5)")
        fields.update(
            every_stage=tuple(parse_axis("r", r if r is not None else "off,4,8,16,32", _stage_ratio(base))),
            stages=tuple(stage_sets),
        )
    else:
        items = split_axis(r) if isinstance(r, str) else r if isinstance(r, (list, tuple)) else [r]
        if any(v is False or str(v).strip().lower() == OFF for v in items):
            raise RetrofitError("--r: 'off' (no block in a stage) needs --per-stage or a per-stage r mapping")
        ratios = parse_axis("r", r if r is not None else base.r, lambda v: base.replace(r=v).r)
        fields.update(r=tuple(ratios), stages=tuple(stage_sets))
    return Space(**fields)


def parse_lr(value: Any) -> tuple[float | None, tuple[float, float] | None]:
    """``--lr``: one rate (``1e-3``: not searched) or a log-uniform range (``1e-4:1e-1``, YAML ``{low, high}``)."""
    if value is None:
        return None, None
    if isinstance(value, Mapping):
        extra = set(value) - {"low", "high"}
        if extra or len(value) != 2:
            raise RetrofitError(f"--lr: a range is {{low: ..., high: ...}}, got {excerpt(dict(value))}")
        value = f"{value['low']}:{value['high']}"
    text = str(value).strip()
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise RetrofitError(f"--lr: give a rate (1e-3) or a range low:high (1e-4:1e-1), got {excerpt(text)}") from None
    unordered = len(parts) == 2 and parts[0] >= parts[1]
    if len(parts) > 2 or any(not math.isfinite(p) or p <= 0 for p in parts) or unordered:
        raise RetrofitError(
            f"--lr: give a positive rate (1e-3) or a range low:high with low < high (1e-4:1e-1), got {excerpt(text)}"
        )
    return (parts[0], None) if len(parts) == 1 else (None, (parts[0], parts[1]))


def load_space(path: Path, base: Recipe) -> tuple[Space, float | None]:
    """A space from a YAML file (the keys of :data:`KEYS`; read by :func:`retrofit.inputs.read_yaml`:
    bounded size and depth, no aliases), and its fixed learning rate if it gives one; every error names
    the file."""
    origin = f"--space {excerpt(path, bare=True)}"
    data = read_yaml(path, "--space")
    if not isinstance(data, Mapping) or not data:
        raise RetrofitError(f"{origin}: expected a mapping of axes, e.g. 'position: [standard, identity]'")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise RetrofitError(f"{origin}: unknown key {excerpt(unknown[0])}; the keys are {', '.join(KEYS)}")
    try:
        fixed_lr = parse_lr(data.get("lr"))[0]
        return parse_space(base, **{k: v for k, v in data.items()}), fixed_lr
    except RetrofitError as err:
        raise RetrofitError(f"{origin}: {err}") from None


def space_from_options(
    base: Recipe, space: Path | None = None, *, lr: Any = None, per_stage: bool = False, **axes: Any
) -> tuple[Space, float | None]:
    """``retrofit tune``'s space and fixed learning rate: from a YAML file ``space`` (its ``lr`` when it fixes
    one, else ``lr``'s) or from the axis options (``position``, ``r``, ``stages``, ``module``, ``gate``,
    ``squeeze``, ``phase2_epochs``: None when not given; ``lr`` a rate, or a range ``LOW:HIGH`` searched),
    never both."""
    fixed_lr, lr_range = parse_lr(lr)
    if space is None:
        return parse_space(base, per_stage=per_stage, lr=lr if lr_range else None, **axes), fixed_lr
    given = [f"--{k.replace('_', '-')}" for k, v in axes.items() if v is not None] + (
        ["--per-stage"] if per_stage else []
    )
    if given:
        raise RetrofitError(f"give the space as flags or as --space FILE, not both ({', '.join(given)} with --space)")
    chosen, file_lr = load_space(space, base)
    return chosen, file_lr if file_lr is not None else fixed_lr


def _stage(key: Any) -> int:
    try:
        return int(str(key).strip())
    except ValueError:
        raise RetrofitError(f"--r: a per-stage mapping's keys are stage numbers, got {excerpt(key)}") from None


def _stage_ratio(base: Recipe):
    def check(value):
        if (isinstance(value, str) and value.strip().lower() == OFF) or value is False:  # YAML reads off as false
            return OFF
        return Recipe(r=value, allow_wide=base.block.allow_wide).r  # a plain ratio (a map is per stage already)

    return check


def _epochs(value: Any) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise RecipeError(f"phase-2 epochs are whole numbers >= 0, got {excerpt(value)}") from None
    if n < 0 or str(n) != str(value).strip():
        raise RecipeError(f"phase-2 epochs are whole numbers >= 0, got {excerpt(value)}")
    return n
