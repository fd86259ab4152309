"""The sweep of a timm model by name: what ``retrofit sweep MODEL`` computes, as one library call.

:func:`sweep_model` builds the model (on the meta device when nothing needs real weights: no checkpoint,
pretrained weights, latency or data), scans it once and runs :func:`retrofit.sweep` on it; the
:class:`SweepReport` it returns holds the rows and what the command prints and writes as JSON
(:meth:`SweepReport.to_dict` is ``retrofit sweep --json``, key for key).

    >>> report = retrofit.sweep_model("resnet50", r=[2, 4, 8, 16, 32], position=["standard", "post"])
    >>> len(report.rows), report.rows[0].cost.params
    (10, 20142208)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RetrofitError
from ..events import OnEvent
from ..files.create import build_named
from ..graph.model import model_name, resolve_input_size
from ..measure.meta import build_and_scan
from ..measure.overhead import count_params
from ..surgery.recipe import Recipe, resolve_recipe
from ..surgery.sites import Scan
from ..train.config import DEFAULTS, RUN_OPTIONS, FinetuneConfig
from ..train.distributed import check_device
from .ablation import verdict
from .grid import parse_axes, sweep
from .rows import SweepRow


@dataclass
class SweepReport:
    """What :func:`sweep_model` built and measured: the ``model`` (on the meta device unless real weights were
    needed), its ``scan``, the base ``recipe``, the ``rows`` and the settings of the latency and accuracy runs
    (``None`` when not run)."""

    model: nn.Module
    scan: Scan
    recipe: Recipe
    rows: list[SweepRow]
    latency: dict[str, Any] | None
    accuracy: dict[str, Any] | None

    @property
    def input_size(self) -> tuple[int, ...]:
        return self.scan.traced.input_size

    @property
    def latency_input_size(self) -> tuple[int, ...]:
        return tuple(self.latency["input_size"]) if self.latency else self.input_size

    @property
    def verdict(self) -> str | None:
        """Whether any recipe beat the best control arm, the last line of an accuracy sweep (None without
        data)."""
        return verdict(self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain values (``retrofit sweep --json``)."""
        return {
            "model": model_name(self.model),
            "input_size": list(self.input_size),
            "recipe": self.recipe.to_dict(),
            "latency": self.latency,
            "accuracy": self.accuracy,
            "base": {"params": count_params(self.model), "macs": self.scan.macs},
            "rows": [row.to_dict() for row in self.rows],
            "verdict": self.verdict,
        }


def sweep_model(
    name: str,
    r: Iterable[Any] | Any = (16,),
    position: Iterable[str] | str = ("standard",),
    stages: Iterable[Any] | Any = (None,),
    *,
    recipe: Recipe | str | dict | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | str | None = None,
    input_size: Any = None,
    latency: bool = False,
    batch: int = 8,
    latency_input_size: Any = None,
    runs: int = 10,
    data: str | Path | None = None,
    seeds: int = 1,
    config: FinetuneConfig | None = None,
    on_event: OnEvent | None = None,
    **options: Any,
) -> SweepReport:
    """Build the timm model ``name`` and sweep it: :func:`retrofit.sweep`'s axes, latency and accuracy runs
    (``r``, ``position``, ``stages`` as lists or as the command line's strings, ``"2,4,16"``), on the model
    :func:`retrofit.create` would build from ``checkpoint``, ``pretrained``, ``num_classes`` and ``input_size``.

    Args:
        latency_input_size: ``(C, H, W)`` or ``"C,H,W"`` of the latency runs (default: ``input_size``).
        data, seeds, config, options: the accuracy sweep (seeds ``0..seeds-1``; ``config`` and ``options``:
            :class:`retrofit.FinetuneConfig`, its ``epochs`` those of each run).
        on_event: :func:`retrofit.sweep`'s events (a ``run`` per fine-tune, a ``round`` per latency round).

    Raises:
        RetrofitError: what :func:`retrofit.sweep` and :func:`retrofit.create` refuse; ``batch`` or ``runs``
            below 1; with ``data``, ``epochs`` or ``seeds`` below 1; without it, epochs or seeds set.
    """
    base = resolve_recipe(recipe)
    r, position, stages = parse_axes(base, r, position, stages)  # bad input said before a model is built
    config = FinetuneConfig.build(config, **options)
    check_runs(batch, runs, data, config.epochs, seeds)
    if data is not None and config.device is not None:
        check_device(config.device)  # before the model is built
    real = latency or data is not None or checkpoint is not None or pretrained
    net, found = build_and_scan(
        lambda: build_named(name, checkpoint, pretrained, num_classes), input_size, meta=not real
    )
    size = found.traced.input_size
    timing_size = resolve_input_size(net, latency_input_size) if latency_input_size is not None else size
    rows = sweep(
        net,
        r,
        position,
        stages,
        recipe=base,
        input_size=size,
        latency=latency,
        batch=batch,
        latency_input_size=timing_size,
        runs=runs,
        found=found,
        data=data,
        seeds=seeds,
        config=config,
        on_event=on_event,
    )
    timing = {"batch": batch, "input_size": list(timing_size), "runs": runs} if latency else None
    accuracy = (
        {
            "data": str(data),
            "epochs": config.epochs,
            "seeds": list(range(seeds)),
            "train": {option: getattr(config, option) for option in RUN_OPTIONS},
        }
        if data is not None
        else None
    )
    return SweepReport(net, found, base, rows, timing, accuracy)


def check_runs(batch: int, runs: int, data, epochs: int, seeds: int) -> None:
    """The counts of a sweep's runs, checked before a model is built."""
    if batch < 1 or runs < 1:
        raise RetrofitError(f"--batch and --runs must be at least 1, got {batch} and {runs}")
    if data is not None:
        if epochs < 1 or seeds < 1:
            raise RetrofitError(f"--epochs and --seeds must be at least 1, got {epochs} and {seeds}")
    elif epochs != DEFAULTS["epochs"] or seeds != 1:
        raise RetrofitError("--epochs and --seeds set an accuracy sweep, which needs --data DIR")
