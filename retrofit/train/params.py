"""What trains in each phase of the fine-tune, and which layers keep their running statistics.

* phase 1: the inserted blocks' parameters, and the classifier when it is new (or asked for); every
  other parameter is frozen and every norm layer stays in eval mode, so the backbone (weights and
  running statistics) is bitwise what the user brought;
* phase 2: everything.
"""
from __future__ import annotations

from torch import nn

from ..errors import RetrofitError


def block_params(model: nn.Module) -> set[str]:
    """Names of the parameters of the blocks :func:`retrofit.add_se` inserted into ``model``."""
    info = getattr(model, "_retrofit", None)
    if info is None or not info.blocks:
        raise RetrofitError("this model has no SE blocks from retrofit; call retrofit.add_se first")
    return {n for b in info.blocks for n, _ in model.get_submodule(b.path).named_parameters(prefix=b.path)}


def head_params(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (timm's ``get_classifier()``); empty when there is none."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def fit_head(model: nn.Module, classes: int, seed: int) -> bool:
    """Give ``model`` a new classifier when the data has another number of classes; True if it did.
    Seeded, so a resumed run rebuilds the same head before the saved weights are loaded over it."""
    import torch

    have = getattr(model, "num_classes", None)
    if not isinstance(have, int) or have == classes:
        return False
    if not hasattr(model, "reset_classifier"):
        raise RetrofitError(f"the data has {classes} classes but the model {have}; give a model with "
                            f"{classes} outputs")
    torch.manual_seed(seed)
    model.reset_classifier(classes)
    return True


def set_trainable(model: nn.Module, names: set[str] | None) -> None:
    """``requires_grad`` on the parameters named in ``names`` only (None: on every parameter)."""
    for name, p in model.named_parameters():
        p.requires_grad_(names is None or name in names)


def is_norm(module: nn.Module) -> bool:
    """Layers with running statistics (BatchNorm and timm's norm+act variants, InstanceNorm with stats)."""
    return isinstance(module, nn.modules.batchnorm._NormBase) or hasattr(module, "running_mean")


def set_modes(model: nn.Module, frozen_norms: bool) -> None:
    """Training mode, except (``frozen_norms``: phase 1) the norm layers, which keep their statistics."""
    model.train()
    if frozen_norms:
        for m in model.modules():
            if is_norm(m):
                m.eval()
