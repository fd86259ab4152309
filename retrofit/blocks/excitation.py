"""The excitation of a channel gate: where to read it, when it is a constant, and that constant.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507, section "Role of Excitation".

A *channel gate* is a block whose output is its input times one excitation per image and channel,
``y = x * s(x)``, ``s = gate(maps(squeeze(x))) / origin``: retrofit's SE (:mod:`retrofit.blocks.se`, every
layout) and timm's eSE, ECA and circular ECA. Each registers the linear maps its excitation is computed
by (``AttentionSpec.excitation``); CBAM (a spatial gate too) and GC (it adds, it does not scale) are not
channel gates. Three facts about a gate, used by ``retrofit inspect`` and ``retrofit fold``:

* :func:`gate_of`: the module whose output is the raw gate value (the paper's excitation, in the
  gate's own range: (0, 1) for the sigmoid) and the constant ``origin`` the block divides it by (2 for
  the sigmoid under the preserving init, 1 otherwise), so the scale applied is ``raw / origin``;
* :func:`input_independent`: one of the maps has all-zero weights, so everything after it sees only
  biases and the excitation is the same for every input (the preserving init starts every block so);
* :func:`constant_scale`: that excitation, read off the block itself run on a map of ones (``y = 1 * s``),
  with the block's own arithmetic, so a constant scale of it reproduces the block bitwise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import excerpt
from .attention import ATTENTIONS, ScaledGate


def spec_problem(module_name: str) -> str | None:
    """Why blocks of the registered module ``module_name`` are not channel gates; None if they are."""
    spec = ATTENTIONS.get(module_name)
    if spec is None:
        return f"module {excerpt(module_name)} is not registered"
    return None if spec.excitation else spec.not_a_gate


def gate_of(block: nn.Module) -> tuple[nn.Module, float]:
    """``(module, origin)``: the module whose output is the raw gate value, and what the block divides
    it by (``SqueezeExcite.gate_origin``, a :class:`~retrofit.blocks.attention.ScaledGate`'s origin, else 1)."""
    gate = block.gate
    if isinstance(gate, ScaledGate):
        return gate.gate, gate.origin
    return gate, float(getattr(block, "gate_origin", 1.0))


def maps(block: nn.Module, module_name: str) -> list[nn.Module]:
    """The linear maps of ``block``'s excitation, in order (those the block has: ECA's ``conv2`` may be None)."""
    return [m for m in (getattr(block, name, None) for name in ATTENTIONS[module_name].excitation) if m is not None]


def input_independent(block: nn.Module, module_name: str) -> bool:
    """Whether ``block``'s excitation is the same for every input: one of its maps has all-zero weights
    (known from the weights alone, no data)."""
    return any(getattr(m, "weight", None) is not None and not bool(m.weight.any()) for m in maps(block, module_name))


def probe_shape(channels: int, layout: str = "nchw", prefix: int = 0) -> tuple[int, ...]:
    """The smallest input of a block on ``channels`` channels of ``layout``: one position (and the
    ``prefix`` tokens before it)."""
    return {"nchw": (1, channels, 1, 1), "nhwc": (1, 1, 1, channels)}.get(layout, (1, prefix + 1, channels))


@torch.no_grad()
def constant_scale(block: nn.Module, channels: int, layout: str = "nchw", prefix: int = 0) -> torch.Tensor:
    """The per-channel scale (``C`` values) an input-independent ``block`` multiplies every input by: its
    output on a map of ones (``1 * s == s`` exactly), in the block's dtype and device."""
    weight = next(block.parameters(), None)
    ones = torch.ones(
        probe_shape(channels, layout, prefix),
        dtype=weight.dtype if weight is not None else None,
        device=weight.device if weight is not None else None,
    )
    was = block.training
    block.eval()
    try:
        out = block(ones)
    finally:
        block.train(was)
    return out.reshape(-1, channels)[-1].clone()  # the last position: a token grid's, after the prefix
