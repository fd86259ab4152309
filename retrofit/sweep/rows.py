"""One row of a sweep: a combination (position, r, stages) or a control arm, what it costs, and with
data its accuracy over seeds."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from ..surgery.recipe import Recipe
from ..surgery.recipe_fields import StageMap


@dataclass(frozen=True)
class SweepRow:
    """One combination of a sweep and what it costs. ``note`` says why a combination has no blocks
    (a position with no site in those stages); its numbers are then 0."""

    position: str
    r: float | StageMap             # a ratio, or a per-stage map of them
    stages: tuple[int, ...] | None  # None: all stages
    blocks: int
    params: int            # parameters added
    params_percent: float  # of the original model's
    macs: int              # multiply-adds added (batch 1)
    macs_percent: float
    pool_scale_ops: int    # the squeeze and scale passes, C x H x W each per block
    skipped: int = 0       # sites of this position and stages that could not be rewritten
    latency: float | None = None       # median per-round forward time retrofitted / original, same run
    latency_low: float | None = None   # its interval over the rounds (Timing.interval)
    latency_high: float | None = None
    latency_ms: float | None = None    # median forward time of the retrofitted model
    base_latency_ms: float | None = None
    note: str = ""
    # accuracy (sweep(..., data=...), :mod:`retrofit.sweep.ablation`): the last epoch's val numbers over seeds
    arm: str = "se"                    # "se", or a control arm: "original", "head+norms", "full"
    seeds: tuple[int, ...] = ()
    top1: float | None = None          # mean over the seeds, percent
    top1_std: float | None = None      # sample standard deviation over the seeds
    val_loss: float | None = None
    val_loss_std: float | None = None
    top1_per_seed: tuple[float, ...] = ()
    val_loss_per_seed: tuple[float, ...] = ()
    delta_top1: float | None = None    # paired difference to the control arm, mean over the seeds
    delta_top1_std: float | None = None
    delta_top1_ci: tuple[float, float] | None = None  # its 95% t-interval over the seeds (None: one seed)
    control: str | None = None         # that control arm: the one with the best mean top-1
    pareto: bool = False               # on the front of top-1 against added parameters (or latency)
    # a tune's finalist (:mod:`retrofit.sweep.tune`): its whole recipe (module, gate, squeeze too), the
    # fine-tune settings it searched (lr, phase2_epochs), its trial and what the three axes do not show
    recipe: Recipe | None = None
    train: dict[str, Any] | None = None
    trial: int | None = None
    label: str = ""

    @property
    def stages_label(self) -> str:
        return stages_label(self.stages)

    @property
    def r_label(self) -> str:
        return r_label(self.r)

    def to_dict(self) -> dict[str, Any]:
        """Plain values: ``r`` a number or, per stage, a mapping with its ``default`` (as in a recipe's
        ``to_dict``); ``r_label`` the table's spelling of it; a control arm has no ``stages``."""
        d = {**asdict(self), "r": self.r.to_dict() if isinstance(self.r, StageMap) else self.r,
             "recipe": self.recipe.to_dict() if self.recipe is not None else None}
        d["stages"] = self.stages_label if self.arm == "se" else None  # a control arm has no blocks
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
