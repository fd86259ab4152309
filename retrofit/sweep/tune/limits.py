"""Constraints known before training: ``--max-params``, ``--max-macs`` (a count, or ``2%`` of the model) and
``--max-latency`` (a ratio to the original's forward time).

A recipe over a limit is never trained: its trial is pruned with its reason (and does not count towards
``--trials``). Parameters and multiply-adds come from the sweep's plan on the one scan
(:func:`retrofit.surgery.prepare.prepare` and :func:`retrofit.measure.overhead.planned_overhead`, each block
measured alone on the meta device: milliseconds); they add up over the blocks, so the cheapest recipe of a
space is found before the study starts, and a space that no recipe of it can meet is an error then.
Latency does not add up: it is measured per trial, the built model against the original.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from ...errors import RetrofitError, excerpt
from ...measure.latency import measure_latency
from ...measure.overhead import ModelCost, Overhead, planned_overhead
from ...surgery.prepare import prepare
from ...surgery.recipe import Recipe
from ...surgery.sites import Scan
from .space import OFF, Infeasible, Space


@dataclass(frozen=True)
class Limit:
    """One ``--max-*`` option: a count, or a percentage of the original model's."""

    option: str
    value: float
    percent: bool

    def bound(self, base: int) -> float:
        return base * self.value / 100 if self.percent else self.value

    def show(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{self.value:,.0f}"


def parse_limit(option: str, text: Any) -> Limit | None:
    """``2%`` or ``50000`` (``--max-params``, ``--max-macs``); None when not given."""
    if text is None:
        return None
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise RetrofitError(f"{option}: give a count (50000) or a share of the model (2%), got {excerpt(raw)}")
    return Limit(option, value, percent)


def parse_latency(text: Any) -> float | None:
    """``--max-latency 1.10``: the retrofitted model's forward time over the original's, at most."""
    if text is None:
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise RetrofitError(
            f"--max-latency: give a ratio to the original's forward time, e.g. 1.10, got {excerpt(text)}"
        )
    return value


@dataclass(frozen=True)
class Limits:
    params: Limit | None = None
    macs: Limit | None = None
    latency: float | None = None

    def over(self, cost: Overhead) -> str | None:
        """Why a recipe of this cost breaks a limit (``over --max-params 2% (adds 2.31%)``), or None."""
        for limit, added, base in (
            (self.params, cost.added_params, cost.base_params),
            (self.macs, cost.added_macs, cost.base_macs),
        ):
            if limit is not None and added > limit.bound(base):
                share = f"{100 * added / base:.2f}%" if limit.percent else f"{added:,}"
                return f"over {limit.option} {limit.show()} (adds {share})"
        return None

    def over_latency(self, ratio: float) -> str | None:
        if self.latency is not None and ratio > self.latency:
            return f"over --max-latency {self.latency:g} (measured {ratio:.3f}x)"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_params": self.params.show() if self.params else None,
            "max_macs": self.macs.show() if self.macs else None,
            "max_latency": self.latency,
        }


def recipe_cost(found: Scan, base: ModelCost, recipe: Recipe) -> Overhead:
    """What ``recipe`` adds to the model (the plan on the scan; no block is built on real memory).
    A recipe whose position has no site in its stages is :class:`~.space.Infeasible`."""
    try:
        prepared = prepare(found, recipe)
    except RetrofitError as err:  # no site of this position in these stages
        raise Infeasible(str(err)) from None
    return planned_overhead(base, prepared.blocks(recipe), recipe)


def latency_ratio(model, se_model, input_size: tuple[int, ...]) -> float:
    """Median forward time of ``se_model`` over ``model``'s, interleaved in one run (batch 8, 10 rounds)."""
    timing = measure_latency(
        {"original": model, "retrofitted": se_model}, batch=8, input_size=input_size, runs=10, warmup=2
    )
    return timing.ratio("retrofitted", "original")


def check_meetable(space: Space, limits: Limits, found: Scan, base: ModelCost) -> None:
    """One error when no recipe of ``space`` meets ``--max-params`` or ``--max-macs``: the cheapest recipe by
    that count is over it. Blocks add up, so the cheapest is one stage on at one ratio (the others off where
    the space allows it), for some combination of the other axes: a few plans on the scan. Each limit is
    checked on its own; a space whose cheapest-by-params is over the MAC limit and the other way round is
    found by the trials (all pruned as over the limits)."""
    for limit, pick, total in (
        (limits.params, lambda c: c.added_params, base.params),
        (limits.macs, lambda c: c.added_macs, base.macs),
    ):
        if limit is None:
            continue
        cheapest = _cheapest(space, found, base, pick)
        if cheapest is None:
            return  # no recipe of the space has a site: every trial will say so
        cost, label = cheapest
        if pick(cost) > limit.bound(total):
            share = f"{100 * pick(cost) / total:.2f}%" if limit.percent else f"{pick(cost):,}"
            raise RetrofitError(
                f"no recipe of the space meets {limit.option} {limit.show()}: the cheapest, {label}, "
                f"adds {share}; raise the limit or add cheaper choices (a larger r, fewer stages)"
            )


def _cheapest(space: Space, found: Scan, base: ModelCost, pick) -> tuple[Overhead, str] | None:
    """The cheapest recipe of the space by ``pick`` (added params or MACs), and its label."""
    best = None
    for draw in _cheap_draws(space):
        try:
            cand = space.candidate(draw)
            cost = recipe_cost(found, base, cand.recipe)
        except Infeasible:
            continue
        if best is None or pick(cost) < pick(best[0]):
            best = (cost, cand.label)
    return best


def _cheap_draws(space: Space):
    """The draws among which the cheapest recipe is: every combination of the other axes with, per stage,
    one stage on at each of its ratios (the rest off where off is allowed), or every (r, stages) pair."""
    others = {k: v for k, v in space.axes().items() if k in ("position", "module", "gate", "squeeze")}
    combos = [dict(zip(others, vs)) for vs in itertools.product(*others.values())]
    if space.per_stage is None:
        shared = {k: v for k, v in space.axes().items() if k in ("r", "stages")}
        for combo in combos:
            for vs in itertools.product(*shared.values()):
                yield {**combo, **dict(zip(shared, vs))}
        return
    must = {s: min((v for v in vals if v != OFF), key=float) for s, vals in space.per_stage if OFF not in vals}
    for combo in combos:
        for s, vals in space.per_stage:
            for v in vals:
                if v == OFF:
                    continue
                draw = {f"r{t}": (v if t == s else must.get(t, OFF)) for t, _ in space.per_stage}
                yield {**combo, **draw}
