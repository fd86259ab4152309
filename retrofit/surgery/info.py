"""What :func:`retrofit.add_se` did to a model, kept on it as ``model._retrofit``: the recipe, the
input size it was traced at, each inserted block with the site it serves, and the blocks
:func:`retrofit.fold` has folded since (where each went).

Saving (:mod:`retrofit.files`), stripping (:mod:`retrofit.surgery.strip`), the overhead report and the
fine-tune read it; nothing else about a retrofit is stored on the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..blocks.config import BlockConfig

# Where a model's weights came from, as a file records it (metadata key `weights`, optional): built
# with random weights, timm's pretrained ones, a checkpoint of the user's, or trained by a phase-2
# fine-tune since. A phase-1 fine-tune leaves the backbone as it was, and so its provenance.
WEIGHTS = ("random", "pretrained", "checkpoint", "fine-tuned")
from .recipe import Recipe
from .sites import Skipped


@dataclass(frozen=True)
class BlockInfo:
    """One inserted block and the site it serves."""

    path: str          # the block's module path, e.g. "layer1.0.se"
    position: str
    site_kind: str
    site_module: str   # the module whose forward holds the site
    stage: int
    stride: int
    channels: int
    width: int
    size: tuple[int, int] = (0, 0)  # height and width of the feature map it scales (tokens: the patch grid)
    layout: str = "nchw"            # nchw, nhwc or tokens (see retrofit.blocks.se_layout)
    prefix: int = 0                 # tokens: class/register tokens before the patch grid
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


@dataclass
class RetrofitInfo:
    """What :func:`add_se` did to a model; kept on it as ``model._retrofit``."""

    recipe: Recipe
    input_size: tuple[int, ...]
    architecture: str | None
    blocks: list[BlockInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # blocks that took the place of an attribute set to None (timm's `self.se = None`): strip restores it
    was_none: list[str] = field(default_factory=list)
    weights: str = ""  # one of WEIGHTS, or "" when not known (a model given to retrofit.add_se)
    # blocks folded by retrofit.fold, in the order folded. One folded into a neighbour has left `blocks`
    # (its BlockInfo is in `gone`); one that became a ChannelScale stays in `blocks` (its module is there)
    folds: list[Folded] = field(default_factory=list)
    gone: list[BlockInfo] = field(default_factory=list)

    @property
    def built(self) -> int:
        """Blocks the recipe built: those still here and those folded into a neighbour."""
        return len(self.blocks) + len(self.gone)

    def folded(self, path: str) -> Folded | None:
        """The fold of the block at ``path``, if it was folded."""
        return next((f for f in self.folds if f.path == path), None)
