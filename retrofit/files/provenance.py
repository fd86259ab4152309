"""Where a model's weights came from: what its file records, or a guess when the file records nothing.

``retrofit add-se`` records it on the model (``retrofit.get_info(model).weights``): ``random`` without
``--checkpoint`` or ``--pretrained``, else ``checkpoint`` or ``pretrained``. A file keeps it (metadata
key ``weights``, optional: older files and models given to :func:`retrofit.add_se` have none), and a
fine-tune's phase 2, which trains the backbone, makes random weights ``fine-tuned``. For a model with
no record, :func:`look_random` guesses from the norm layers. On random weights a fine-tune shows only
that the code runs. With timm's ``zero_init_last`` the blocks on a residual branch get no gradient at
all (see :mod:`retrofit.train.gradients`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..surgery.info import get_info, update_info

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def recorded(model: nn.Module) -> str:
    """The provenance recorded on ``model`` (``random``, ``pretrained``...), or ``""``."""
    info = get_info(model)
    return info.weights if info is not None else ""


def look_random(model: nn.Module) -> bool:
    """Whether ``model``'s weights look freshly built, never trained: every norm layer exactly at its
    constructor's values (scale 1, or 0 where timm's ``zero_init_last`` zeroed it; shift 0; BatchNorm
    statistics mean 0 and variance 1). A trained network never has all of them: its statistics alone
    moved. A model without norm layers cannot be told, and is not called random."""
    norms = [m for m in model.modules() if isinstance(m, NORMS)]
    with torch.no_grad():
        for m in norms:
            tensors = [getattr(m, name, None) for name in ("weight", "bias", "running_mean", "running_var")]
            if any(t is not None and t.is_meta for t in tensors):
                return False
            weight, bias, mean, var = tensors
            if weight is not None and not (bool((weight == 1).all()) or not bool(weight.any())):
                return False
            if (bias is not None and bool(bias.any())) or (mean is not None and bool(mean.any())):
                return False
            if var is not None and not bool((var == 1).all()):
                return False
    return bool(norms)


def random_weights(model: nn.Module) -> str | None:
    """Why ``model``'s weights are random (one clause), or None when they are not (or cannot be told)."""
    said = recorded(model)
    if said == "random":
        return "recorded in its file: built without --checkpoint or --pretrained, no phase-2 fine-tune since"
    if not said and look_random(model):
        return "so they look: every norm layer is at its initial values"
    return None


def mark_trained(*models: nn.Module | None) -> None:
    """A phase-2 fine-tune trained the backbone: random weights are fine-tuned weights from now on."""
    for model in models:
        info = get_info(model) if model is not None else None
        if info is not None and info.weights == "random":
            update_info(model, weights="fine-tuned")
