"""One row of a sweep: a combination (position, r, stages) or a control arm, composed of its parts, each
None when not measured: what it costs (:class:`Cost`), its latency (:class:`Latency`), its accuracy over seeds
(:class:`Accuracy`), what a tune found (:class:`Finalist`). Its JSON (:meth:`SweepRow.to_dict`) is flat, key for
key the JSON of the rows before they had parts."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..surgery.recipe import Recipe
from ..surgery.recipe_fields import StageMap


@dataclass(frozen=True)
class Cost:
    """What a combination adds, counted from its plan (:func:`retrofit.measure.overhead.planned_overhead`)."""

    blocks: int
    params: int  # parameters added
    params_percent: float  # of the original model's
    macs: int  # multiply-adds added (batch 1)
    macs_percent: float
    pool_scale_ops: int  # the squeeze and scale passes, C x H x W each per block
    skipped: int = 0  # sites of this position and stages that could not be rewritten

    @classmethod
    def of(cls, report: Any, skipped: int = 0) -> Cost:
        """The cost of a planned :class:`~retrofit.measure.overhead.Overhead`."""
        return cls(
            len(report.blocks),
            report.added_params,
            report.params_percent(),
            report.added_macs,
            report.macs_percent(),
            report.pool_ops + report.scale_ops,
            skipped,
        )


@dataclass(frozen=True)
class Latency:
    """Its forward time against the original's, measured side by side (:class:`retrofit.measure.latency.Timing`)."""

    ratio: float  # median per-round forward time retrofitted / original, same run
    low: float | None = None  # its interval over the rounds (Timing.interval)
    high: float | None = None
    ms: float | None = None  # median forward time of the retrofitted model
    base_ms: float | None = None  # of the original


@dataclass(frozen=True)
class Accuracy:
    """The last epoch's val numbers over the seeds (:mod:`retrofit.sweep.ablation`), and the paired difference
    to the best control arm."""

    top1: float  # mean over the seeds, percent
    top1_std: float | None  # sample standard deviation over the seeds
    val_loss: float
    val_loss_std: float | None
    top1_per_seed: tuple[float, ...]
    val_loss_per_seed: tuple[float, ...]
    delta_top1: float | None = None  # paired difference to the control arm, mean over the seeds
    delta_top1_std: float | None = None
    delta_top1_ci: tuple[float, float] | None = None  # its 95% t-interval over the seeds (None: one seed)
    control: str | None = None  # that control arm: the one with the best mean top-1
    pareto: bool = False  # on the front of top-1 against added parameters (or latency)


@dataclass(frozen=True)
class Finalist:
    """A tune's finalist (:mod:`retrofit.sweep.tune`): its whole recipe (module, gate, squeeze too), the fine-tune
    settings it searched (lr, phase2_epochs), its trial and what the three axes do not show."""

    recipe: Recipe
    train: dict[str, Any]
    trial: int
    label: str = ""


# The row's JSON, key for key as it was when every part's field was the row's own (a sweep --json written before
# the parts is the same JSON): each flat key -> (part, its field there, the value when the part is None)
FLAT: dict[str, tuple[str, str, Any]] = {
    **{
        k: ("cost", k, 0 if k not in ("params_percent", "macs_percent") else 0.0)
        for k in ("blocks", "params", "params_percent", "macs", "macs_percent", "pool_scale_ops", "skipped")
    },
    **{
        k: ("latency", f, None)
        for k, f in (
            ("latency", "ratio"),
            ("latency_low", "low"),
            ("latency_high", "high"),
            ("latency_ms", "ms"),
            ("base_latency_ms", "base_ms"),
        )
    },
    **{
        k: ("accuracy", k, () if k.endswith("per_seed") else False if k == "pareto" else None)
        for k in (
            "top1",
            "top1_std",
            "val_loss",
            "val_loss_std",
            "top1_per_seed",
            "val_loss_per_seed",
            "delta_top1",
            "delta_top1_std",
            "delta_top1_ci",
            "control",
            "pareto",
        )
    },
    **{k: ("finalist", k, "" if k == "label" else None) for k in ("recipe", "train", "trial", "label")},
}
ORDER = (
    "position",
    "r",
    "stages",
    "blocks",
    "params",
    "params_percent",
    "macs",
    "macs_percent",
    "pool_scale_ops",
    "skipped",
    "latency",
    "latency_low",
    "latency_high",
    "latency_ms",
    "base_latency_ms",
    "note",
    "arm",
    "seeds",
    "top1",
    "top1_std",
    "val_loss",
    "val_loss_std",
    "top1_per_seed",
    "val_loss_per_seed",
    "delta_top1",
    "delta_top1_std",
    "delta_top1_ci",
    "control",
    "pareto",
    "recipe",
    "train",
    "trial",
    "label",
)


def _flat(key: str) -> property:
    part, name, empty = FLAT[key]

    def get(row: SweepRow) -> Any:
        value = getattr(row, part)
        return empty if value is None else getattr(value, name)

    return property(get, doc=f"``{part}.{name}`` ({empty!r} when there is no {part}).")


@dataclass(frozen=True)
class SweepRow:
    """One row of a sweep: a combination (``position``, ``r``, ``stages``) or a control arm (``arm``), and its
    parts, each None when not measured: its ``cost`` (None: nothing added, a control arm or a combination
    with no site, whose ``note`` says why), ``latency``, ``accuracy`` over the ``seeds`` run, and for a tune's
    finalist what the tune ``finalist`` found. ``row.params``, ``row.top1``... read the parts' fields (0 or
    None when the part is None): the flat names of :meth:`to_dict`, whose JSON is as before the parts."""

    position: str
    r: float | StageMap  # a ratio, or a per-stage map of them
    stages: tuple[int, ...] | None  # None: all stages
    cost: Cost | None = None
    latency: Latency | None = None
    accuracy: Accuracy | None = None
    finalist: Finalist | None = None
    note: str = ""
    arm: str = "se"  # "se", or a control arm: "original", "head+norms", "full"
    seeds: tuple[int, ...] = ()  # the seeds run (a failed run's too, which has no accuracy)

    blocks = _flat("blocks")
    params = _flat("params")
    params_percent = _flat("params_percent")
    macs = _flat("macs")
    macs_percent = _flat("macs_percent")
    pool_scale_ops = _flat("pool_scale_ops")
    skipped = _flat("skipped")
    latency_low = _flat("latency_low")
    latency_high = _flat("latency_high")
    latency_ms = _flat("latency_ms")
    base_latency_ms = _flat("base_latency_ms")
    top1 = _flat("top1")
    top1_std = _flat("top1_std")
    val_loss = _flat("val_loss")
    val_loss_std = _flat("val_loss_std")
    top1_per_seed = _flat("top1_per_seed")
    val_loss_per_seed = _flat("val_loss_per_seed")
    delta_top1 = _flat("delta_top1")
    delta_top1_std = _flat("delta_top1_std")
    delta_top1_ci = _flat("delta_top1_ci")
    control = _flat("control")
    pareto = _flat("pareto")
    recipe = _flat("recipe")
    train = _flat("train")
    trial = _flat("trial")
    label = _flat("label")

    @property
    def stages_label(self) -> str:
        return stages_label(self.stages)

    @property
    def r_label(self) -> str:
        return r_label(self.r)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, flat (the keys of :data:`ORDER`, as before the row had parts): ``r`` a number or, per
        stage, a mapping with its ``default`` (as in a recipe's ``to_dict``); ``r_label`` the table's spelling of
        it; ``latency`` the ratio; a control arm has no ``stages``."""
        own = {
            "position": self.position,
            "r": self.r.to_dict() if isinstance(self.r, StageMap) else self.r,
            "stages": self.stages_label if self.arm == "se" else None,  # a control arm has no blocks
            "latency": None if self.latency is None else self.latency.ratio,
            "note": self.note,
            "arm": self.arm,
            "seeds": tuple(self.seeds),
            "recipe": self.recipe.to_dict() if self.recipe is not None else None,
            "train": copy.deepcopy(self.train),
        }
        d = {key: own[key] if key in own else getattr(self, key) for key in ORDER}
        d["r_label"] = self.r_label
        return d


def stages_label(stages: tuple[int, ...] | None) -> str:
    return "all" if stages is None else "+".join(map(str, stages))


def r_label(r: float | StageMap) -> str:
    """``16``, or a per-stage map as the CLI spells it, ``2:8,5:32`` (``default:V,`` first when the
    stages it does not name have another r than the default 16)."""
    return r.label(implied=Recipe().r) if isinstance(r, StageMap) else f"{r:g}"


def row_recipe(base_recipe: Recipe, row: SweepRow) -> Recipe:
    """The recipe of one combination (a tune's finalist: its own)."""
    if row.recipe is not None:
        return row.recipe
    return dataclasses.replace(base_recipe, position=row.position, r=row.r, stages=row.stages)
