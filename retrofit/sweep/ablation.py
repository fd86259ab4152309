"""The accuracy side of a sweep: fine-tune every combination over several seeds, next to control arms.

The paper chose r = 16, the standard position and all stages from accuracy ablations (Hu et al.,
"Squeeze-and-Excitation Networks", CVPR 2018, https://arxiv.org/abs/1709.01507, Tables 10 and 13 to
15). :func:`retrofit.sweep` with ``data=`` runs the same ablation on your model and data: each
combination is retrofitted and fine-tuned (phase 1: the blocks, and a new head when the data has
another number of classes) once per seed, and its row gets the last epoch's val top-1 and val loss as
mean ± std over the seeds.

A gain is only a gain against a baseline trained the same way, so the same table always holds the
**control arms**, each run with the same seeds, data order and number of steps:

* ``original``: the network you brought, at step 0 (with the seed's new head when the classes differ);
* ``head+norms``: the original network, phase 1 training its classifier and its norm layers' affine
  parameters (statistics frozen) at ``lr``: cheap parameters of the original, trained as long;
* ``full``: the original network, every parameter at the phase-2 learning rate (``phase2_lr``,
  default ``lr / 10``) for the same number of epochs.

Each SE row also gets the paired difference of its top-1 to the strongest control (the highest mean
top-1), mean ± std over the seeds, and a mark when it lies on the Pareto front of top-1 against added
parameters (or latency), controls included: an SE row is on the front only if nothing cheaper is as
accurate.

Same draws in every arm: data order, augmentation, mixup and dropout are functions of ``(seed,
epoch)`` (:func:`retrofit.finetune`), a new head is built from ``seed`` alone
(:func:`~retrofit.train.params.fit_head`), and the blocks of seed ``s`` are those of
``torch.manual_seed(s); retrofit.add_se(model, recipe)``: a row's numbers for seed ``s`` are those of
``retrofit finetune`` on that model with ``--seed s`` (bitwise on CPU). One data pipeline
(:class:`~retrofit.train.data.ImageFolderData`) and the sweep's one scan serve every run.

Under ``torchrun`` every run is DistributedDataParallel over all the processes (the combinations run
one after the other, each as fast as the job allows); every process gets the same rows.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RetrofitError, first_line
from ..events import Event, OnEvent, emit
from ..measure.meta import is_meta
from ..surgery.insert import retrofit_scanned
from ..train.config import DEFAULTS, FinetuneConfig
from ..train.data import ImageFolderData
from ..train.distributed import PeerLost, setup
from ..train.finetune import finetune
from .rows import Accuracy, Latency, SweepRow, row_recipe

CONTROLS = ("original", "head+norms", "full")


def parse_seeds(seeds: int | Iterable[int]) -> list[int]:
    """``3`` -> ``[0, 1, 2]``; a list of seeds as it is (duplicates dropped, order kept)."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise RetrofitError(f"--seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in dict.fromkeys(seeds)]
    if not out:
        raise RetrofitError("seeds: give at least one seed")
    return out


def with_accuracy(
    model: nn.Module,
    rows: list,
    found,
    base_recipe,
    *,
    data: str | Path,
    config: FinetuneConfig,
    seeds: int | Iterable[int],
    input_size: tuple[int, ...],
    latency: bool,
    on_event: OnEvent | None = None,
) -> list:
    """The control rows, then ``rows`` (a sweep's cost rows) with their accuracy columns.

    Args:
        model: the original network, with real weights (never modified).
        rows: :class:`~retrofit.sweep.rows.SweepRow` of the combinations; a row with a note (no site) stays
            as it is.
        found: the sweep's scan of ``model``; base_recipe: the other recipe fields.
        data: an ImageFolder (``train/``, ``val/``).
        config: the fine-tune of every run (:class:`retrofit.FinetuneConfig`): its ``epochs`` are the phase-1
            epochs of every run (the ``full`` control: the same number at ``phase2_lr``); the sweep sets the
            seed and what trains itself; ``distill`` applies to the SE rows (a control has no blocks).
        seeds: a number of seeds (``0..K-1``) or the seeds.
        input_size: ``(C, H, W)`` of the images.
        latency: the Pareto front is top-1 against latency (else against added parameters).
        on_event: called with a ``run`` event (:class:`retrofit.Event`) after each run (progress).
    """
    seeds = check_accuracy_run(model, seeds, config)
    distill, config = config.distill, config.replace(distill=False)
    env = setup(config.device)  # held for the whole sweep: each run joins the same process group
    try:
        pipeline = ImageFolderData.open(data, model, input_size, augment=config.augment)
        runs = _Runner(pipeline, config, input_size, on_event)
        runs.total = (2 + sum(1 for r in rows if not r.note)) * len(seeds)
        controls: dict[str, list[dict] | str] = {}
        for name in ("head+norms", "full"):
            controls[name] = []
            for seed in seeds:
                result = runs.run(f"control {name}", lambda: copy.deepcopy(model), seed, **CONTROL_OPTIONS[name])
                if isinstance(result, str):  # the arm is a failed row; none of its seeds count
                    controls[name] = result
                    break
                controls[name].append(result)
        control_rows_, base = control_rows(controls, seeds, latency)
        out = []
        for row in rows:
            if row.note:
                out.append(dataclasses.replace(row, seeds=tuple(seeds)))
                continue
            recipe = row_recipe(base_recipe, row)
            per_seed = []
            for seed in seeds:
                # the lambda is called inside runs.run, in this iteration
                result = runs.run(
                    _label(row),
                    lambda: build_retrofitted(model, found, recipe, seed),  # noqa: B023
                    seed,
                    distill=distill,
                )
                if isinstance(result, str):
                    per_seed = result
                    break
                per_seed.append(result)
            if isinstance(per_seed, str):
                out.append(dataclasses.replace(row, seeds=tuple(seeds), note=f"fine-tune failed: {per_seed}"))
                continue
            out.append(with_stats(row, per_seed, seeds, base))
        return pareto(control_rows_ + out, latency)
    finally:
        env.close()


# the options every run of an accuracy sweep (or tune) sets itself: they must keep their defaults
SET_BY_THE_SWEEP = ("phase2_epochs", "seed", "train_head", "train_norms")


def check_accuracy_run(model: nn.Module, seeds: int | Iterable[int], config: FinetuneConfig) -> list[int]:
    """The seeds of an accuracy run (the sweep's, the tune's), checked with its config: one clear error
    for a meta model, no seed, no epoch or an option the runs set themselves."""
    if is_meta(model):
        raise RetrofitError("an accuracy sweep fine-tunes the model: give one with real weights, not a meta one")
    seeds = parse_seeds(seeds)
    for key in SET_BY_THE_SWEEP:
        if getattr(config, key) != DEFAULTS[key]:
            raise RetrofitError(f"the sweep sets {key} itself for each run; leave it out of the training options")
    if config.epochs < 1:
        raise RetrofitError(f"--epochs must be at least 1 for an accuracy sweep, got {config.epochs}")
    return seeds


# what each trained control arm changes in the fine-tune (the original arm is the runs' step 0)
CONTROL_OPTIONS: dict[str, dict[str, Any]] = {
    "head+norms": dict(train_head=True, train_norms=True),
    "full": dict(phase1=False),
}


def build_retrofitted(model: nn.Module, found, recipe, seed: int) -> nn.Module:
    """``model``'s copy with the blocks of ``recipe`` whose random init is a function of ``seed``: those of
    ``torch.manual_seed(seed); retrofit.add_se(model, recipe)``."""
    se_model = copy.deepcopy(model)
    torch.manual_seed(seed)  # the blocks' random init: a function of the seed
    with warnings.catch_warnings():  # narrow widths were already reported by the counts
        warnings.simplefilter("ignore")
        retrofit_scanned(found, se_model, recipe)
    return se_model


def run_arm(
    pipeline: ImageFolderData,
    model: nn.Module,
    config: FinetuneConfig,
    seed: int,
    *,
    input_size,
    phase1: bool = True,
    phase2_epochs: int = 0,
    on_event: OnEvent | None = None,
    **options,
) -> dict[str, Any]:
    """One fine-tune of an accuracy run: ``model`` (trained in place) by ``config`` with ``seed``;
    ``phase1=False`` trains ``config.epochs`` epochs of phase 2 only (the ``full`` control); ``options``:
    other options of this run (``train_head``...). Returns ``last`` (the last epoch's row), ``original``
    (the original's row) and ``rows``; a failure raises."""
    epochs = config.epochs
    planned = dict(epochs=epochs, phase2_epochs=phase2_epochs) if phase1 else dict(epochs=0, phase2_epochs=epochs)
    result = finetune(
        model,
        pipeline,
        config,
        **planned,
        seed=seed,
        input_size=input_size,
        restore_best=False,
        on_event=on_event,
        **options,
    )
    last = next(r for r in reversed(result.rows) if not r["name"].endswith("(ema)"))  # the live weights' row
    return {"last": last, "original": result.row("original"), "rows": result.rows}


def failure(err: Exception, limit: int = 300) -> str:
    """The reason a run failed, as a row's note says it (its first line, at most ``limit`` characters)."""
    line = first_line(err, limit)
    return line if isinstance(err, RetrofitError) else f"{type(err).__name__}: {line}"


class _Runner:
    """Runs one fine-tune of the sweep and reduces it to the numbers a row needs."""

    def __init__(self, pipeline, config: FinetuneConfig, input_size, on_event: OnEvent | None):
        self.pipeline, self.config, self.input_size, self.on_event = pipeline, config, input_size, on_event
        self.done, self.total = 0, 0

    def run(self, label: str, build: Callable[[], nn.Module], seed: int, phase1: bool = True, **options):
        """A dict (``last``, ``original``: metric rows) or, when the run fails, the reason (a string)."""
        try:
            result = run_arm(
                self.pipeline, build(), self.config, seed, input_size=self.input_size, phase1=phase1, **options
            )
        except PeerLost:
            raise  # another process of the torchrun job died: no row can run any more
        except Exception as err:  # noqa: BLE001 - a failed combination is a row with its reason
            reason = failure(err)
            self._say(f"{label}, seed {seed}: failed ({reason})", label=label, seed=seed, failed=reason)
            return reason
        last = result["last"]
        self._say(
            f"{label}, seed {seed}: top-1 {last['top1']:.2f}%, val loss {last['val_loss']:.4f}",
            label=label,
            seed=seed,
            top1=last["top1"],
            val_loss=last["val_loss"],
        )
        return result

    def _say(self, text: str, **data: Any) -> None:
        self.done += 1
        emit(
            self.on_event,
            Event("sweep", "run", f"[{self.done}/{self.total}] {text}", dict(done=self.done, total=self.total, **data)),
        )


def _label(row) -> str:
    return f"{row.position} r={row.r_label} stages {row.stages_label}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# Student's t quantiles t(0.975, df) for df = 1..30 (beyond: the normal's 1.96); a table, so the core
# package needs no scipy (benchmarks/transfer.py's interval() computes the same with scipy.stats.t.ppf)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_interval(xs: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean of ``xs`` (paired differences over seeds); None for one value."""
    if len(xs) < 2:
        return None
    mean, std = mean_std(xs)
    half = (_T975[len(xs) - 2] if len(xs) - 1 <= len(_T975) else 1.96) * std / math.sqrt(len(xs))
    return mean - half, mean + half


def _stats(per_seed: list[dict]) -> Accuracy:
    top1 = [r["last"]["top1"] for r in per_seed]
    loss = [r["last"]["val_loss"] for r in per_seed]
    (m1, s1), (ml, sl) = mean_std(top1), mean_std(loss)
    return Accuracy(
        top1=m1, top1_std=s1, val_loss=ml, val_loss_std=sl, top1_per_seed=tuple(top1), val_loss_per_seed=tuple(loss)
    )


def with_stats(row, per_seed: list[dict], seeds: list[int], control) -> SweepRow:
    """``row`` with the accuracy of its runs (one per seed) and the paired difference to ``control`` (the
    best control row, or None)."""
    stats = _stats(per_seed)
    if control is not None:
        diffs = [a - b for a, b in zip(stats.top1_per_seed, control.top1_per_seed)]
        mean, std = mean_std(diffs)
        stats = dataclasses.replace(
            stats, delta_top1=mean, delta_top1_std=std, delta_top1_ci=t_interval(diffs), control=control.arm
        )
    return dataclasses.replace(row, seeds=tuple(seeds), accuracy=stats)


NOTES = {
    "original": "the original at step 0",
    "head+norms": "original, head + norm affine trained at lr",
    "full": "original, every parameter trained at the phase-2 lr",
}


def control_rows(
    controls: dict[str, list[dict] | str], seeds: list[int], latency: bool, notes: dict[str, str] | None = None
) -> tuple[list[SweepRow], SweepRow | None]:
    """The control rows and the best of them (highest mean top-1; None if none ran). ``controls``: each
    trained arm (``head+norms``, ``full``; any name) -> its per-seed results, or why it failed; the
    ``original`` arm is the step-0 row those runs share."""
    originals = next((c for c in controls.values() if not isinstance(c, str) and c), [])
    every = {"original": [dict(r, last=r["original"]) for r in originals], **controls}
    rows = []
    for name, per_seed in every.items():
        note = (notes or {}).get(name) or NOTES.get(name, "")
        row = SweepRow(
            "",
            0.0,
            None,
            arm=name,
            seeds=tuple(seeds),
            note=note,  # nothing added: no cost
            latency=Latency(1.0) if latency else None,
        )  # the original architecture: latency ratio 1
        if isinstance(per_seed, str) or not per_seed:
            row = dataclasses.replace(
                row, note=f"failed: {per_seed}" if isinstance(per_seed, str) else "no run succeeded"
            )
        else:
            row = dataclasses.replace(row, accuracy=_stats(per_seed))
        rows.append(row)
    best = max((r for r in rows if r.top1 is not None), key=lambda r: r.top1, default=None)
    return rows, best


def verdict(rows: list) -> str | None:
    """The closing line of an accuracy run: whether a recipe beat the best control beyond the 95% interval
    of its paired difference (the interval's low end above 0). None when no recipe row has a difference."""
    scored = [r for r in rows if r.arm == "se" and r.delta_top1 is not None]
    if not scored:
        return None
    control = scored[0].control
    winners = [r for r in scored if r.delta_top1_ci is not None and r.delta_top1_ci[0] > 0]
    best = max(winners or scored, key=lambda r: (r.delta_top1, -r.params))
    delta = f"Δ top-1 {best.delta_top1:+.2f} points" + (
        f" [95% CI {best.delta_top1_ci[0]:+.2f}, {best.delta_top1_ci[1]:+.2f}]"
        if best.delta_top1_ci
        else " (one seed: no interval)"
    )
    if winners:
        return f"{describe_row(best)} beat the control '{control}' on this data: {delta}"
    return f"no recipe beat the control '{control}' on this data: best {describe_row(best)}, {delta}"


def describe_row(row) -> str:
    """A recipe row as the verdict names it: ``identity r=4 stages all`` (and its trial in a tune)."""
    text = _label(row) + (f" ({row.label})" if row.label else "")
    return text + (f" (trial {row.trial})" if row.trial is not None else "")


def pareto(rows: list, latency: bool) -> list:
    """Mark the rows with top-1 on the Pareto front of top-1 (higher is better) against added parameters
    (or latency; lower is better): no other row is at most as costly and at least as accurate, and
    better in one of them."""

    def cost(r):
        return (r.latency.ratio if r.latency is not None else None) if latency else r.params

    scored = [r for r in rows if r.top1 is not None and cost(r) is not None]
    ids = {id(r) for r in scored}
    out = []
    for r in rows:
        front = id(r) in ids and not any(
            cost(o) <= cost(r) and o.top1 >= r.top1 and (cost(o) < cost(r) or o.top1 > r.top1) for o in scored
        )
        out.append(
            r if r.accuracy is None else dataclasses.replace(r, accuracy=dataclasses.replace(r.accuracy, pareto=front))
        )
    return out
