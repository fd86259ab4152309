"""What tracing changes on a model, put back afterwards: the attributes fx sets on a traced root and
the caches eval-mode forwards fill.

A trace must leave the user's model exactly as it was, whether it succeeds or raises: every context
manager here restores its state on every exit path.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn


@contextlib.contextmanager
def eval_caches_cleared(model: nn.Module):
    """Empty the caches eval-mode forwards fill (timm's LeViT and EfficientFormer attention biases)
    before and after tracing: a trace would read a cached tensor as a constant, and a traced eval
    forward would leave fx Proxies in the user's model. Those modules clear their caches in
    ``train()``; the training flags are put back as they were, so the model's mode is unchanged."""

    def clear():
        if any(type(m).train is not nn.Module.train for m in model.modules()):
            modes = [(m, m.training) for m in model.modules()]
            model.train()
            for m, mode in modes:
                m.training = mode

    clear()
    try:
        yield
    finally:
        clear()


@contextlib.contextmanager
def attributes_kept(module: nn.Module, taken: dict[str, Any]):
    """Undo the attributes fx's ``create_arg`` sets on the traced root, moving them into ``taken``."""
    before = set(module.__dict__)
    try:
        yield
    finally:
        for name in set(module.__dict__) - before:
            taken[name] = module.__dict__.pop(name)
