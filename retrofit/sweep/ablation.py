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
import statistics
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import RetrofitError, first_line
from ..measure.meta import is_meta
from ..surgery.insert import retrofit_scanned
from ..train.data import ImageFolderData
from ..train.distributed import setup
from ..train.finetune import finetune
from .rows import SweepRow, row_recipe

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


def with_accuracy(model: nn.Module, rows: list, found, base_recipe, *, data: str | Path, epochs: int,
                  seeds: int | Iterable[int], input_size: tuple[int, ...], latency: bool,
                  train: dict[str, Any] | None = None, on_run: Callable[[str], None] | None = None) -> list:
    """The control rows, then ``rows`` (a sweep's cost rows) with their accuracy columns.

    Args:
        model: the original network, with real weights (never modified).
        rows: :class:`~retrofit.sweep.rows.SweepRow` of the combinations; a row with a note (no site) stays
            as it is.
        found: the sweep's scan of ``model``; base_recipe: the other recipe fields.
        data: an ImageFolder (``train/``, ``val/``).
        epochs: phase-1 epochs of every run (the ``full`` control: the same number at the phase-2 rate).
        seeds: a number of seeds (``0..K-1``) or the seeds.
        input_size: ``(C, H, W)`` of the images.
        latency: the Pareto front is top-1 against latency (else against added parameters).
        train: other keyword arguments of :func:`retrofit.finetune` for every run (``lr``,
            ``batch_size``, ``phase2_lr``, ``augment``, ``workers``, ``device``, ``smoothing``...).
        on_run: called with one line after each run (progress for the CLI).
    """
    if is_meta(model):
        raise RetrofitError("an accuracy sweep fine-tunes the model: give one with real weights, not a meta one")
    seeds = parse_seeds(seeds)
    train = dict(train or {})
    for key in ("epochs", "phase2_epochs", "seed", "output_dir", "resume", "input_size", "restore_best",
                "train_head", "train_norms", "progress"):
        if key in train:
            raise RetrofitError(f"the sweep sets {key} itself for each run; leave it out of the training options")
    if epochs < 1:
        raise RetrofitError(f"--epochs must be at least 1 for an accuracy sweep, got {epochs}")
    distill = train.pop("distill", False)
    env = setup(train.get("device"))  # held for the whole sweep: each run joins the same process group
    try:
        pipeline = ImageFolderData.open(data, model, input_size, augment=train.get("augment", True))
        runs = _Runner(pipeline, epochs, input_size, train, on_run)
        total = (2 + sum(1 for r in rows if not r.note)) * len(seeds)
        runs.total = total
        controls = {name: [] for name in CONTROLS}
        failed: dict[str, str] = {}
        for name, kwargs in (("head+norms", dict(train_head=True, train_norms=True)),
                             ("full", dict(phase1=False))):
            for seed in seeds:
                result = runs.run(f"control {name}", lambda: copy.deepcopy(model), seed, **kwargs)
                if isinstance(result, str):  # the arm is a failed row; none of its seeds count
                    failed[name], controls[name] = result, []
                    break
                controls[name].append(result)
        originals = next((c for c in controls.values() if c), [])
        controls["original"] = [dict(r, last=r["original"]) for r in originals]
        control_rows = [_control_row(name, controls[name] if name not in failed else None, failed.get(name),
                                     seeds, latency) for name in CONTROLS]
        best = max((r for r in control_rows if r.top1 is not None), key=lambda r: r.top1, default=None)
        base_per_seed = controls[best.arm] if best is not None else None
        out = []
        for row in rows:
            if row.note:
                out.append(dataclasses.replace(row, seeds=tuple(seeds)))
                continue
            recipe = row_recipe(base_recipe, row)

            def build(seed: int, recipe=recipe) -> nn.Module:
                se_model = copy.deepcopy(model)
                torch.manual_seed(seed)  # the blocks' random init: a function of the seed
                with warnings.catch_warnings():  # narrow widths were already reported by the counts
                    warnings.simplefilter("ignore")
                    retrofit_scanned(found, se_model, recipe)
                return se_model

            per_seed = []
            for seed in seeds:
                result = runs.run(_label(row), lambda: build(seed), seed, distill=distill)
                if isinstance(result, str):
                    per_seed = result
                    break
                per_seed.append(result)
            if isinstance(per_seed, str):
                out.append(dataclasses.replace(row, seeds=tuple(seeds), note=f"fine-tune failed: {per_seed}"))
                continue
            out.append(_with_stats(row, per_seed, seeds, base_per_seed, best.arm if best else None))
        return pareto(control_rows + out, latency)
    finally:
        env.close()


class _Runner:
    """Runs one fine-tune of the sweep and reduces it to the numbers a row needs."""

    def __init__(self, pipeline, epochs: int, input_size, train: dict, report):
        self.pipeline, self.epochs, self.input_size, self.train, self.report = pipeline, epochs, input_size, train, report
        self.done, self.total = 0, 0

    def run(self, label: str, build: Callable[[], nn.Module], seed: int, phase1: bool = True, **options):
        """A dict (``last``, ``original``: metric rows) or, when the run fails, the reason (a string)."""
        epochs = dict(epochs=self.epochs) if phase1 else dict(epochs=0, phase2_epochs=self.epochs)
        try:
            result = finetune(build(), self.pipeline, **epochs, seed=seed, input_size=self.input_size,
                              restore_best=False, **self.train, **options)
        except Exception as err:  # noqa: BLE001 - a failed combination is a row with its reason
            reason = first_line(err) if isinstance(err, RetrofitError) else f"{type(err).__name__}: {first_line(err)}"
            self._say(f"{label}, seed {seed}: failed ({reason})")
            return reason
        last = result.row(f"epoch {self.epochs}")
        self._say(f"{label}, seed {seed}: top-1 {last['top1']:.2f}%, val loss {last['val_loss']:.4f}")
        return {"last": last, "original": result.row("original")}

    def _say(self, text: str) -> None:
        self.done += 1
        if self.report is not None:
            self.report(f"[{self.done}/{self.total}] {text}")


def _label(row) -> str:
    return f"{row.position} r={row.r_label} stages {row.stages_label}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _stats(per_seed: list[dict]) -> dict[str, Any]:
    top1 = [r["last"]["top1"] for r in per_seed]
    loss = [r["last"]["val_loss"] for r in per_seed]
    (m1, s1), (ml, sl) = mean_std(top1), mean_std(loss)
    return dict(top1=m1, top1_std=s1, val_loss=ml, val_loss_std=sl, top1_per_seed=tuple(top1),
                val_loss_per_seed=tuple(loss))


def _with_stats(row, per_seed: list[dict], seeds: list[int], control: list[dict] | None, control_name):
    stats = _stats(per_seed)
    if control:
        diffs = [a - b["last"]["top1"] for a, b in zip(stats["top1_per_seed"], control)]
        stats["delta_top1"], stats["delta_top1_std"] = mean_std(diffs)
        stats["control"] = control_name
    return dataclasses.replace(row, seeds=tuple(seeds), **stats)


def _control_row(name: str, per_seed: list[dict] | None, failed: str | None, seeds: list[int], latency: bool):
    note = {"original": "the original at step 0", "head+norms": "original, head + norm affine trained at lr",
            "full": "original, every parameter trained at the phase-2 lr"}[name]
    row = SweepRow("", 0.0, None, 0, 0, 0.0, 0, 0.0, 0, arm=name, seeds=tuple(seeds), note=note,
                   latency=1.0 if latency else None)  # the original architecture: latency ratio 1
    if not per_seed:
        return dataclasses.replace(row, note=f"failed: {failed}" if failed else "no run succeeded")
    return dataclasses.replace(row, **_stats(per_seed))


def pareto(rows: list, latency: bool) -> list:
    """Mark the rows with top-1 on the Pareto front of top-1 (higher is better) against added parameters
    (or latency; lower is better): no other row is at most as costly and at least as accurate, and
    better in one of them."""
    def cost(r):
        return r.latency if latency else r.params

    scored = [r for r in rows if r.top1 is not None and cost(r) is not None]
    ids = {id(r) for r in scored}
    out = []
    for r in rows:
        front = id(r) in ids and not any(
            cost(o) <= cost(r) and o.top1 >= r.top1 and (cost(o) < cost(r) or o.top1 > r.top1) for o in scored)
        out.append(dataclasses.replace(r, pareto=front))
    return out
