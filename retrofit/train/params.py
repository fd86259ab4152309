"""What trains in each phase of the fine-tune, and which layers keep their running statistics.

* phase 1: what the run chose from the inserted blocks' parameters, the classifier (when it is new,
  or asked for) and the norm layers' affine parameters (``train_norms``: the control arm that tunes
  only cheap parameters of the original network); every other parameter is frozen and every norm
  layer stays in eval mode, so the backbone (weights and running statistics) is bitwise what the
  user brought;
* phase 2: everything.

A frozen parameter has ``requires_grad=False``: autograd computes no weight gradient for it, the
optimizer holds no state for it, and the layers before the first trainable one (for SE at the
standard position: the stem and the first stage's convolutions) record no graph and keep no
activations, since nothing before them needs a gradient.

The parameters that are new (the blocks, and a head built for the data) and the rest can train at
different rates (:func:`lr_groups`, timm's ``lr_scale`` convention).
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ..errors import RetrofitError
from ..surgery.info import get_info


def block_params(model: nn.Module) -> set[str]:
    """Names of the parameters of the blocks :func:`retrofit.add_se` inserted into ``model`` (empty
    for a plain network: the control arms of a sweep)."""
    info = get_info(model)
    if info is None or not info.blocks:
        return set()
    return {n for b in info.blocks for n, _ in model.get_submodule(b.path).named_parameters(prefix=b.path)}


def all_folded(model: nn.Module) -> bool:
    """A retrofitted model whose every block :func:`retrofit.fold` folded into a neighbour: nothing of the
    retrofit is left to train, but it is still a retrofit model (its file records the folds)."""
    info = get_info(model)
    return info is not None and not info.blocks and bool(info.gone)


def head_params(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (timm's ``get_classifier()``); empty when there is none."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def head_is_recorded_new(model: nn.Module) -> bool:
    """Whether the model's recorded base (:func:`retrofit.files.adapter.remember_base`, as ``add-se
    --num-classes`` records it) leaves its classifier out: a head created anew, not the base's."""
    info = get_info(model)
    head = head_params(model)
    return info is not None and info.base is not None and bool(head) and not head & set(info.base.digests)


def norm_params(model: nn.Module) -> set[str]:
    """Names of the affine parameters (scale and shift) of the norm layers: BatchNorm, LayerNorm,
    GroupNorm and timm's norm+act variants (subclasses of these)."""
    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return {
        f"{m_name}.{p_name}" if m_name else p_name
        for m_name, m in model.named_modules()
        if isinstance(m, kinds)
        for p_name, _ in m.named_parameters(recurse=False)
    }


def fit_head(model: nn.Module, classes: int, seed: int) -> bool:
    """Give ``model`` a new classifier when the data has another number of classes; True if it did.
    Seeded, so a resumed run rebuilds the same head before the saved weights are loaded over it, and
    every arm of a sweep (with or without blocks) gets the same head for the same seed."""
    have = getattr(model, "num_classes", None)
    if not isinstance(have, int) or have == classes:
        return False
    if not hasattr(model, "reset_classifier"):
        raise RetrofitError(f"the data has {classes} classes but the model {have}; give a model with {classes} outputs")
    torch.manual_seed(seed)
    model.reset_classifier(classes)
    return True


def set_trainable(model: nn.Module, names: set[str] | None) -> None:
    """``requires_grad`` on the parameters named in ``names`` only (None: on every parameter)."""
    for name, p in model.named_parameters():
        p.requires_grad_(names is None or name in names)


def lr_groups(model: nn.Module, new: set[str], scale: float, weight_decay: float) -> list[dict]:
    """Parameter groups for ``timm.optim.create_optimizer_v2``: the trainable parameters named in
    ``new`` at the phase's learning rate, the other trainable ones at ``scale`` times it (timm's
    schedulers multiply a group's rate by its ``lr_scale``, as for layer decay). Weight decay is split
    as timm splits it (none on biases and norm parameters, nor on ``model.no_weight_decay()``)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = []
    for is_new in (True, False):  # the new parameters first: param_groups[0]["lr"] is the phase's rate
        for g in groups:
            ps = [p for p in g["params"] if (name_of[id(p)] in new) == is_new]
            if ps:
                out.append({**g, "params": ps, **({} if is_new else {"lr_scale": scale})})
    return out


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
