"""Model EMA: an exponential moving average of the weights, evaluated as a row of its own.

timm's :class:`~timm.utils.ModelEmaV3` (parameters and buffers, one ``foreach`` lerp per optimizer
step), with its decay warm-up on (``1 - (1 + step) ** -2/3``, capped at ``decay``; timm's
``--model-ema-warmup``): a fine-tune of a few hundred steps would otherwise average mostly the
starting weights. Frozen parameters and the frozen statistics of phase 1 stay bitwise equal to the
live ones (``lerp(a, a, w) == a``). Its weights and step count go into ``train_state.pt``, so
``resume`` continues the same average.
"""

from __future__ import annotations

from typing import Any

from timm.utils import ModelEmaV3
from torch import nn

from ..files.tensors import with_metadata


class Ema:
    """The moving average of ``model`` and the number of updates so far."""

    def __init__(self, model: nn.Module, decay: float):
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and keys as the live one), in eval mode."""
        return self.ema.module

    def update(self, model: nn.Module) -> None:
        """After an optimizer step of ``model``."""
        self.steps += 1
        self.ema.update(model, step=self.steps)

    def state_dict(self) -> dict[str, Any]:
        state = {"module": self.ema.module.state_dict(), "steps": self.steps}
        rounding = getattr(self.ema, "_sr_generator", None)  # bf16 stochastic rounding (timm >= 1.0.20)
        if rounding is not None:
            state["rounding"] = rounding.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(with_metadata(state["module"], self.ema.module), strict=True)
        self.steps = int(state["steps"])
        rounding = getattr(self.ema, "_sr_generator", None)
        if rounding is not None and "rounding" in state:
            rounding.set_state(state["rounding"])
