"""A retrofitted model by name: what ``retrofit add-se MODEL`` computes, as one library call.

:func:`create_model` is ``timm.create_model`` with blocks: it builds the timm model (its weights from
``checkpoint``, timm's ``pretrained`` ones, or random), finds its sites, inserts the blocks of the recipe
and records where the weights came from. :func:`create` does the same and keeps what it measured on the
way, which is what ``add-se`` prints and writes as JSON: the sites (one scan of the model), the overhead
(counted from the plan, each block measured alone on the meta device: no second trace), what phase 1
of a fine-tune would train, and with ``latency`` the forward time against the original's.

    >>> se = retrofit.create_model("resnet50", r=16, position="post", checkpoint="my_resnet50.safetensors")
    >>> made = retrofit.create("resnet101", r=16, position="post")   # on the meta device: no weights, seconds
    >>> made.overhead.added_params, len(made.to_dict()["sites"])
    (4777712, 6)

Without real weights needed (``meta=None`` and no checkpoint, pretrained or latency) the model is built on
the meta device (:mod:`retrofit.measure.meta`): it can be measured and reported, not saved or trained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RetrofitError, excerpt
from ..events import OnEvent
from ..graph.model import model_name
from ..measure.latency import Timing, measure_latency
from ..measure.meta import build_and_scan
from ..measure.overhead import Overhead, planned_overhead, traced_cost
from ..measure.report import latency_json, sites_json
from ..surgery.info import update_info
from ..surgery.insert import paused_gc, retrofit_scanned
from ..surgery.named import named_sites
from ..surgery.recipe import Recipe, resolve_recipe
from ..surgery.sites import Scan, Site
from ..surgery.trainable import Trainable, trainable_parameters
from .adapter import head_keys, remember_base
from .bounds import whole_number
from .models import create_model as build_timm
from .models import new_head


@dataclass
class Retrofitted:
    """What :func:`create` made and measured: the retrofitted ``model``, its ``scan`` (sites, skipped
    candidates, kept modules), the ``named`` (``at``) sites, the ``overhead``, what phase 1 trains
    (``trainable``), whether the classifier is new, what the base is (``base_name``) and, when asked,
    the ``latency`` against the original."""

    model: nn.Module
    recipe: Recipe
    scan: Scan
    named: list[Site]
    overhead: Overhead
    trainable: Trainable
    new_head: bool
    base_name: str
    latency: Timing | None = None
    skipped: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain values (``retrofit add-se --json``)."""
        data = {
            "model": model_name(self.model),
            "recipe": self.recipe.to_dict(),
            "sites": sites_json(self.scan, self.named),
            **self.overhead.to_dict(),
            "skipped": [{"where": s.where, "reason": s.reason} for s in self.skipped],
            "trainable_parameters": {"trainable": self.trainable.trainable, "total": self.trainable.total},
        }
        if self.latency is not None:
            data["latency"] = latency_json(self.latency)
        return data


def create(
    name: str,
    recipe: Recipe | str | dict | None = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | str | None = None,
    input_size: Any = None,
    meta: bool | None = None,
    latency: bool = False,
    batch: int = 8,
    runs: int = 10,
    on_event: OnEvent | None = None,
    weights_needed: bool = False,
    **fields: Any,
) -> Retrofitted:
    """Build the timm model ``name``, retrofit it by ``recipe`` (and ``fields``, as :func:`retrofit.add_se`),
    and measure it (see the module doc).

    Args:
        name: a timm model name (``resnet101``).
        recipe, fields: the recipe, as :func:`retrofit.add_se` takes it.
        checkpoint: your weights (``.safetensors``, ``.pth``...), loaded through timm; never written to.
        pretrained: timm's pretrained weights (needs network access).
        num_classes: the classifier's size (default: the weights'; another size gets a new head).
        input_size: ``(C, H, W)`` or ``"C,H,W"`` to trace at (default: the model's ``pretrained_cfg``).
        meta: build on the meta device (default: when nothing needs real weights); True with real weights
            needed is an error.
        weights_needed: the caller needs real weights (to save or fine-tune the model).
        latency, batch, runs: also time the model against the original (:func:`retrofit.measure_latency`;
            ``on_event`` gets its ``round`` events).

    Raises:
        RetrofitError: an unknown model, a bad recipe, a number of classes outside the bounds a file may
            hold, a bad ``batch``/``runs``, ``meta`` with real weights needed.
    """
    chosen = resolve_recipe(recipe, **fields)
    classes = parse_num_classes(num_classes)
    if batch < 1 or runs < 1:
        raise RetrofitError(f"--batch and --runs must be at least 1, got {batch} and {runs}")
    needs_weights = checkpoint is not None or pretrained or latency or weights_needed
    if meta and needs_weights:
        raise RetrofitError(
            "--meta builds the model without weights: it cannot go with --output, --checkpoint, "
            "--pretrained, --latency or --finetune; drop --meta"
        )
    with paused_gc():
        net, found = build_and_scan(
            lambda: build_named(name, checkpoint, pretrained, classes),
            input_size,
            meta=not needs_weights if meta is None else meta,
        )
        named = named_sites(found.traced, chosen.at, model_name(net)) if chosen.at else []  # before the blocks
        base = traced_cost(found.traced, found.macs)  # measured before the surgery changes `net`
        original = copy.deepcopy(net) if latency else None
        info = retrofit_scanned(found, net, chosen)  # in place: the model is ours
        report = planned_overhead(base, info.blocks, chosen)  # a block adds only itself: no second trace
    weights = "checkpoint" if checkpoint is not None else "pretrained" if pretrained else "random"
    cfg = getattr(net, "pretrained_cfg", None) or {}
    hub = dict(base_model=cfg.get("hf_hub_id") or "", license=cfg.get("license") or "") if pretrained else {}
    update_info(net, weights=weights, **hub)
    head = new_head(name, checkpoint, pretrained, classes)
    base_name = f"{name}, " + (
        f"weights {Path(checkpoint).name}"
        if checkpoint is not None
        else "timm's pretrained weights"
        if pretrained
        else "random weights"
    )
    if not any(p.is_meta for p in net.parameters()):  # the base an adapter is relative to: the weights as built
        remember_base(net, base_name, new=head_keys(net) if head else set())  # (a new head is not the base's)
    timing = None
    if latency:
        timing = measure_latency(
            {"original": original, "retrofitted": net},
            batch=batch,
            input_size=found.traced.input_size,
            runs=runs,
            on_event=on_event,
        )
    return Retrofitted(
        net,
        chosen,
        found,
        named,
        report,
        trainable_parameters(net, head=head),
        head,
        base_name,
        timing,
        list(info.skipped),
    )


def create_model(name: str, recipe: Recipe | str | dict | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with SE blocks: the timm model ``name``, retrofitted by ``recipe`` (keyword
    arguments as :func:`create`'s: ``checkpoint``, ``pretrained``, ``num_classes``, ``input_size`` and the
    recipe's fields). It records where its weights came from, and the base an adapter of it is relative to.

    Example::

        >>> se = retrofit.create_model("resnet50", r=16, checkpoint="my_resnet50.safetensors")
        >>> folder = retrofit.save_pretrained(se, "se50/")
    """
    return create(name, recipe, **{"weights_needed": True, **kwargs}).model


def build_named(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """The timm model ``name`` with its weights from ``checkpoint``, timm's ``pretrained`` ones or random, and
    ``num_classes`` outputs (checked by :func:`parse_num_classes`): what every command that takes a model
    name builds. ``seed``: random weights drawn after ``torch.manual_seed(seed)`` (the global generator
    restored after), so the same call builds the same model in every process and on every machine."""
    classes = parse_num_classes(num_classes)
    kwargs = {} if classes is None else {"num_classes": classes}
    if seed is None:
        return build_timm(name, checkpoint=checkpoint, pretrained=pretrained, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_timm(name, checkpoint=checkpoint, pretrained=pretrained, **kwargs)


def parse_num_classes(num_classes: int | str | None) -> int | None:
    """``num_classes`` as a whole number within the bound a file may hold (checked before a head is built:
    a file of it could not be loaded either)."""
    if num_classes is None:
        return None
    text = str(num_classes).strip()
    if isinstance(num_classes, bool) or not text.isdigit():
        raise RetrofitError(f"--num-classes must be a whole number, got {excerpt(num_classes)}")
    try:
        return whole_number(text, "num_classes")
    except ValueError as err:
        raise RetrofitError(f"--num-classes: {err}") from None
