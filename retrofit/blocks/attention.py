"""Attention modules the pass can insert, by name: SE (the default and the reference) and timm's others.

Every entry builds one block for a site with ``C`` channels from a :class:`retrofit.blocks.config.BlockConfig`
(the recipe's block fields resolved for that site). ``se`` is retrofit's
:class:`~retrofit.blocks.se.SqueezeExcite` (timm's ``SEModule`` layout, with the exact preserving init); the
others come from timm's attention factory (:func:`timm.layers.create_attn`), under the names timm
gives them, so their state dicts interchange with timm's own models that use them:

=====  ==============================================================================================
se     Squeeze-and-Excitation, Hu et al., CVPR 2018, https://arxiv.org/abs/1709.01507
ese    effective SE (one full-width 1x1 conv, no reduction), Lee & Park, CenterMask, CVPR 2020,
       https://arxiv.org/abs/1911.06667
eca    efficient channel attention (a 1-D conv across channels), Wang et al., CVPR 2020,
       https://arxiv.org/abs/1910.03151
ceca   ECA with circular padding (same paper)
cbam   channel then spatial attention, Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521
gc     global context block (attention pooling + a LayerNorm MLP), Cao et al., 2019,
       https://arxiv.org/abs/1904.11492
=====  ==============================================================================================

Block fields: each module reads only the fields it has a meaning for (``fields`` below: ``r``,
``divisor`` and ``min_width`` set the reduced width, ``gate`` the gate, ``bias`` the MLP's biases,
``squeeze`` the pooling; every module reads ``init``); :class:`~retrofit.blocks.config.BlockConfig` refuses a
non-default value of a field the module ignores.

``init: preserve`` for timm's modules: the layer that feeds each gate is zeroed, so every gate sees
0 whatever the input, and the gate is divided by its value there (``ScaledGate``, like
``SqueezeExcite.gate_origin``): with the sigmoid gate ``0.5 / 0.5 == 1`` exactly, so the block starts
as an exact identity. Only gates that are non-zero at 0 can do that (``sigmoid``, ``hard_sigmoid``);
the recipe refuses ``tanh``/``relu`` with ``preserve`` for these modules. Unlike SE's init, the
zeroed layer's inputs get no gradient on the first step (the zeroed layer itself does), as in
zero-init residual branches. ``init: paper`` keeps timm's own initialisation.

A new module is one registered function; ``cfg`` is the site's :class:`~retrofit.blocks.config.BlockConfig`::

    @register_attention("mine", fields=("r", "gate"), paper="...")
    def mine(channels, cfg, dd):
        return MyBlock(channels, cfg.width(channels), **dd)

This module knows nothing of recipes (:mod:`retrofit.blocks.config` imports it, not the other way round).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import create_attn
from torch import nn

from .se import GATES
from .se_layout import LAYOUTS, make_block

# the block fields that shape SE, which reads them all (init and module apply to every module);
# allow_wide goes with r: it lets r go below 1
SE_FIELDS = ("r", "squeeze", "gate", "divisor", "min_width", "bias", "allow_wide")


@dataclass(frozen=True)
class AttentionSpec:
    """A registered module: how to build it, which block fields it reads, how it starts as identity."""

    name: str
    build: Callable[[int, Any, dict], nn.Module]  # (channels, BlockConfig, dd) -> block
    fields: tuple[str, ...]
    preserve: Callable[[nn.Module], None] | None  # zero what feeds the gates; None: handled by build
    paper: str
    fuses_residual_sum: bool = False  # forward(x, shortcut) computes x * s + shortcut in one pass
    layouts: tuple[str, ...] = ("nchw",)  # feature layouts it can take (retrofit.blocks.se_layout.LAYOUTS)
    # a channel gate (output = x * s, one s per image and channel): the attributes holding the linear
    # maps its excitation s is computed by, in order (retrofit.blocks.excitation); () for any other block
    excitation: tuple[str, ...] = ()
    not_a_gate: str = "it is not registered as a channel gate (register_attention(..., excitation=...))"


#: The blocks by name (``se``, ``ese``, ``eca``, ``ceca``, ``cbam``, ``gc`` and any added with
#: :func:`register_attention`): how each is built, the recipe fields it reads, how it starts as identity.
ATTENTIONS: dict[str, AttentionSpec] = {}
# how the tables and messages name each built-in block (a block registered later: by its own name)
DISPLAY_NAMES = {"se": "SE", "ese": "eSE", "eca": "ECA", "ceca": "circular ECA", "cbam": "CBAM", "gc": "GC"}


def register_attention(
    name: str,
    *,
    fields: tuple[str, ...],
    paper: str,
    preserve: Callable[[nn.Module], None] | None = None,
    fuses_residual_sum: bool = False,
    layouts: tuple[str, ...] = ("nchw",),
    excitation: tuple[str, ...] = (),
    not_a_gate: str = "",
):
    """Register ``build(channels, cfg, dd) -> nn.Module`` under ``name`` (``cfg``: a
    :class:`~retrofit.blocks.config.BlockConfig`; ``dd``: device, dtype). ``fields``: the block fields it reads.

    ``fuses_residual_sum``: the block's ``forward(x, shortcut)`` returns ``x * s + shortcut``, so the
    standard position may hand it the residual sum it feeds (see :func:`retrofit.surgery.prepare.prepare`).
    ``layouts``: besides ``nchw`` maps, ``nhwc``/``tokens``; ``build`` then gets ``layout`` and
    ``prefix`` in ``dd`` too.
    ``excitation``: for a channel gate (its output is its input times one excitation per image and
    channel, computed from the input by the linear maps named here, in order, then a gate), those
    maps' attribute names: ``retrofit inspect`` reads its excitations and ``retrofit fold`` replaces it by
    a constant scale. ``not_a_gate``: for any other block, why it is neither (one clause).
    """

    def register(fn):
        why = not_a_gate or AttentionSpec.not_a_gate
        ATTENTIONS[name] = AttentionSpec(
            name, fn, fields, preserve, paper, fuses_residual_sum, layouts, tuple(excitation), "" if excitation else why
        )
        return fn

    return register


class ScaledGate(nn.Module):
    """``gate(x) / gate(0)``: a gate that gives exactly 1 where the preserving init holds its input.

    ``origin`` is a constant of the architecture (like ``SqueezeExcite.gate_origin``), not a
    parameter: it is not in the state dict, so the block's keys stay timm's.
    """

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate
        self.origin = float(gate(torch.zeros((), dtype=torch.float32, device="cpu")))  # cpu: also for meta builds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) / self.origin

    def extra_repr(self) -> str:
        return f"origin={self.origin:g}"


def build_attention(cfg, channels: int, *, layout: str = "nchw", prefix: int = 0, device=None, dtype=None) -> nn.Module:
    """The block ``cfg.module`` (``cfg``: a :class:`~retrofit.blocks.config.BlockConfig`) for a site with
    ``channels`` channels, initialised by ``cfg.init``; ``layout``/``prefix``: the site's feature
    layout (see :mod:`retrofit.blocks.se_layout`).

    Every block gets ``channels`` and ``width`` attributes (the reduced width, 0 without one) for
    the reports.
    """
    spec = ATTENTIONS[cfg.module]
    if layout not in spec.layouts:
        raise ValueError(f"module {cfg.module} works on {'/'.join(spec.layouts)} maps, not {layout}")
    dd = {"device": device, "dtype": dtype}
    if spec.layouts != ("nchw",):
        dd.update(layout=layout, prefix=prefix)
    block = spec.build(channels, cfg, dd)
    if cfg.init == "preserve" and spec.preserve is not None:
        with torch.no_grad():
            spec.preserve(block)
        for parent in list(block.modules()):
            gate = getattr(parent, "gate", None)
            if isinstance(gate, nn.Module) and not isinstance(gate, ScaledGate):
                parent.gate = ScaledGate(gate)
    block.channels = channels
    if not isinstance(getattr(block, "width", None), int):
        block.width = _width(block)
    return block


def _width(block: nn.Module) -> int:
    fc1 = (
        getattr(block, "fc1", None)
        or getattr(getattr(block, "channel", None), "fc1", None)
        or getattr(getattr(block, "mlp_scale", None), "fc1", None)
    )
    return fc1.out_channels if isinstance(fc1, nn.Conv2d) else 0


def preserve_needs_gate(name: str) -> bool:
    """Whether ``init: preserve`` for module ``name`` relies on its gate being non-zero at 0."""
    spec = ATTENTIONS[name]
    return spec.preserve is not None and "gate" in spec.fields


def zero_gate_gates() -> tuple[str, ...]:
    return tuple(g for g, s in GATES.items() if s.at_zero == 0)


def _zero(*layers: nn.Module | None) -> None:
    for layer in layers:
        if layer is None:
            continue
        nn.init.zeros_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)


# -- the registry -----------------------------------------------------------------------------------
@register_attention(
    "se",
    fields=SE_FIELDS,
    paper="https://arxiv.org/abs/1709.01507",
    fuses_residual_sum=True,
    layouts=LAYOUTS,
    excitation=("fc1", "fc2"),
)
def se(channels, cfg, dd):
    return make_block(
        dd.pop("layout"),
        channels,
        cfg.width(channels),
        prefix=dd.pop("prefix"),
        squeeze=cfg.squeeze,
        gate=cfg.gate,
        bias=cfg.bias,
        init=cfg.init,
        **dd,
    )


@register_attention(
    "ese",
    fields=("gate",),
    paper="https://arxiv.org/abs/1911.06667",
    preserve=lambda b: _zero(b.fc),
    excitation=("fc",),
)
def ese(channels, cfg, dd):
    return create_attn("ese", channels, gate_layer=cfg.gate, **dd)


@register_attention(
    "eca",
    fields=("gate",),
    paper="https://arxiv.org/abs/1910.03151",
    preserve=lambda b: _zero(b.conv2 if b.conv2 is not None else b.conv),
    excitation=("conv", "conv2"),
)
def eca(channels, cfg, dd):
    return create_attn("eca", channels, gate_layer=cfg.gate, **dd)


@register_attention(
    "ceca",
    fields=("gate",),
    paper="https://arxiv.org/abs/1910.03151",
    preserve=lambda b: _zero(b.conv),
    excitation=("conv",),
)
def ceca(channels, cfg, dd):
    return create_attn("ceca", channels, gate_layer=cfg.gate, **dd)


# CBAM's spatial conv is followed by a fresh BatchNorm, which maps the zeroed conv's 0 to 0 in both
# modes (running mean 0; a batch of zeros has mean 0)
@register_attention(
    "cbam",
    fields=("r", "gate", "divisor", "min_width", "bias", "allow_wide"),
    paper="https://arxiv.org/abs/1807.06521",
    preserve=lambda b: _zero(b.channel.fc2, b.spatial.conv.conv),
    not_a_gate="its spatial gate scales every position of the map apart, not one scale per channel",
)
def cbam(channels, cfg, dd):
    return create_attn("cbam", channels, rd_channels=cfg.width(channels), gate_layer=cfg.gate, mlp_bias=cfg.bias, **dd)


@register_attention(
    "gc",
    fields=("r", "gate", "divisor", "min_width", "allow_wide"),
    paper="https://arxiv.org/abs/1904.11492",
    preserve=lambda b: _zero(b.mlp_scale.fc2),
    not_a_gate="it adds a transformed context vector to the map instead of scaling its channels",
)
def gc(channels, cfg, dd):
    return create_attn("gc", channels, rd_channels=cfg.width(channels), gate_layer=cfg.gate, **dd)
