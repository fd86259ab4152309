"""One block's configuration: the recipe fields that shape an inserted block, their checks, its width.

:class:`BlockConfig` owns the block fields (``r``, ``squeeze``, ``gate``, ``divisor``, ``min_width``,
``bias``, ``init``, ``module``, ``allow_wide``): their defaults, one validator each (``CHECKS``), the
rules that tie them together (a module refuses a changed field it does not read; the preserving init
needs a gate it can preserve; r below 1 needs allow_wide), the bounds that keep a block from being
absurdly wide, and the reduced width. :mod:`retrofit.blocks.attention` builds a block from one;
:class:`retrofit.surgery.recipe.Recipe` carries the same fields as keys and resolves one :class:`BlockConfig`
per site. A new block option is a field and its check here, the builders that read it, and its
line in :class:`~retrofit.surgery.recipe.Recipe` (which takes the default from here; a test keeps the two in
step).

    >>> BlockConfig(r=8).width(256)
    32
    >>> BlockConfig(module="eca", r=8)   # ECA has no reduction: refused, not ignored
    Traceback (most recent call last):
    retrofit.errors.RecipeError: recipe field 'r' does not apply to module 'eca' (it reads gate); ...
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from timm.layers import make_divisible

from ..errors import RecipeError, excerpt
from .attention import ATTENTIONS, preserve_needs_gate, zero_gate_gates
from .help import BLOCK_HELP, MAX_EXPANSION, MAX_ROUNDING
from .se import GATES, SQUEEZES

INITS = ("preserve", "paper")


# -- validators: one value of one field; the message names the field and the allowed values ------------
def choice(name: str, allowed: Callable[[], Any]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        options = list(allowed())
        if not isinstance(value, str) or value.lower() not in options:
            raise RecipeError(f"recipe field '{name}': unknown value {excerpt(value)}; allowed: {', '.join(options)}")
        return value.lower()

    return check


def number(value: Any) -> float | None:
    """A real number from a number or its text; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def ratio(value: Any) -> float:
    r = number(value)
    if r is None or not math.isfinite(r) or r <= 0:
        raise RecipeError(f"recipe field 'r': the reduction ratio must be a positive number, got {excerpt(value)}")
    if r < 1 / MAX_EXPANSION:
        raise RecipeError(
            f"recipe field 'r': {excerpt(value)} would make each block {1 / r:.3g} times wider than its "
            f"input; r must be at least 1/{MAX_EXPANSION} = {1 / MAX_EXPANSION:g}, and at least 1 "
            f"unless allow_wide is true"
        )
    return int(r) if r.is_integer() else r


def positive_int(name: str, at_most: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        n = number(value)
        if n is None or not n.is_integer() or n < 1:
            raise RecipeError(f"recipe field '{name}': must be a whole number >= 1, got {excerpt(value)}")
        if at_most is not None and n > at_most:
            raise RecipeError(f"recipe field '{name}': at most {at_most}, got {excerpt(value)}")
        return int(n)

    return check


def boolean(name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise RecipeError(f"recipe field '{name}': expected true or false, got {excerpt(value)}")

    return check


def described(default: Any, help: str, example: str = "") -> Any:
    """A field with its help (``metadata["help"]``: the one text a recipe field's docs, ``add-se --help``, the
    YAML reference and the docstrings show) and, for a block field, an ``example`` of its per-stage form."""
    return field(default=default, metadata={"help": help, "example": example})


@dataclass(frozen=True)
class BlockConfig:
    """How one block is built. Each field's help is its ``metadata["help"]`` (``fields(BlockConfig)``; listed
    in ``docs/reference/options.md``). A module reads only some of the fields (ECA: ``gate``); a non-default value of
    a field it does not read is an error."""

    r: float = described(16, *BLOCK_HELP["r"])
    squeeze: str = described("avg", *BLOCK_HELP["squeeze"])
    gate: str = described("sigmoid", *BLOCK_HELP["gate"])
    divisor: int = described(1, *BLOCK_HELP["divisor"])
    min_width: int = described(1, *BLOCK_HELP["min_width"])
    bias: bool = described(True, *BLOCK_HELP["bias"])
    init: str = described("preserve", *BLOCK_HELP["init"])
    module: str = described("se", *BLOCK_HELP["module"])
    allow_wide: bool = described(False, *BLOCK_HELP["allow_wide"])

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, CHECKS[f.name](getattr(self, f.name)))
        unread = self.unread()
        if unread:
            name = unread[0]
            raise RecipeError(
                f"recipe field '{name}' does not apply to module '{self.module}' (it reads "
                f"{', '.join(ATTENTIONS[self.module].fields) or 'no block field'}); leave it at "
                f"its default ({str(DEFAULTS[name]).lower()}) or use module se"
            )
        if self.r < 1 and not self.allow_wide and self.reads("r"):
            raise RecipeError(
                f"recipe field 'r': {self.r:g} makes every block wider than its input (C / r > C); "
                f"use r >= 1, or allow_wide: true (--allow-wide) if that is what you mean"
            )
        if self.init == "preserve" and preserve_needs_gate(self.module) and self.gate in zero_gate_gates():
            raise RecipeError(
                f"recipe fields 'init', 'gate', 'module': init 'preserve' for module "
                f"'{self.module}' needs a gate that is non-zero at 0 (sigmoid, hard_sigmoid); "
                f"gate '{self.gate}' is 0 there. Use another gate or init: paper"
            )
        if self.init == "preserve" and not self.bias and GATES[self.gate].at_zero == 0:
            raise RecipeError(
                f"recipe fields 'init', 'bias', 'gate': init 'preserve' without biases needs a gate "
                f"that is non-zero at 0 ({', '.join(g for g, s in GATES.items() if s.at_zero)}); "
                f"gate '{self.gate}' is 0 there. Use bias: true, another gate, or init: paper"
            )

    def reads(self, name: str) -> bool:
        """Whether this block's module reads field ``name`` (every module reads ``module`` and ``init``)."""
        return name in ALWAYS_READ or name in ATTENTIONS[self.module].fields

    def unread(self) -> list[str]:
        """Fields changed from their defaults that the module does not read."""
        return [f for f in BLOCK_FIELDS if not self.reads(f) and getattr(self, f) != DEFAULTS[f]]

    def width(self, channels: int) -> int:
        """Reduced width of a block on ``channels`` channels (timm's ``make_divisible`` rounding)."""
        return make_divisible(channels / self.r, self.divisor, min_value=self.min_width, round_limit=0.0)

    def reduced_width(self, channels: int) -> int:
        """The block's reduced width on ``channels`` channels; 0 for a module without one (ECA)."""
        return self.width(channels) if self.reads("r") else 0


CHECKS: dict[str, Callable[[Any], Any]] = {
    "r": ratio,
    "squeeze": choice("squeeze", lambda: SQUEEZES),
    "gate": choice("gate", lambda: GATES),
    "divisor": positive_int("divisor", at_most=MAX_ROUNDING),
    "min_width": positive_int("min_width", at_most=MAX_ROUNDING),
    "bias": boolean("bias"),
    "init": choice("init", lambda: INITS),
    "module": choice("module", lambda: ATTENTIONS),
    "allow_wide": boolean("allow_wide"),
}
BLOCK_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BlockConfig))
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(BlockConfig)}
HELP: dict[str, Any] = {f.name: f.metadata for f in fields(BlockConfig)}  # help and per-stage example
ALWAYS_READ = ("module", "init")  # every module has a kind and an init; the others are in its spec
