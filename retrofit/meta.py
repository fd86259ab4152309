"""Analysis without weights: build the model on the meta device when no real weights are needed.

Sites, shapes and the parameter and multiply-add counts need the model's structure, not its weights
(see :mod:`retrofit.shapes`). Built under ``torch.device("meta")``, a model allocates no memory and
skips its weight initialisation, so ``retrofit add-se resnext101_32x32d`` (468 M parameters, 1.9 GB
in float32) reports in seconds on a laptop. Saving, loading a checkpoint, fine-tuning and timing
need real weights and build the model normally. A model whose construction or shape pass needs real
tensors falls back to a real build, and so does one with a module fx cannot trace that a forward on
meta tensors cannot go into (:mod:`retrofit.opaque` records one real forward to trace its parts).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .sites import Scan, scan


def build_and_scan(build: Callable[[], nn.Module], input_size, meta: bool,
                   macs: bool = True) -> tuple[nn.Module, Scan]:
    """``build()`` the model (on the meta device if ``meta``) and scan it at ``input_size`` (a size or
    ``None`` for the model's own; see :func:`retrofit.models.resolve_input_size`). Falls back to a
    real build when the meta one fails; errors of the real build are the user's."""
    from .models import resolve_input_size

    if meta:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = build()
            found = scan(net, resolve_input_size(net, input_size), macs=macs)
            if not found.traced.needs_real_run:
                return net, found
        except Exception:  # a constructor or forward that needs real values: build it for real
            pass
    net = build()
    return net, scan(net, resolve_input_size(net, input_size), macs=macs)


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
