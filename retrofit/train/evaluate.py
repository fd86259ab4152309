"""Validation: loss and top-1/top-5 over every image once (summed over processes)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RetrofitError, excerpt
from .data import warn_bad
from .distributed import Dist
from .progress import Progress


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    classes: int,
    env: Dist,
    progress: Progress,
    label: str,
    seen_bad: set[str],
    root,
    channels_last: bool,
) -> dict[str, Any]:
    """``val_loss``, ``top1``, ``top5`` (percent), ``val_images`` and ``skipped_images`` of ``model``
    on ``loader`` (the shard of this process; the sums are global)."""
    dev = env.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    loss_sum = n = top1 = top5 = bad = 0.0
    task = progress.task(label, len(loader))
    for batch in loader:
        bad += len(batch.bad)
        if env.main:
            warn_bad(batch.bad, seen_bad)
        if len(batch.targets):
            x, y = batch.images.to(dev, memory_format=fmt), batch.targets.to(dev)
            with env.autocast():
                logits = model(x).float()
            if logits.dim() != 2 or logits.shape[1] < classes:
                raise RetrofitError(
                    f"the model gives {tuple(logits.shape[1:])} outputs per image but the data has {classes} classes"
                )
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
            top1 += hits[:, 0].sum().item()
            top5 += hits.any(dim=1).sum().item()
            n += len(y)
        progress.advance(task)
    loss_sum, n, top1, top5, bad = env.sum([loss_sum, n, top1, top5, bad])
    if n == 0:
        raise RetrofitError(f"no image in {excerpt(root)}/val could be decoded")
    return dict(
        val_loss=loss_sum / n, top1=100 * top1 / n, top5=100 * top5 / n, val_images=int(n), skipped_images=int(bad)
    )
