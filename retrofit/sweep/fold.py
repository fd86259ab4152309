"""``retrofit.fold``: keep the channel gates that learnt something, fold the others into constant scales.

A gate whose excitation does not depend on its input is a constant per-channel scale, and a constant scale
folds exactly into a neighbouring layer (:mod:`retrofit.surgery.neighbour`, :mod:`retrofit.surgery.fold`), or
becomes a channel-scale module of ``C`` parameters where none can take it. Which gates are folded:

* ``tolerance=0`` (the default): exactly the input-independent gates, known from the weights (one of the
  excitation's linear maps is all zero, as the preserving init leaves every block): no data needed, and
  the folded model's outputs equal the unfolded one's to rounding;
* ``tolerance=T``: the gates in order of their *local change* on the val images (the relative change of the
  block's output when its excitation is replaced by its mean, :mod:`retrofit.measure.excitation`;
  input-independent ones first), each replaced by its mean scale, as many as keep val top-1 within ``T``
  points of the unfolded model's. The number is found by bisection over the prefixes of that order: one
  pass that evaluates the unfolded model and reads every gate, then at most ``ceil(log2(B + 1))``
  evaluations of folded prefixes (``B`` gates), so at most ``log2(B) + 2`` in all, never one per gate.
  The bisection assumes that folding a longer prefix never raises top-1 (monotone); where that is not so,
  the prefix it returns was still measured within ``T``, but a longer one might have been too;
* ``blocks=GLOBS``: the named gates only (``tolerance`` then searches among them; without it all of
  them are folded, by their mean scale on the data, or their constant without data).

Every model evaluated and returned is a copy: ``model`` itself is not changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RetrofitError, excerpt
from ..files.adapter import remember_base
from ..measure.overhead import Overhead, compare, cost
from ..surgery.fold import constant_scales, fold_scales, gates, info_of, require_gates
from ..surgery.recipe_fields import matches
from ..surgery.strip import strip
from ..train.config import FinetuneConfig
from ..train.data import ImageFolderData
from ..train.inspect import Evaluator, open_images, read_gates

MAX_TOLERANCE = 100.0  # points of top-1


@dataclass
class FoldedBlock:
    """One folded gate: where its scale went, why there (a ``scale`` fold: why no neighbour could take it),
    and what the fold saved (parameters, multiply-adds, and the pooling and scaling passes over its map)."""

    path: str
    stage: int
    position: str
    into: str
    neighbour: str
    why: str
    constant: bool  # input-independent: folded exactly
    local_change: float | None  # on the val images (None: folded without data)
    params_saved: int
    macs_saved: int
    ops_saved: int


@dataclass
class FoldResult:
    """What :func:`fold` did. ``before``/``after``: val ``top1`` and ``val_loss`` of the unfolded and the
    folded model (None without data); ``probes``: each evaluated prefix length and its top-1 and loss."""

    model: nn.Module
    blocks: list[FoldedBlock]
    candidates: int
    tolerance: float | None
    evaluations: int
    overhead_before: Overhead
    overhead_after: Overhead
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    probes: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many gates were folded, how, at what measured cost in top-1 and loss, in how many
        evaluations."""
        rule = (
            "the named gates"
            if self.tolerance is None
            else "input-independent gates only (exact)"
            if not self.tolerance
            else f"tolerance {self.tolerance:g} points of top-1"
        )
        line = f"folded {len(self.blocks)} of {self.candidates} channel gates ({rule})"
        if self.before is None:
            return line + "; no data given: top-1 and loss not measured"
        b, a = self.before, self.after
        limit = math.log2(self.candidates) + 2
        bound = f" (bound: log2({self.candidates}) + 2 = {limit:.1f})" if self.tolerance else ""
        return (
            f"{line}; val top-1 {b['top1']:.2f}% -> {a['top1']:.2f}% ({a['top1'] - b['top1']:+.2f} points), loss "
            f"{b['val_loss']:.4f} -> {a['val_loss']:.4f} ({a['val_loss'] - b['val_loss']:+.4f}); "
            f"{self.evaluations} evaluations{bound}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "candidates": self.candidates,
            "folded": len(self.blocks),
            "evaluations": self.evaluations,
            "before": self.before,
            "after": self.after,
            "probes": self.probes,
            "blocks": [asdict(b) for b in self.blocks],
            "overhead_before": self.overhead_before.to_dict(),
            "overhead_after": self.overhead_after.to_dict(),
        }


def fold(
    model: nn.Module,
    data: str | Path | ImageFolderData | None = None,
    *,
    tolerance: float | None = None,
    blocks: Sequence[str] | None = None,
    images: int | None = None,
    config: FinetuneConfig | None = None,
    **options: Any,
) -> FoldResult:
    """Fold the channel gates of ``model`` that learnt (almost) a constant into constant scales.

    Args:
        model: a model from :func:`retrofit.add_se` or :func:`retrofit.load`; not changed (a copy is folded).
        data: the folder it was fine-tuned on (``train/``, ``val/``); needed for ``tolerance > 0`` and for
            named ``blocks`` whose excitation depends on the input; with it, top-1 and loss are measured
            before and after.
        tolerance: points of val top-1 the folded model may lose (0 to 100); default 0: only the
            input-independent gates (exact). See the module docstring for the search and its cost.
        blocks: globs of block paths (``layer4.*``): fold only these (all of them when ``tolerance`` is None).
        images, config, options: as for :func:`retrofit.inspect` (``batch_size``, ``workers``, ``device``).

    Returns:
        A :class:`FoldResult`: the folded model (still a retrofit model: it saves, loads, fine-tunes,
        strips and exports), where each gate went and what it saved, overhead and val metrics before and
        after, and the number of evaluations made.

    Raises:
        RetrofitError: no channel gate, a glob that names no gate (or a block that is not one), a tolerance
            outside 0 to 100, data needed but not given, data with other classes.

    Example::

        >>> result = retrofit.fold(model, "data/", tolerance=0.5)   # model: fine-tuned on data/
        >>> result.evaluations <= math.log2(len(retrofit.get_info(model).blocks)) + 2
        True
        >>> path = retrofit.save(result.model, "folded.safetensors")
    """
    tolerance = check_tolerance(tolerance)
    config = FinetuneConfig.build(config, **options)
    candidates = _candidates(model, blocks)
    target = copy.deepcopy(model)
    already = len(info_of(target).folds)  # folds of an earlier call stay; the report is of this one's
    remember_base(target)  # the unfolded weights: an adapter of the folded model carries the neighbours changed
    constants = {p: s for p, s in constant_scales(target).items() if p in candidates}
    searching = bool(tolerance)
    varying = [p for p in candidates if p not in constants]
    if data is None and (searching or (blocks and tolerance is None and varying)):
        what = f"tolerance {tolerance:g}" if searching else f"block {varying[0]} (its excitation depends on its input)"
        raise RetrofitError(f"{what}: the mean excitation and top-1 need the data it was trained on (--data DIR)")
    size = info_of(target).input_size
    base = cost(strip(target), size)
    before_cost = compare(base, cost(target, size))
    opened = open_images(target, data, config, images=images) if data is not None else None
    row, reports = (read_gates(target, opened)[:2]) if opened is not None else (None, [])
    local = {r.path: r for r in reports}
    if searching:
        order = sorted(candidates, key=lambda p: (p not in constants, local[p].local_change, candidates.index(p)))
        scales = {p: constants[p] if p in constants else local[p].scale for p in order}
        folded, after, probes = _search(target, order, scales, opened, tolerance, row)
    else:
        chosen = candidates if blocks and tolerance is None else [p for p in candidates if p in constants]
        folded, probes = target, []
        fold_scales(folded, {p: constants[p] if p in constants else local[p].scale for p in chosen})
        after = opened.evaluate(folded, "after the fold") if opened is not None else None
    after_cost = compare(base, cost(folded, size))
    out = _report(folded, info_of(folded).folds[already:], before_cost, local, constants)

    def metrics(r):
        return {"top1": r["top1"], "val_loss": r["val_loss"]} if r is not None else None

    return FoldResult(
        folded,
        out,
        len(candidates),
        tolerance,
        opened.count if opened is not None else 0,
        before_cost,
        after_cost,
        metrics(row),
        metrics(after),
        probes,
    )


def check_tolerance(tolerance: Any) -> float | None:
    if tolerance is None:
        return None
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not math.isfinite(tolerance)
        or not 0 <= tolerance <= MAX_TOLERANCE
    ):
        raise RetrofitError(
            f"tolerance must be a number of top-1 points from 0 to {MAX_TOLERANCE:g}, got {excerpt(tolerance)}"
        )
    return float(tolerance)


def _candidates(model: nn.Module, globs: Sequence[str] | None) -> list[str]:
    """The gates to consider, in model order: every one, or those the globs name."""
    found, others = require_gates(model, "fold"), gates(model)[1]
    if not globs:
        return [b.path for b in found]
    for pattern in globs:
        if not any(matches(b.path, pattern) for b in found):
            other = next(((b.path, why) for b, why in others if matches(b.path, pattern)), None)
            why = (
                f"{other[0]} is not a channel gate ({other[1]})"
                if other
                else f"names no block (gates: {', '.join(b.path for b in found[:4])}...)"
            )
            raise RetrofitError(f"blocks {excerpt(pattern)}: {why}")
    return [b.path for b in found if any(matches(b.path, p) for p in globs)]


def _search(
    target: nn.Module,
    order: list[str],
    scales: dict[str, torch.Tensor],
    images: Evaluator,
    tolerance: float,
    unfolded: dict[str, Any],
):
    """The longest prefix of ``order`` (found by bisection) whose folded model keeps val top-1 within
    ``tolerance`` points of ``unfolded``'s: ``(model, its row, the probes)``."""
    lo, hi = 0, len(order) + 1
    best, best_row, probes = target, unfolded, []
    floor = unfolded["top1"] - tolerance - 1e-9  # top-1 is a multiple of 100 / images: no rounding at the edge
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = copy.deepcopy(target)
        fold_scales(trial, {p: scales[p] for p in order[:mid]})
        row = images.evaluate(trial, f"{mid} of {len(order)} folded")
        probes.append({"folded": mid, "top1": row["top1"], "val_loss": row["val_loss"]})
        if row["top1"] >= floor:
            lo, best, best_row = mid, trial, row
        else:
            hi = mid
    return best, best_row, probes


def _report(model: nn.Module, folds: list, before: Overhead, local: dict, constants: dict) -> list[FoldedBlock]:
    info, costs = info_of(model), {b.path: b for b in before.blocks}
    sites = {b.path: b for b in [*info.blocks, *info.gone]}
    out = []
    for f in folds:
        c, site = costs.get(f.path), sites[f.path]
        kept = site.channels if f.into == "scale" else 0
        out.append(
            FoldedBlock(
                f.path,
                site.stage,
                site.position,
                f.into,
                f.neighbour,
                f.why,
                f.path in constants,
                local[f.path].local_change if f.path in local else None,
                (c.params if c else 0) - kept,
                c.macs if c else 0,
                (c.pool_ops + (0 if kept else c.scale_ops)) if c else 0,
            )
        )
    return out
