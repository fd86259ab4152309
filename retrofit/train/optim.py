"""Optimizer and scheduler from timm's factories, and the DistributedDataParallel wrapper."""

from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import RetrofitError, excerpt, first_line
from .distributed import Dist


def create(
    model: nn.Module,
    *,
    opt: str,
    lr: float,
    weight_decay: float,
    sched: str,
    epochs: int,
    warmup_epochs: int,
    groups: list[dict] | None = None,
) -> tuple[Any, Any]:
    """``timm.optim.create_optimizer_v2`` over the parameters that require gradients (timm skips the
    others) and ``timm.scheduler.create_scheduler_v2`` stepped once per epoch; bad names are one line.

    ``groups``: parameter groups (:func:`retrofit.train.params.lr_groups`: ``lr_scale`` per group,
    applied by timm's scheduler) instead of timm's own grouping of ``model``."""

    try:
        optimizer = create_optimizer_v2(model if groups is None else groups, opt=opt, lr=lr, weight_decay=weight_decay)
    except (ValueError, AssertionError, KeyError) as err:
        raise RetrofitError(
            f"optimizer {excerpt(opt)}: {first_line(err)}; timm.optim.list_optimizers() lists the names"
        ) from None
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs)
    if scheduler is None:
        raise RetrofitError(f"unknown scheduler {excerpt(sched)}; use cosine, tanh, step, multistep, plateau or poly")
    return optimizer, scheduler


def wrap(model: nn.Module, env: Dist) -> nn.Module:
    """The module the loop calls: ``model`` itself, or a DDP wrapper of it under torchrun."""
    if env.world == 1:
        return model

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
