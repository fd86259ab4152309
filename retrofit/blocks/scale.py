"""A constant per-channel scale: what a folded channel gate becomes where no neighbour can take it.

A channel gate whose excitation no longer depends on its input (``retrofit fold``) multiplies every input
by the same ``s``: ``y = x * s``. Where the algebra lets a neighbouring layer absorb ``s`` exactly, the block
goes away (:mod:`retrofit.surgery.fold`); elsewhere it becomes this module, which keeps the block's call
(its place in the rebuilt forward, the fused residual sum of the standard position included) and costs
``C`` parameters, no pooling and no multiply-adds: one multiplication per element, as the gate's own
scaling pass. The scale is a parameter, so a later fine-tune can still move it.

    >>> x = torch.randn(2, 64, 8, 8)
    >>> scale = ChannelScale(64)
    >>> scale(x).equal(x)       # ones until a fold sets it
    True
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from torch import nn

from .se_layout import channel_dim


@register_notrace_module  # one node for the tracers, as the block it replaces
class ChannelScale(nn.Module):
    """``x * scale`` along the channel axis of ``layout`` (``nchw``: axis 1; ``nhwc`` and ``tokens``: the
    last); called as ``module(x, shortcut)`` it returns ``x * scale + shortcut`` in one pass, as the
    standard-position block it replaces did.

    Args:
        channels: channels of the feature map.
        layout: ``nchw``, ``nhwc`` or ``tokens`` (:mod:`retrofit.blocks.se_layout`).
    """

    fuses_residual_sum = True
    squeezes = False  # for the overhead report: no pooling pass, only the scaling one

    def __init__(self, channels: int, layout: str = "nchw", device=None, dtype=None):
        super().__init__()
        self.channels, self.width, self.layout = channels, 0, layout
        self.scale = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        s = self.scale.view(-1, 1, 1) if channel_dim(self.layout) == 1 else self.scale
        if shortcut is not None:
            return torch.addcmul(shortcut, x, s)
        return x * s

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout}"
