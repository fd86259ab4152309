"""What :func:`retrofit.add_se` did to a model: the recipe, the input size it was traced at, each inserted
block with the site it serves, where the weights came from, the base an adapter is relative to, and the
blocks :func:`retrofit.fold` has folded since (where each went).

This module owns that record. It lives on the model (so it follows deep copies, ``torch.save`` and a
``GraphModule``'s copies), and only the functions here read or write it: :func:`get_info` (public:
``retrofit.get_info``) reads it, :func:`set_info`, :func:`update_info` and :func:`clear_info` write it.
The record is a frozen dataclass, so what ``get_info`` hands out cannot be changed behind the owner's
back; a change is a new record (:func:`update_info`).

    >>> se = retrofit.add_se(timm.create_model("resnet50"), r=16)
    >>> info = retrofit.get_info(se)
    >>> info.recipe.r, len(info.blocks), info.blocks[0].path, info.blocks[0].site_kind
    (16, 16, 'layer1.0.se', 'residual')
    >>> retrofit.get_info(timm.create_model("resnet50")) is None    # a model retrofit did not touch
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..blocks.config import BlockConfig
from .recipe import Recipe
from .sites import Skipped

# Where a model's weights came from, as a file records it (metadata key `weights`, optional): built
# with random weights, timm's pretrained ones, a checkpoint of the user's, or trained by a phase-2
# fine-tune since. A phase-1 fine-tune leaves the backbone as it was, and so its provenance.
WEIGHTS = ("random", "pretrained", "checkpoint", "fine-tuned")

_ATTR = "_retrofit"  # the attribute the record lives in; no module but this one names it


@dataclass(frozen=True)
class BlockInfo:
    """One inserted block and the site it serves."""

    path: str  # the block's module path, e.g. "layer1.0.se"
    position: str
    site_kind: str
    site_module: str  # the module whose forward holds the site
    stage: int
    stride: int
    channels: int
    width: int
    size: tuple[int, int] = (0, 0)  # height and width of the feature map it scales (tokens: the patch grid)
    layout: str = "nchw"  # nchw, nhwc or tokens (see retrofit.blocks.se_layout)
    prefix: int = 0  # tokens: class/register tokens before the patch grid
    config: BlockConfig = BlockConfig()  # how the block is built (the recipe resolved for its site)


# Where a folded block went (retrofit.surgery.fold): into a neighbour's weights, along one axis, or a
# ChannelScale module of its own at the block's path
FOLD_KINDS = {
    "norm": "the affine weight and bias of the norm before it",
    "conv_out": "the output channels of the convolution before it",
    "conv_in": "the input channels of the convolution after it",
    "linear_out": "the output features of the linear layer before it",
    "linear_in": "the input features of the linear layer after it",
    "scale": "a channel-scale module in its place",
}


@dataclass(frozen=True)
class Folded:
    """A block replaced by its constant scale: its path, where the scale went (one of ``FOLD_KINDS``) and
    the neighbour module that took it (``""`` for ``scale``: the block's path then holds a
    :class:`~retrofit.blocks.scale.ChannelScale`)."""

    path: str
    into: str
    neighbour: str = ""
    why: str = ""  # for a `scale` fold, why no neighbour could take it (a report's; not stored in files)


@dataclass(frozen=True)
class BaseRecord:
    """The base weights an adapter of the model is relative to (:mod:`retrofit.files.adapter`): a sha256
    per state-dict key, and what the base is (``"resnet50, weights my_resnet50.safetensors"``)."""

    digests: Mapping[str, str] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class RetrofitInfo:
    """What :func:`retrofit.add_se` did to a model (``retrofit.get_info(model)``).

    Attributes:
        recipe: the recipe of the last retrofit (a second ``add_se`` adds its blocks to the first's).
        input_size: ``(C, H, W)`` the model was traced at.
        architecture: the timm model name, or None for a network that is not from timm.
        blocks: every inserted block, with the site it serves (:class:`BlockInfo`).
        skipped: the candidate sites passed over, each with its reason.
        was_none: blocks that took the place of an attribute set to None (timm's ``self.se = None``).
        weights: where the weights came from (one of :data:`WEIGHTS`), or ``""`` when not known.
        base: the base weights an adapter is relative to, once recorded (:class:`BaseRecord`), else None.
        base_model: the Hugging Face Hub id of the weights the model was built on (timm's pretrained
            weights: ``timm/resnet50.a1_in1k``), when known; a saved folder's card names it.
        license: the license of those weights (timm's ``pretrained_cfg``), when known.
        folds: the blocks :func:`retrofit.fold` has folded, in the order folded (:class:`Folded`).
        gone: the records of the folded blocks that left ``blocks`` (folded into a neighbour); one that
            became a :class:`~retrofit.blocks.scale.ChannelScale` stays in ``blocks`` (its module is there).
    """

    recipe: Recipe
    input_size: tuple[int, ...]
    architecture: str | None
    blocks: tuple[BlockInfo, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    was_none: tuple[str, ...] = ()
    weights: str = ""
    base: BaseRecord | None = None
    base_model: str = ""
    license: str = ""
    folds: tuple[Folded, ...] = ()
    gone: tuple[BlockInfo, ...] = ()

    @property
    def sites(self) -> tuple[str, ...]:
        """The module whose forward holds each block's site, in block order."""
        return tuple(b.site_module for b in self.blocks)

    @property
    def built(self) -> int:
        """The number of blocks the recipe built, those still here and those folded into a neighbour."""
        return len(self.blocks) + len(self.gone)

    def folded(self, path: str) -> Folded | None:
        """The fold of the block at ``path``, if it was folded."""
        return next((f for f in self.folds if f.path == path), None)


def get_info(model: nn.Module) -> RetrofitInfo | None:
    """What :func:`retrofit.add_se` did to ``model`` (a frozen :class:`RetrofitInfo`: recipe, input size,
    architecture, blocks with their sites, skipped candidates, provenance, base), or None for a model
    retrofit did not touch (or that :func:`retrofit.strip` gave back)."""
    info = getattr(model, _ATTR, None)
    return info if isinstance(info, RetrofitInfo) else None


def set_info(model: nn.Module, info: RetrofitInfo) -> RetrofitInfo:
    """Record ``info`` on ``model`` (a ``GraphModule`` keeps it through its own deep copies too)."""
    model.__dict__[_ATTR] = info  # not an nn.Module attribute: neither a submodule nor state
    if isinstance(model, fx.GraphModule):  # GraphModule's deepcopy keeps only attributes listed here
        model.meta.setdefault("_user_preserved_attributes", {})[_ATTR] = info
    return info


def update_info(model: nn.Module, **changes: Any) -> RetrofitInfo:
    """Record a copy of ``model``'s record with ``changes`` (``weights=``, ``base=``...) and return it."""
    info = get_info(model)
    if info is None:
        raise ValueError("update_info: the model has no record of a retrofit")
    return set_info(model, dataclasses.replace(info, **changes))


def clear_info(model: nn.Module) -> None:
    """Forget the record (:func:`retrofit.strip`)."""
    model.__dict__.pop(_ATTR, None)
    if isinstance(model, fx.GraphModule):
        model.meta.get("_user_preserved_attributes", {}).pop(_ATTR, None)
