"""Squeeze-and-Excitation on channels-last feature maps and token sequences.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507

The paper's block works on (N, C, H, W) maps: squeeze over H, W, excite the C channels. Transformer
and ConvNeXt/Swin-style blocks carry their features channels last: (N, H, W, C) maps and (B, N, C)
token sequences. :class:`ChannelsLastSqueezeExcite` is the same block with the channel axis last:

* squeeze: the average (or max) over every axis between the batch and the channels, that is over the
  spatial positions; for a token sequence, over the patch tokens only. The ``prefix`` tokens in front
  (a ViT's class token, register tokens) are not positions of the image: the class token is what the
  network is computing its summary *into*, and averaging it in would make the excitation read its
  own target. They are left out of the squeeze.
* excite: one gate per channel, applied to every token, prefix tokens included: the excitation
  recalibrates channels (features), and the class token carries the same features.

The parameters are :class:`~retrofit.blocks.se.SqueezeExcite`'s (``fc1``/``fc2`` as 1x1 convolutions, on
the pooled (B, C, 1, 1) vector), so widths, parameter counts, state-dict layout and the preserving
init (exact identity at the start) are the same as for the NCHW block.
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module

from .se import SqueezeExcite

LAYOUTS = ("nchw", "nhwc", "tokens")


def channel_dim(layout: str) -> int:
    """The axis that holds the channels in a tensor of ``layout``."""
    return 1 if layout == "nchw" else -1


@register_notrace_module
class ChannelsLastSqueezeExcite(SqueezeExcite):
    """SE for (N, ..., C) tensors: squeeze over the middle axes (after ``prefix`` leading tokens),
    excite the last one. Same arguments as :class:`~retrofit.blocks.se.SqueezeExcite`, plus ``prefix``.

    Example::

        >>> se = ChannelsLastSqueezeExcite(192, 12, prefix=1, init="preserve")  # ViT-Ti tokens
        >>> x = torch.randn(2, 197, 192)
        >>> bool((se(x) == x).all())
        True
    """

    def __init__(self, channels: int, width: int, *, prefix: int = 0, **kwargs):
        super().__init__(channels, width, **kwargs)
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Never reads the tensor's rank: under torch.fx ``x.dim()`` is a Proxy, which a user's
        # ``symbolic_trace`` or torchvision's ``create_feature_extractor`` (tracers that do not keep
        # this class as a leaf) cannot loop over or build a shape from. TorchScript compiles it too.
        grid = x[:, self.prefix :] if self.prefix > 0 else x
        grid = grid.flatten(1, -2)  # (N, positions, C): a map's H x W, or the grid tokens
        z = grid.amax(dim=1) if self.squeeze_type == "max" else grid.mean(dim=1)
        s = self.gate(self.fc2(self.act(self.fc1(z[:, :, None, None]))))
        if self.gate_origin != 1.0:
            s = s / self.gate_origin
        # the (N, C) gates broadcast over every middle axis: the batch moved next to the channels and back
        return (x.movedim(0, -2) * s.flatten(1)).movedim(-2, 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefix={self.prefix}"


def make_block(layout: str, channels: int, width: int, *, prefix: int = 0, **kwargs) -> SqueezeExcite:
    """The SE block for a site of ``layout``: the standard :class:`SqueezeExcite` for ``nchw``."""
    if layout == "nchw":
        return SqueezeExcite(channels, width, **kwargs)
    return ChannelsLastSqueezeExcite(channels, width, prefix=prefix, **kwargs)
