"""One training epoch: micro-batches, gradient accumulation, and DDP's ``no_sync`` between steps."""
from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F
from torch import nn

from ..data import warn_bad
from ..distributed import Dist
from .progress import Progress


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch: a run's random draws are functions of the seed (and epoch)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_epoch(net: nn.Module, model: nn.Module, loader, optimizer, *, accum: int, env: Dist,
                progress: Progress, label: str, seen_bad: set[str]) -> tuple[float, int, int]:
    """Train ``net`` (``model``, or its DDP wrapper) for one pass over ``loader``.

    Returns the mean training loss, the number of images trained on and the number of undecodable
    images skipped, each summed over the processes.

    Each image weighs ``1 / images of its optimizer step over all processes`` (``loader.batch_sampler``
    is a :class:`~retrofit.data.TrainBatches`), so a step's gradient is the mean over its global batch
    whether the step is full or the smaller last one, and whatever the number of processes (DDP
    averages the processes' gradients, hence the factor ``world``).
    """
    dev = env.device
    steps = len(loader)
    loss_sum, seen, bad = 0.0, 0, 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    task = progress.task(label, steps)
    for i, batch in enumerate(loader):
        bad += len(batch.bad)
        if env.main:
            warn_bad(batch.bad, seen_bad)
        sync = (i + 1) % accum == 0 or i + 1 == steps
        no_sync = net.no_sync() if (net is not model and not sync) else contextlib.nullcontext()
        with no_sync:
            if len(batch.targets):
                x, y = batch.images.to(dev, non_blocking=True), batch.targets.to(dev, non_blocking=True)
                with env.autocast():
                    summed = F.cross_entropy(net(x).float(), y, reduction="sum")
                loss_sum += summed.item()
                seen += len(y)
                loss = summed * (env.world / loader.batch_sampler.step_images(i))
            else:  # no image here (all bad, or none left for this process): a zero step keeps processes in lock-step
                loss = sum(p.sum() * 0 for p in trainable)
            loss.backward()
        if sync:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress.advance(task, loss=loss_sum / max(seen, 1))
    loss_sum, seen, bad = env.sum([loss_sum, seen, bad])
    return loss_sum / max(seen, 1), int(seen), int(bad)
