"""Analysis without weights: build the model on the meta device when no real weights are needed.

Sites, shapes and the parameter and multiply-add counts need the model's structure, not its weights
(see :mod:`retrofit.graph.shapes`). Built under ``torch.device("meta")``, a model allocates no memory and
skips its weight initialisation, so ``retrofit add-se resnext101_32x32d`` (468 M parameters, 1.9 GB
in float32) reports in seconds on a laptop. Saving, loading a checkpoint, fine-tuning and timing
need real weights and build the model normally.

A model whose construction or shape pass needs real values (``.item()`` on a weight, a copy out of a
meta tensor, an operation whose output shape depends on the data) falls back to a real build, and so
does one with a module fx cannot trace that a forward on meta tensors cannot go into
(:mod:`retrofit.graph.opaque` records one real forward to trace its parts). Any other failure, a wrong
``--input-size`` above all, is the user's and is reported as it is, at once: a real build would fail
the same way, after spending the memory and time the meta build saves.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from timm.layers import PatchEmbed
from torch import nn

from ..errors import RetrofitError
from ..graph.model import model_name, resolve_input_size
from ..surgery.sites import Scan, scan

# what a meta tensor cannot do and a real one can: the only failures a real build may cure
NEEDS_REAL_VALUES = re.compile(
    r"meta|data[- ]dependent|DataDependent|DynamicOutputShape|_local_scalar_dense|"
    r"Cannot copy out",
    re.IGNORECASE,
)


def build_and_scan(build: Callable[[], nn.Module], input_size, meta: bool, macs: bool = True) -> tuple[nn.Module, Scan]:
    """``build()`` the model (on the meta device if ``meta``) and scan it at ``input_size`` (a size or
    ``None`` for the model's own; see :func:`retrofit.graph.model.resolve_input_size`). Falls back to a
    real build only when the meta one failed for want of real values (see the module doc); errors of
    the real build, and the meta build's other errors, are the user's."""
    if meta:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = build()
            found = _scan(net, input_size, macs)
            if not found.traced.needs_real_run:
                return net, found
        except Exception as err:  # noqa: BLE001 (sorted below)
            if not needs_real_values(err):
                raise
    net = build()
    return net, _scan(net, input_size, macs)


def _scan(net: nn.Module, input_size, macs: bool) -> Scan:
    size = resolve_input_size(net, input_size)
    check_fixed_size(net, size)
    return scan(net, size, macs=macs)


def needs_real_values(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is one a real build could avoid."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, NotImplementedError) or NEEDS_REAL_VALUES.search(f"{type(err).__name__}: {err}"):
            return True
        err = err.__cause__ or err.__context__
    return False


def check_fixed_size(model: nn.Module, size: tuple[int, ...]) -> None:
    """A timm patch embedding built for one image size (``strict_img_size``) takes that size only:
    say so, instead of the failed shape pass it would cause."""
    for m in model.modules():
        fixed = getattr(m, "img_size", None)
        if isinstance(m, PatchEmbed) and m.strict_img_size and fixed is not None and tuple(size[1:]) != tuple(fixed):
            asked = size[1] if size[1] == size[2] else (size[1], size[2])
            raise RetrofitError(
                f"{model_name(model)} takes {fixed[0]}x{fixed[1]} images only (timm builds its patch "
                "embedding "
                f"for one img_size), not {size[1]}x{size[2]}; give --input-size "
                f"{size[0]},{fixed[0]},{fixed[1]}, or build it with timm.create_model(..., "
                f"img_size={asked}) in Python"
            )


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
