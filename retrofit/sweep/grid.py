"""Sweeps: the paper's ablation tables (its Tables 10 and 13 to 15) for any model, in seconds.

Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018, https://arxiv.org/abs/1709.01507) chose
r = 16, the standard position and all stages by sweeping them on ResNet-50. :func:`sweep` gives the
same trade-off table for your model: one row per combination of reduction ratio, position and stage
set, with the parameters and multiply-adds each adds and, optionally, its measured latency.

It costs about one ``add_se``, not one per combination: the model is traced and scanned once; each
(position, stages) pair is planned and its rewrites checked on that one scan (:func:`retrofit.surgery.prepare.prepare`,
which changes nothing); a ratio r only changes the widths, so the counts of every r come from the
same plan, each block measured alone on the meta device (:func:`retrofit.measure.overhead.planned_overhead`).
Only ``latency=True`` builds real models, one at a time, each timed against the original in the
same run (:mod:`retrofit.measure.latency`).

    >>> rows = retrofit.sweep(timm.create_model("resnet50"), r=[4, 16], position=["standard", "post"])
    >>> [(row.position, row.r, round(row.params_percent, 2)) for row in rows]
    [('standard', 4, 39.44), ('standard', 16, 9.9), ('post', 4, 39.44), ('post', 16, 9.9)]

With ``data=`` (an ImageFolder) every combination is also fine-tuned over several seeds, next to
control arms trained the same way (:mod:`retrofit.sweep.ablation`): the accuracy half of the paper's tables.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RecipeError, RetrofitError, excerpt
from ..events import Event, OnEvent, emit, legacy
from ..graph.model import model_name, resolve_input_size
from ..measure.latency import measure_latency
from ..measure.overhead import planned_overhead, traced_cost
from ..surgery.insert import paused_gc, retrofit_scanned
from ..surgery.plan import require_stages
from ..surgery.prepare import prepare
from ..surgery.recipe import Recipe, resolve_recipe
from ..surgery.recipe_fields import StageMap
from ..surgery.sites import Scan, scan
from ..train.config import FinetuneConfig
from .ablation import with_accuracy
from .rows import Cost, Latency, SweepRow, row_recipe

AXES = ("r", "position", "stages")


def sweep(
    model: nn.Module,
    r: Iterable[float] | float = (16,),
    position: Iterable[str] | str = ("standard",),
    stages: Iterable[Any] | Any = (None,),
    *,
    recipe: Recipe | str | dict | None = None,
    input_size: tuple[int, ...] | None = None,
    latency: bool = False,
    batch: int = 8,
    latency_input_size: tuple[int, ...] | None = None,
    runs: int = 10,
    warmup: int = 2,
    found: Scan | None = None,
    data: str | Path | None = None,
    seeds: int | Iterable[int] = 1,
    config: FinetuneConfig | None = None,
    on_event: OnEvent | None = None,
    train: dict[str, Any] | None = None,
    on_run: Callable[[str], None] | None = None,
    on_round: Callable[[int, int], None] | None = None,
    **options: Any,
) -> list[SweepRow]:
    """The cost of every combination of ``r`` x ``position`` x ``stages`` on ``model``, and with
    ``data`` its accuracy over seeds next to the control arms (:mod:`retrofit.sweep.ablation`).

    Args:
        model: the original network (never modified).
        r: reduction ratios, e.g. ``[2, 4, 8, 16, 32]``; an item may be a per-stage map
            (``{2: 8, 5: 32}``, or ``"2:8,5:32"``; stages it does not name keep ``recipe``'s r). As
            one string, items are separated by commas, or by ``;`` when an item is a map
            (``"16;2:8,3:8,4:16,5:32"``).
        position: positions, e.g. ``["standard", "pre", "post", "identity", "inside"]``.
        stages: stage sets: ``None`` or ``"all"`` for all stages, a stage number (``3``), or a set of
            them (``[3, 4]`` or ``"3+4"``: blocks in stages 3 and 4 only).
        recipe: the other recipe fields (squeeze, gate, divisor, min_width, bias, init); default
            :class:`~retrofit.Recipe` ``()``.
        input_size: ``(C, H, W)`` the counts are taken at; default: timm's ``pretrained_cfg``.
        latency: also time each retrofitted model against the original (builds one real model per
            combination; the model needs real weights, not meta ones).
        batch, latency_input_size, runs, warmup: the latency measurement (input size default:
            ``input_size``); see :func:`retrofit.measure.latency.measure_latency`.
        found: a scan of ``model`` at ``input_size`` with ``macs=True``, if you have one.
        data: an ImageFolder (``train/<class>/*``, ``val/<class>/*``): retrofit and fine-tune (phase 1)
            every combination once per seed, and add the control arms (``model`` needs real weights).
        seeds: how many seeds (``0..K-1``), or the seeds.
        config: the fine-tune of every run with ``data`` (:class:`retrofit.FinetuneConfig`; its ``epochs``:
            phase-1 epochs of each run, ``phase2_lr`` the ``full`` control's rate); the sweep sets the seed
            and what trains.
        **options: fields of :class:`retrofit.FinetuneConfig` overriding ``config``'s (``epochs=10``,
            ``lr=1e-2``, ``batch_size=10``...), checked as :func:`retrofit.finetune` checks them.
        on_event: called with each :class:`retrofit.Event`: a ``run`` after each fine-tune, a ``round``
            after each timed (or warm-up) latency round, counted over all combinations.
        train, on_run, on_round: deprecated: ``config``/``**options`` and ``on_event``.

    Returns:
        One :class:`SweepRow` per combination, positions outermost, then stages, then r; with ``data``,
        the three control rows (``arm`` ``original``, ``head+norms``, ``full``) first.

    Raises:
        RetrofitError: an empty axis, a bad value (named with the axis), a stage the model does not
            have, or a model the pass cannot trace.

    Example::

        >>> rows = retrofit.sweep(timm.create_model("resnet50"), r=[2, 4, 8, 16, 32],
        ...                       position=["standard", "inside"], stages=["all", 4, "3+4"])
        >>> len(rows), rows[0].position, rows[0].r, rows[0].cost.params
        (30, 'standard', 2, 20142208)
        >>> rows = retrofit.sweep(model, r=[4], data="data/", seeds=1, epochs=1, lr=1e-2, batch_size=8)
        >>> [row.arm for row in rows]     # the control arms first, trained the same way
        ['original', 'head+norms', 'full', 'se']
    """
    config = finetune_config(config, train, options, "retrofit.sweep")
    on_event = legacy(on_event, "retrofit.sweep", on_run=on_run, on_round=on_round)
    base_recipe = resolve_recipe(recipe)
    ratios, positions, stage_sets = parse_axes(base_recipe, r, position, stages)
    size = resolve_input_size(model, input_size)
    with paused_gc():
        if found is None:
            found = scan(model, size, macs=True)
        check_stages(found, stage_sets)
        check_stages(found, [stage_map.stages for stage_map in ratios if isinstance(stage_map, StageMap)], "--r")
        base = traced_cost(found.traced, found.macs)
        rows = []
        for pos in positions:
            for st in stage_sets:
                chosen = dataclasses.replace(base_recipe, position=pos, stages=st)
                try:
                    prepared = prepare(found, chosen)
                except RetrofitError as err:  # this position has no site in these stages: a row says so
                    rows += [SweepRow(pos, ratio, st, note=str(err)) for ratio in ratios]  # nothing added: no cost
                    continue
                for ratio in ratios:
                    this = dataclasses.replace(chosen, r=ratio)  # ratio: checked, a map has its base
                    report = planned_overhead(base, prepared.blocks(this), this)
                    rows.append(SweepRow(pos, ratio, st, Cost.of(report, len(prepared.skipped))))
    if latency:
        rows = _with_latency(model, found, rows, base_recipe, batch, latency_input_size or size, runs, warmup, on_event)
    if data is not None:
        rows = with_accuracy(
            model,
            rows,
            found,
            base_recipe,
            data=data,
            config=config,
            seeds=seeds,
            input_size=size,
            latency=latency,
            on_event=on_event,
        )
    return rows


def finetune_config(
    config: FinetuneConfig | None, train: dict[str, Any] | None, options: dict[str, Any], where: str
) -> FinetuneConfig:
    """The fine-tune config of a sweep's (or tune's) runs: ``config`` with ``options`` on top; ``train``, the
    dict of keyword arguments earlier versions took, is merged under them with a ``DeprecationWarning``."""
    if train is not None:
        warnings.warn(
            f"{where}(train=dict(...)) is deprecated: pass the options as keyword arguments "
            f"({where}(..., lr=1e-2)) or config=retrofit.FinetuneConfig(...)",
            DeprecationWarning,
            stacklevel=3,
        )
        options = {**train, **options}
    return FinetuneConfig.build(config, **options)


def _with_latency(model, found, rows, base_recipe, batch, size, runs, warmup, on_event=None) -> list[SweepRow]:
    out, each = [], warmup + runs
    total = each * sum(not row.note for row in rows)
    for row in rows:
        if row.note:
            out.append(row)
            continue
        chosen = row_recipe(base_recipe, row)
        se_model = copy.deepcopy(model)
        with warnings.catch_warnings():  # narrow widths were already reported by the counts
            warnings.simplefilter("ignore")
            retrofit_scanned(found, se_model, chosen)
        before = each * sum(not r.note for r in out)
        timing = measure_latency(
            {"original": model, "retrofitted": se_model},
            batch=batch,
            input_size=size,
            runs=runs,
            warmup=warmup,
            on_event=_counted(on_event, before, total),
        )
        low, high, _ = timing.interval("retrofitted", "original")
        out.append(
            dataclasses.replace(
                row,
                latency=Latency(
                    timing.ratio("retrofitted", "original"),
                    low,
                    high,
                    timing.median("retrofitted") * 1e3,
                    timing.median("original") * 1e3,
                ),
            )
        )
        del se_model
    return out


def _counted(on_event: OnEvent | None, before: int, total: int) -> OnEvent | None:
    """One combination's latency rounds as rounds of the whole sweep (``done`` counted over all of them)."""
    if on_event is None:
        return None
    return lambda e: emit(
        on_event,
        Event(
            "sweep",
            "round",
            f"round {before + e.data['done']}/{total}",
            {"done": before + e.data["done"], "total": total},
        ),
    )


# -- axes ---------------------------------------------------------------------------------------
def parse_axes(base_recipe: Recipe, r: Any, position: Any, stages: Any) -> tuple[list, list, list]:
    """The three axes of a sweep, each a checked list (:func:`parse_axis`): r and position as fields of
    ``base_recipe``, stages as stage sets."""
    return (
        parse_axis("r", r, lambda v: base_recipe.replace(r=v).r),
        parse_axis("position", position, lambda v: base_recipe.replace(position=v).position),
        parse_axis("stages", stages, parse_stages),
    )


def parse_axis(name: str, values: Any, check) -> list:
    """A list of axis values from a string or an iterable, each checked by ``check`` (duplicates
    dropped, order kept); an empty or malformed item is a RetrofitError naming the axis.

    A string's items are separated by commas; when an item is a per-stage map (``stage:value``
    pairs, themselves comma-separated), items are separated by ``;`` instead: ``"16;2:8,5:32"`` is
    two items, ``"2:8,5:32"`` one map, ``"4,8,16"`` three numbers."""
    if isinstance(values, str):
        items = split_axis(values)
        if not values.strip():
            raise RetrofitError(f"--{name}: empty list; give comma-separated values, e.g. {_EXAMPLES[name]}")
    elif isinstance(values, Iterable):
        items = list(values)
        if not items:
            raise RetrofitError(f"--{name}: empty list; give at least one value, e.g. {_EXAMPLES[name]}")
    else:
        items = [values]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and not item.strip():
            sep = "';'" if isinstance(values, str) and ";" in values else "comma"
            raise RetrofitError(
                f"--{name}: item {i + 1} of {excerpt(values)} is empty; give {sep}-separated "
                f"values, e.g. {_EXAMPLES[name]}"
            )
        try:
            value = check(item.strip() if isinstance(item, str) else item)
        except RecipeError as err:
            raise RetrofitError(f"--{name}: bad item {excerpt(item)} ({err})") from None
        if value not in out:
            out.append(value)
    return out


_EXAMPLES = {
    "r": "2,4,8,16,32 or '16;2:8,3:8,4:16,5:32'",
    "position": "standard,pre,post,identity,inside",
    "stages": "all,2,3,4,5,3+4",
    "module": "se,eca,cbam",
    "gate": "sigmoid,hard_sigmoid",
    "squeeze": "avg,max",
    "phase2-epochs": "0,2",
}  # the last four: retrofit tune's axes


def split_axis(text: str) -> list[str]:
    """An axis string's items: split on ``;`` if it has one, else one per-stage map if it has a
    ``:``, else split on commas."""
    if ";" in text:
        return text.split(";")
    return [text] if ":" in text else text.split(",")


def parse_stages(item: Any) -> tuple[int, ...] | None:
    """One stage set: ``"all"``/``None``, a stage number, ``"3+4"`` or a list of numbers."""
    if isinstance(item, str):
        item = "all" if item.strip().lower() == "all" else item.replace("+", ",")
        if item != "all" and any(not part.strip() for part in item.split(",")):
            raise RecipeError(f"a stage set is stage numbers joined by '+', e.g. 3+4, got {excerpt(item)}")
    return Recipe(stages=item).stages


def check_stages(found: Scan, stage_sets: Sequence[tuple[int, ...] | None], option: str = "--stages") -> None:
    """A stage no site of the model lies in is bad input (a position that has no site in an existing
    stage is a row with a note instead); ``option`` names the axis it came from (``--r``: the stages
    of a per-stage map)."""
    present = {s.stage for s in found.sites}
    for st in stage_sets:
        require_stages(st or (), present, model_name(found.traced.model), what=option)
