"""The Squeeze-and-Excitation block.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507

The parameter layout is timm's ``SEModule`` (``fc1`` and ``fc2`` as 1x1 convolutions), so the state
dict of a block interchanges with timm's native SE models (``seresnet50``...). Squeeze and gate are
looked up by name in the registries below; the gate modules come from timm's activation factory.

Function-preserving start (``init="preserve"``): the excitation is made input-independent, and the
block divides the gate by that constant value, ``gate_origin``, so it starts as an exact identity
(bitwise, for the sigmoid, hard sigmoid and relu gates):

* with biases: ``fc1`` weights are zero and its biases one, so every hidden unit is the constant
  ``act(1)``; ``fc2`` keeps random weights and its bias is chosen so the gate sees the constant
  ``preserve_bias``. Every parameter, ``fc1`` included, receives a gradient from the first step.
* without biases: ``fc2`` weights are zero, so the gate sees 0 (only for gates non-zero at 0).

``gate_origin`` is part of the architecture the recipe describes (like the gate), not a learned
parameter: it is 1 (no division) for ``init="paper"``, which is what timm's SE models compute.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from timm.layers import SelectAdaptivePool2d, SEModule, create_act_layer, make_divisible, register_notrace_module
from torch import nn


@dataclass(frozen=True)
class GateSpec:
    """A gate of the registry: where the preserving init holds its input, and its value at 0."""

    preserve_bias: float  # the gate's constant input under init="preserve" (with biases)
    at_zero: float  # gate(0): the constant it gives when the block has no biases


# gate name -> spec; the module itself comes from timm's activation factory (create_act_layer).
# Preserve points sit where the gate is steep, so gradients flow, and are exact binary fractions,
# so the constant the gate sees is exact: sigmoid/hard_sigmoid at 0 (gate 0.5), tanh at 0.5
# (tanh(0) = 0 would silence the block), relu at 1 (gate 1: nothing to divide out).
GATES: dict[str, GateSpec] = {
    "sigmoid": GateSpec(preserve_bias=0.0, at_zero=0.5),
    "hard_sigmoid": GateSpec(preserve_bias=0.0, at_zero=0.5),
    "tanh": GateSpec(preserve_bias=0.5, at_zero=0.0),
    "relu": GateSpec(preserve_bias=1.0, at_zero=0.0),
}

# squeeze name -> timm SelectAdaptivePool2d pool type
SQUEEZES: dict[str, str] = {"avg": "avg", "max": "max"}


def _uninitialised_conv1x1(cin: int, cout: int, bias: bool, device, dtype) -> nn.Conv2d:
    """A 1x1 convolution whose parameters are allocated but not initialised: the block initialises
    them once (a model gets dozens of blocks, and random numbers are most of their cost). Built on
    meta and given empty tensors: measured 2.7x faster here than ``torch.nn.utils.skip_init``."""
    conv = nn.Conv2d(cin, cout, kernel_size=1, bias=bias, device="meta")
    conv.weight = nn.Parameter(torch.empty(conv.weight.shape, device=device, dtype=dtype))
    if bias:
        conv.bias = nn.Parameter(torch.empty(cout, device=device, dtype=dtype))
    return conv


def timm_width(
    channels: int, width: int | None, rd_ratio: float | None, rd_channels: int | None, rd_divisor: int | None
) -> int:
    """The block's width: ``width``, or timm's ``SEModule`` rule on its arguments (``rd_channels`` if given
    and non-zero, else ``make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)`` with timm's
    defaults, 1/16 and 8), by timm's own ``make_divisible``."""
    timm_args = {
        k: v
        for k, v in (("rd_ratio", rd_ratio), ("rd_channels", rd_channels), ("rd_divisor", rd_divisor))
        if v is not None
    }
    if width is not None:
        if timm_args:
            raise TypeError(f"SqueezeExcite: give width or timm's {', '.join(timm_args)}, not both")
        return width
    if rd_channels:
        return rd_channels
    timm_defaults = inspect.signature(SEModule).parameters  # timm's defaults, read from timm (1/16 and 8)
    ratio = timm_defaults["rd_ratio"].default if rd_ratio is None else rd_ratio
    divisor = timm_defaults["rd_divisor"].default if rd_divisor is None else rd_divisor
    return make_divisible(channels * ratio, divisor, round_limit=0.0)


@register_notrace_module  # a leaf for timm's and retrofit's fx tracers: the block is one node
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation: ``x * gate(fc2(act(fc1(squeeze(x))))) / gate_origin``.

    Args:
        channels: channels of the feature map it scales.
        width: reduced width (``channels / r`` after rounding; a recipe's blocks get it from
            :mod:`retrofit.blocks.config`). Or, as timm's ``SEModule`` takes it: ``rd_channels`` (the width),
            else ``rd_ratio`` (default 1/16) rounded to a multiple of ``rd_divisor`` (default 8) by timm's
            ``make_divisible``; so ``SqueezeExcite(C, rd_ratio=1/4)`` has ``SEModule(C, rd_ratio=1/4)``'s width
            and state dict. ``width`` with one of them is an error: two widths.
        squeeze: ``avg`` or ``max`` global pooling.
        gate: name of the gate activation (see ``GATES``).
        bias: biases on ``fc1`` and ``fc2``.
        init: ``preserve`` (start as the identity) or ``paper`` (PyTorch's default init).
    """

    def __init__(
        self,
        channels: int,
        width: int | None = None,
        *,
        rd_ratio: float | None = None,
        rd_channels: int | None = None,
        rd_divisor: int | None = None,
        squeeze: str = "avg",
        gate: str = "sigmoid",
        bias: bool = True,
        init: str = "paper",
        act_layer: type[nn.Module] = nn.ReLU,
        device=None,
        dtype=None,
    ):
        super().__init__()
        width = timm_width(channels, width, rd_ratio, rd_channels, rd_divisor)
        dd = {"device": torch.get_default_device() if device is None else device, "dtype": dtype}
        self.channels, self.width = channels, width
        self.squeeze_type, self.gate_type = squeeze, gate
        self.pool = SelectAdaptivePool2d(1, pool_type=SQUEEZES[squeeze], flatten=False)
        self.fc1 = _uninitialised_conv1x1(channels, width, bias, **dd)
        self.act = act_layer(inplace=True)
        self.fc2 = _uninitialised_conv1x1(width, channels, bias, **dd)
        self.gate = create_act_layer(gate)
        self.gate_origin = 1.0
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "paper") -> None:
        """``paper``: PyTorch's default init of both convolutions; ``preserve``: start as identity."""
        if init == "preserve":
            self.init_preserving()
        else:
            self.fc1.reset_parameters()
            self.fc2.reset_parameters()
            self.gate_origin = 1.0

    # Called as ``block(x, shortcut)`` it returns ``x * s + shortcut``: surgery fuses a standard-position
    # block with the residual sum it feeds, and retrofit's tracer reads the call back as block + sum.
    fuses_residual_sum = True

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        if self.gate_origin != 1.0:
            s = s / self.gate_origin  # on the (N, C, 1, 1) excitation: free next to the pass over x
        if shortcut is not None:
            # one pass over the activations instead of two (scale, then add); a fused multiply-add,
            # so it rounds once where x * s + shortcut rounds twice (exact when s == 1: preserve init)
            return torch.addcmul(shortcut, x, s)
        return x * s

    @torch.no_grad()
    def init_preserving(self) -> None:
        """Make the block an exact identity that still learns (see the module docstring)."""
        if self.fc1.bias is not None:
            self.fc2.reset_parameters()  # fc2 stays random, so fc1 gets gradients from the first step
            # Multiples of 2^-12: every partial sum of a row is then exact (float32 and up), so
            # fc2(ones) == bias + row sum holds bitwise in whatever order the convolution adds.
            self.fc2.weight.mul_(4096).round_().div_(4096)  # in place: no temporaries to page in
            nn.init.zeros_(self.fc1.weight)
            nn.init.ones_(self.fc1.bias)
            hidden = float(self.act(torch.ones((), device="cpu")))  # cpu: a meta-device build has no values
            z = GATES[self.gate_type].preserve_bias
            self.fc2.bias.copy_(z - hidden * self.fc2.weight.sum(dim=(1, 2, 3)))
        else:
            self.fc1.reset_parameters()
            nn.init.zeros_(self.fc2.weight)
            z = 0.0
        # the same gate on the same constant: s / gate_origin is then exactly 1 (float32); computed on
        # the cpu, so a block built under `with torch.device("meta")` gets the same constant
        self.gate_origin = float(self.gate(torch.tensor(z, dtype=torch.float32, device="cpu")))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, width={self.width}, squeeze={self.squeeze_type}, "
            f"gate={self.gate_type}, gate_origin={self.gate_origin:g}"
        )
