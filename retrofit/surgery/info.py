"""What :func:`retrofit.add_se` did to a model, kept on it as ``model._retrofit``: the recipe, the
input size it was traced at, and each inserted block with the site it serves.

Saving (:mod:`retrofit.files`), stripping (:mod:`retrofit.surgery.strip`), the overhead report and the
fine-tune read it; nothing else about a retrofit is stored on the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..blocks.config import BlockConfig
from .recipe import Recipe
from .sites import Skipped

# Where a model's weights came from, as a file records it (metadata key `weights`, optional): built
# with random weights, timm's pretrained ones, a checkpoint of the user's, or trained by a phase-2
# fine-tune since. A phase-1 fine-tune leaves the backbone as it was, and so its provenance.
WEIGHTS = ("random", "pretrained", "checkpoint", "fine-tuned")


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
