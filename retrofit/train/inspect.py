"""``retrofit.inspect``: what each channel gate learnt, on the validation images (the paper's "Role of
Excitation"), and the evaluation passes :func:`retrofit.fold` shares with it.

One pass over the images evaluates the model (val top-1 and loss, :func:`retrofit.train.evaluate.evaluate`)
while :class:`retrofit.measure.excitation.Recorder` reads every gate; with ``output_change``, one more pass
per gate replaces that gate's excitation by its mean and measures how far the logits and the loss move
(definitions: :mod:`retrofit.measure.excitation`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..blocks.excitation import input_independent
from ..errors import RetrofitError, excerpt
from ..measure.excitation import GateReport, Recorder, replaced
from ..surgery.fold import gates, info_of, require_gates
from .config import FinetuneConfig
from .data import ImageFolderData, collate
from .distributed import Dist, check_device
from .evaluate import evaluate
from .progress import Progress

CACHE_BYTES = 1 << 30  # the inspected images are kept in memory for the later passes up to this size
JSON_CLASSES = 100  # Inspection.to_dict writes the per-class means up to this many classes


@dataclass
class Inspection:
    """What :func:`inspect` found: one :class:`~retrofit.measure.excitation.GateReport` per gate, the
    blocks it could not read (path, why), and the evaluation of the model on the same images."""

    blocks: list[GateReport]
    others: list[tuple[str, str]]
    classes: list[str]
    images: int
    top1: float
    val_loss: float
    data: str = ""

    def to_dict(self) -> dict[str, Any]:
        """As JSON: every gate's numbers and mean excitation per channel; its per-class means (the plot's
        lines) only for at most ``JSON_CLASSES`` classes (ImageNet's would be 1000 x C numbers per gate)."""
        blocks = [b.to_dict() for b in self.blocks]
        if len(self.classes) > JSON_CLASSES:
            for b in blocks:
                b.pop("class_means")
        return {
            "data": self.data,
            "images": self.images,
            "classes": self.classes,
            "top1": self.top1,
            "val_loss": self.val_loss,
            "blocks": blocks,
            "not_inspected": [{"block": p, "why": w} for p, w in self.others],
        }


@dataclass
class Evaluator:
    """The validation images of a data folder, ready for repeated passes over one model's outputs."""

    data: ImageFolderData
    batches: Iterable  # Batch objects: a list when they fit in memory, else the loader (read each time)
    env: Dist = field(default_factory=Dist)
    count: int = 0  # evaluations run (retrofit.fold's cost bound counts them)

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    def evaluate(self, model: nn.Module, label: str = "val", batches: Iterable | None = None) -> dict[str, Any]:
        """``top1`` and ``val_loss`` (and the rest of :func:`~retrofit.train.evaluate.evaluate`'s row) of
        ``model`` (on ``batches``: these images passed on, e.g. labelled for a recorder)."""
        self.count += 1
        model.to(self.env.device)
        return evaluate(
            model,
            self.batches if batches is None else batches,
            classes=len(self.classes),
            env=self.env,
            progress=Progress(False),
            label=label,
            seen_bad=set(),
            root=self.data.root,
            channels_last=False,
        )


def open_images(
    model: nn.Module, data: str | Path | ImageFolderData, config: FinetuneConfig, *, images: int | None = None
) -> Evaluator:
    """The val split of ``data`` (``images``: an evenly spaced subset of that many) for ``model``, whose
    classifier must have the data's number of classes; read ``config.batch_size`` images at a time by
    ``config.workers`` processes, on ``config.device``.

    Raises:
        RetrofitError: a bad folder, a data set with another number of classes than the model, a bad count.
    """
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
        raise RetrofitError(f"images must be a whole number >= 1, got {excerpt(images)}")
    info = info_of(model)
    opened = (
        data
        if isinstance(data, ImageFolderData)
        else ImageFolderData.open(data, model, input_size=info.input_size, augment=False)
    )
    have = getattr(model, "num_classes", None)
    if isinstance(have, int) and have != len(opened.classes):
        raise RetrofitError(
            f"{opened.root} has {len(opened.classes)} classes but the model's classifier has {have} "
            f"outputs: give the data it was trained on (inspect and fold measure the model's own task)"
        )
    dataset = opened.val
    if images is not None and images < len(dataset):
        dataset = Subset(dataset, [int(i * len(opened.val) / images) for i in range(images)])
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers, collate_fn=collate)
    if len(dataset) * 4 * math.prod(info.input_size) <= CACHE_BYTES:
        loader = list(loader)
    env = Dist(
        device=check_device(config.device)
        if config.device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    return Evaluator(opened, loader, env)


class _Labelled:
    """The batches, telling the recorder each batch's labels before the model sees it."""

    def __init__(self, batches, recorder: Recorder):
        self.batches, self.recorder = batches, recorder

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.recorder.targets = batch.targets
            yield batch


def read_gates(model: nn.Module, images: Evaluator, logits: bool = False):
    """One evaluation pass of ``model`` that also reads every gate: ``(row, reports, logits)`` (``logits``:
    the outputs per batch, kept for :func:`output_changes`; else None)."""
    found, _ = gates(model)
    kept: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda m, a, out: kept.append(out.detach().float().cpu())) if logits else None
    try:
        with Recorder(model, found, len(images.classes)) as recorder:
            row = images.evaluate(model, "reading the gates", _Labelled(images.batches, recorder))
    finally:
        if hook is not None:
            hook.remove()
    reports = recorder.reports()
    for r in reports:
        r.constant = input_independent(model.get_submodule(r.path), r.module)
    return row, reports, kept if logits else None


@torch.no_grad()
def output_changes(model: nn.Module, images: Evaluator, reports: list[GateReport], base: list[torch.Tensor]) -> None:
    """Fill in each report's ``logit_change`` and ``loss_change``: one pass per gate with its excitation
    replaced by its mean (see :mod:`retrofit.measure.excitation`)."""
    model.eval()
    logits = torch.cat(base)
    targets = torch.cat([b.targets for b in images.batches])
    base_loss = F.cross_entropy(logits.double(), targets).item()
    norm = logits.double().pow(2).sum().sqrt().item()
    for r in reports:
        with replaced(model, r.path, torch.tensor(r.channel_means, dtype=torch.float64)):
            out = torch.cat([model(b.images.to(images.env.device)).float().cpu() for b in images.batches])
        r.logit_change = (out.double() - logits.double()).pow(2).sum().sqrt().item() / norm if norm > 0 else 0.0
        r.loss_change = F.cross_entropy(out.double(), targets).item() - base_loss


def inspect(
    model: nn.Module,
    data: str | Path | ImageFolderData,
    *,
    images: int | None = None,
    output_change: bool = True,
    config: FinetuneConfig | None = None,
    **options: Any,
) -> Inspection:
    """Read every channel gate of a retrofitted ``model`` on the val images of ``data``.

    Args:
        model: a model from :func:`retrofit.add_se` or :func:`retrofit.load` (typically fine-tuned), whose
            classifier has the data's classes.
        data: a folder with ``train/<class>/*`` and ``val/<class>/*`` images (the one it was fine-tuned on),
            or an open :class:`~retrofit.train.data.ImageFolderData`.
        images: read an evenly spaced subset of this many val images (default: all).
        output_change: also measure each gate's constancy at the model's output (one more pass per gate).
        config, options: the evaluation reads three options of :class:`retrofit.FinetuneConfig`:
            ``batch_size`` (images per forward pass), ``workers`` (data-loading processes) and ``device``
            (``cpu``, ``cuda`` or ``cuda:N``; default: cuda when available); given as a config, keyword
            arguments, or both (the keywords win).

    Returns:
        An :class:`Inspection`: per gate the stage, position, mean excitation, its spread across images and
        across class means, the share of saturated channels, the local change and (``output_change``) the
        relative change of the logits and the change of the loss when its excitation is its mean
        (definitions: :mod:`retrofit.measure.excitation`); the blocks that are not channel gates, with why.

    Raises:
        RetrofitError: a model without blocks or without a channel gate, a bad data folder, data with
            another number of classes than the model's classifier.

    Example::

        >>> report = retrofit.inspect(model, "data/", images=6)     # model: fine-tuned on data/
        >>> report.images, [b.path for b in report.blocks]
        (6, ['layer1.0.se', 'layer2.0.se', 'layer3.0.se', 'layer4.0.se'])
    """
    require_gates(model, "inspect")
    others = gates(model)[1]
    opened = open_images(model, data, FinetuneConfig.build(config, **options), images=images)
    mode = model.training
    try:
        row, reports, logits = read_gates(model, opened, logits=output_change)
        if output_change:
            output_changes(model, opened, reports, logits)
    finally:
        model.train(mode)
    return Inspection(
        reports,
        [(b.path, why) for b, why in others],
        opened.classes,
        row["val_images"],
        row["top1"],
        row["val_loss"],
        str(opened.data.root),
    )
