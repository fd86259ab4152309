"""One training epoch: micro-batches, gradient accumulation, DDP's ``no_sync`` between steps, gradient
clipping and the updates after each step (model EMA)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import numpy as np
import torch
from timm.utils import dispatch_clip_grad
from torch import nn

from .data import warn_bad
from .distributed import Dist
from .loss import Objective
from .progress import Progress


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch: a run's random draws are functions of the seed (and epoch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_epoch(
    net: nn.Module,
    model: nn.Module,
    loader,
    optimizer,
    *,
    accum: int,
    env: Dist,
    progress: Progress,
    label: str,
    seen_bad: set[str],
    objective: Objective,
    clip_grad: float | None,
    clip_mode: str,
    channels_last: bool,
    after_step: Callable[[], None] | None = None,
    check_step: Callable[[], None] | None = None,
) -> tuple[float, int, int]:
    """Train ``net`` (``model``, or its DDP wrapper) for one pass over ``loader``.

    Each micro-batch: mixup / cutmix (``objective.mix``), the forward pass, the teacher's logits when
    distilling (``model`` with its blocks bypassed), the loss (``objective``). Before each optimizer
    step the gradients are clipped (``timm.utils.dispatch_clip_grad``: ``clip_mode`` norm, value or
    agc) when ``clip_grad`` is set; after it ``after_step()`` runs (the EMA update). ``check_step()`` runs
    once, before the first optimizer step in which some process trained on images (the gradients are
    all-reduced by then, so every process makes the same call): the phase's first-step check.

    Returns the mean training loss, the number of images trained on and the number of undecodable
    images skipped, each summed over the processes.

    Each image weighs ``1 / images of its optimizer step over all processes`` (``loader.batch_sampler``
    is a :class:`~retrofit.train.data.TrainBatches`), so a step's gradient is the mean over its global batch
    whether the step is full or the smaller last one, and whatever the number of processes (DDP
    averages the processes' gradients, hence the factor ``world``).
    """
    dev = env.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    steps = len(loader)
    loss_sum, seen, bad = 0.0, 0, 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    task = progress.task(label, steps)
    had_images = False
    for i, batch in enumerate(loader):
        bad += len(batch.bad)
        if env.main:
            warn_bad(batch.bad, seen_bad)
        sync = (i + 1) % accum == 0 or i + 1 == steps
        no_sync = net.no_sync() if (net is not model and not sync) else contextlib.nullcontext()
        with no_sync:
            if len(batch.targets):
                had_images = True
                x = batch.images.to(dev, non_blocking=True, memory_format=fmt)
                y = batch.targets.to(dev, non_blocking=True)
                x, target = objective.mix(x, y)
                teacher = objective.teacher_logits(model, x, env.autocast)
                with env.autocast():
                    # the objective is a mean over the micro-batch (mixed, smoothed, distilled): times its
                    # size, the sum the step's weighting below divides
                    summed = objective(net(x).float(), target, teacher) * len(y)
                loss_sum += summed.item()
                seen += len(y)
                loss = summed * (env.world / loader.batch_sampler.step_images(i))
            else:  # no image here (all bad, or none left for this process): a zero step keeps processes in lock-step
                loss = sum(p.sum() * 0 for p in trainable)
            loss.backward()
        if sync:
            if check_step is not None and env.any(had_images):  # a step of zero steps (no image) proves nothing
                check_step()
                check_step = None
            had_images = False
            if clip_grad is not None:
                dispatch_clip_grad(trainable, clip_grad, mode=clip_mode)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
        progress.advance(task, loss=loss_sum / max(seen, 1))
    loss_sum, seen, bad = env.sum([loss_sum, seen, bad])
    return loss_sum / max(seen, 1), int(seen), int(bad)
