"""How much of a retrofitted model fine-tuning trains, as PEFT's ``print_trainable_parameters``.

Phase 1 of :func:`retrofit.finetune` trains the inserted blocks, and the classifier when it is new (or
``train_head=True``); everything else is frozen. :func:`trainable_parameters` counts that set against
the whole model (tied parameters once) and prints as one line::

    trainable parameters: 2,530,992 || all: 28,088,024 || 9.01%
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from ..errors import RetrofitError
from .info import get_info


class Trainable(NamedTuple):
    """Parameters phase 1 trains, and all parameters of the model."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} || all: {self.total:,} || {self.percent:.3g}%"


def trainable_parameters(model: nn.Module, *, head: bool = False) -> Trainable:
    """What phase 1 of :func:`retrofit.finetune` trains in ``model``: its inserted blocks, and its
    classifier (``model.get_classifier()``) when ``head`` (a new head, or ``train_head=True``).

    Example::

        >>> se = retrofit.add_se(timm.create_model("resnet50"), r=16)
        >>> print(retrofit.trainable_parameters(se))
        trainable parameters: 2,530,992 || all: 28,088,024 || 9.01%
    """
    info = get_info(model)
    if info is None:
        raise RetrofitError(f"this {type(model).__name__} has no blocks from retrofit.add_se; call it first")
    modules = [model.get_submodule(b.path) for b in info.blocks]
    if head:
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Module):
            raise RetrofitError("cannot find this model's classifier (it has no get_classifier())")
        modules.append(classifier)
    trained = {id(p) for m in modules for p in m.parameters()}
    params = list(model.parameters())  # each tied parameter once
    return Trainable(sum(p.numel() for p in params if id(p) in trained), sum(p.numel() for p in params))
