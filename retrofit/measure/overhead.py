"""Measure the overhead of a retrofit against the original model.

Parameters are counted exactly (shared tensors once). Multiply-adds come from
``torch.utils.flop_counter`` run on meta tensors (see :mod:`retrofit.graph.shapes`): FLOPs / 2, i.e. the
convolutions and matrix products, as in the paper's "FLOPs". The two elementwise passes an SE block
adds over its feature map, the squeeze (global pooling) and the scale (multiplication), are not
multiply-adds; they are counted separately, C x H x W each, and labelled as such.

Blocks are found by comparing the two models: every module of the retrofitted model that the original
lacks (``layer1.0.se``...) is one block, so any pair of models can be compared, e.g. timm's
``resnet50`` against its ``seresnet50``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from ..blocks.attention import build_attention
from ..errors import RetrofitError
from ..graph import nodes as N
from ..graph.model import resolve_input_size
from ..graph.shapes import count_macs
from ..graph.trace import Traced, trace
from ..surgery.info import get_info

if TYPE_CHECKING:
    from ..blocks.config import BlockConfig
    from ..surgery.info import BlockInfo
    from ..surgery.recipe import Recipe


@dataclass(eq=False)
class ModelCost:
    """Parameters and multiply-adds of one model at one input size (batch 1)."""

    params: int
    macs: int
    traced: Traced
    modules: frozenset[str]


def cost(model: nn.Module, input_size: tuple[int, ...]) -> ModelCost:
    traced = trace(model, input_size)
    return traced_cost(traced, count_macs(traced))


def traced_cost(traced: Traced, macs: int) -> ModelCost:
    """The cost of a model already traced and counted (a scan with ``macs=True``): no second trace."""
    model = traced.model
    return ModelCost(count_params(model), macs, traced, frozenset(n for n, _ in model.named_modules()))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


@dataclass(frozen=True)
class BlockCost:
    """Cost of one inserted block at its site."""

    path: str
    site: str  # site kind (residual/inception/conv3x3), "" if unknown
    position: str
    stage: int
    stride: int
    channels: int
    width: int
    size: tuple[int, int]
    params: int
    macs: int
    pool_ops: int  # squeeze pass: one read-and-add per input element (tokens: per grid token's element)
    scale_ops: int  # scale pass: one multiplication per input element
    module: str = ""  # the block's kind (se, eca...), "" if unknown


@dataclass(frozen=True)
class StageCost:
    stage: int
    stride: int
    blocks: int
    params: int
    macs: int
    pool_ops: int
    scale_ops: int


@dataclass
class Overhead:
    """The overhead report: totals, per stage and per block. Percentages are of the base model."""

    input_size: tuple[int, ...]
    base_params: int
    base_macs: int
    params: int
    macs: int
    blocks: list[BlockCost] = field(default_factory=list)

    @property
    def added_params(self) -> int:
        return self.params - self.base_params

    @property
    def added_macs(self) -> int:
        return self.macs - self.base_macs

    @property
    def pool_ops(self) -> int:
        return sum(b.pool_ops for b in self.blocks)

    @property
    def scale_ops(self) -> int:
        return sum(b.scale_ops for b in self.blocks)

    def params_percent(self, n: int | None = None) -> float:
        return 100.0 * (self.added_params if n is None else n) / self.base_params if self.base_params else 0.0

    def macs_percent(self, n: int | None = None) -> float:
        return 100.0 * (self.added_macs if n is None else n) / self.base_macs if self.base_macs else 0.0

    def stages(self) -> list[StageCost]:
        out: dict[int, list[BlockCost]] = {}
        for b in self.blocks:
            out.setdefault(b.stage, []).append(b)
        return [
            StageCost(
                s,
                2**s,
                len(bs),
                sum(b.params for b in bs),
                sum(b.macs for b in bs),
                sum(b.pool_ops for b in bs),
                sum(b.scale_ops for b in bs),
            )
            for s, bs in sorted(out.items())
        ]

    def to_dict(self) -> dict[str, Any]:
        def pct(x):
            return round(x, 4)

        return {
            "input_size": list(self.input_size),
            "base": {"params": self.base_params, "macs": self.base_macs},
            "retrofitted": {"params": self.params, "macs": self.macs},
            "added": {
                "params": self.added_params,
                "params_percent": pct(self.params_percent()),
                "macs": self.added_macs,
                "macs_percent": pct(self.macs_percent()),
                "pool_ops": self.pool_ops,
                "scale_ops": self.scale_ops,
                "blocks": len(self.blocks),
            },
            "stages": [
                dict(
                    asdict(s),
                    params_percent=pct(self.params_percent(s.params)),
                    macs_percent=pct(self.macs_percent(s.macs)),
                )
                for s in self.stages()
            ],
            "blocks": [dict(asdict(b), size=list(b.size)) for b in self.blocks],
        }


def measure_overhead(model: nn.Module, se_model: nn.Module, input_size: tuple[int, ...] | None = None) -> Overhead:
    """Parameters and multiply-adds that ``se_model`` adds to ``model``, per block, stage and total.

    Args:
        model: the original network.
        se_model: the retrofitted one (from :func:`retrofit.add_se`, or any model that extends
            ``model`` with extra modules).
        input_size: ``(C, H, W)``; default: the model's own (timm's ``pretrained_cfg``, a detector's
            transform...), else ``(3, 224, 224)``.

    Example::

        >>> report = retrofit.measure_overhead(model, se_model, input_size=(3, 224, 224))
        >>> report.added_params, round(report.macs_percent(), 2)   # resnet50, r=16: timm's seresnet50 has as many
        (2530992, 0.06)
    """
    if se_model is model:
        raise RetrofitError(
            "measure_overhead needs the original and the retrofitted model, got the same "
            "object twice (add_se with inplace=True changes the original: keep a copy)"
        )
    size = resolve_input_size(model, input_size)
    return compare(cost(model, size), cost(se_model, size))


def compare(base: ModelCost, retro: ModelCost) -> Overhead:
    """The overhead of ``retro`` over ``base`` (both measured at the same input size)."""
    model = retro.traced.model
    info = get_info(model)
    sites = {b.path: b for b in info.blocks} if info is not None else {}
    new = [
        p
        for p in sorted(retro.modules - base.modules, key=_module_order(model))
        if p.rpartition(".")[0] in base.modules
    ]
    calls: dict[str, list] = {}
    for call in retro.traced.calls():
        calls.setdefault(call.path, []).append(call)
    height = retro.traced.image_size[0]
    blocks = [_block_cost(p, model.get_submodule(p), calls.get(p, []), sites.get(p), height) for p in new]
    return Overhead(retro.traced.input_size, base.params, base.macs, retro.params, retro.macs, blocks)


def _block_cost(path, module, calls, site, height) -> BlockCost:
    macs, shape_in, shape_out = 0, None, None
    for call in calls:
        if call.leaf:
            node_in = call.node.args[0] if call.node is not None and call.node.args else None
            node_out = call.node
            macs += call.node.meta.get("macs", 0) if call.node is not None else 0
        else:
            node_in = call.args[0].node if call.args and isinstance(call.args[0], fx.Proxy) else None
            node_out = call.result.node if isinstance(call.result, fx.Proxy) else None
            macs += sum(n.meta.get("macs", 0) for n in call.nodes())
        if shape_in is None and isinstance(node_in, fx.Node):
            shape_in, shape_out = N.shape(node_in), node_out is not None and N.shape(node_out)
    layout, prefix, grid = (site.layout, site.prefix, site.size) if site is not None else ("nchw", 0, (0, 0))
    c, (h, w), pool, scale = _geometry(shape_in, shape_out, layout, prefix, grid)
    if site is not None:
        stage, stride, kind, position = site.stage, site.stride, site.site_kind, site.position
        name = site.config.module
    else:  # not from add_se: stage from the block's own input
        stage = max(0, round(math.log2(height / h))) if h else 0
        stride, kind, position, name = 2**stage, "", "", ""
    params = sum(p.numel() for p in module.parameters())
    width = getattr(module, "width", None) or getattr(getattr(module, "fc1", None), "out_channels", 0)
    squeezes = getattr(module, "squeezes", True)  # a folded block's channel scale: no squeeze pass
    return BlockCost(
        path, kind, position, stage, stride, c, width, (h, w), params, macs, pool if squeezes else 0, scale, name
    )


def _geometry(shape_in, shape_out, layout: str, prefix: int, grid: tuple[int, int]):
    """Channels, (height, width), and the elements the squeeze reads and the scale multiplies, of a
    block whose input has ``shape_in`` (batch 1) in ``layout`` (:mod:`retrofit.blocks.se_layout`): a
    (1, C, H, W) or (1, H, W, C) map gives C, (H, W) and C·H·W for each pass; a (1, L, C) token sequence
    with ``prefix`` class or register tokens gives C, its patch ``grid``, (L - prefix)·C read by the
    squeeze (the grid tokens only) and L·C scaled. A block whose output is not its input's shape (no
    gate over its input) makes no passes."""
    if shape_in is None:
        return 0, (0, 0), 0, 0
    gating = shape_in == shape_out
    if layout == "tokens" and len(shape_in) == 3:
        n, length, c = shape_in
        return c, tuple(grid), n * (length - prefix) * c if gating else 0, n * length * c if gating else 0
    if len(shape_in) == 4:
        n, *sides = shape_in
        c, h, w = (sides[2], sides[0], sides[1]) if layout == "nhwc" else sides
        elements = math.prod(shape_in) if gating else 0
        return c, (h, w), elements, elements
    return 0, (0, 0), 0, 0


def _module_order(model: nn.Module):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda path: order.get(path, len(order))


# -- from a plan: no block built on real memory, no second trace -----------------------------------
def planned_overhead(base: ModelCost, blocks: Sequence[BlockInfo], recipe: Recipe | None = None) -> Overhead:
    """The overhead of inserting ``blocks`` (from :func:`retrofit.surgery.prepare.prepare`) into the model
    ``base`` measures, without re-tracing the retrofitted model: a block adds its own parameters and
    multiply-adds and changes nothing else, so each is measured alone, once per distinct block
    configuration and shape (:func:`block_cost`; each block carries its site's resolved config, so
    per-stage widths and modules are counted as built; ``recipe`` is not needed). ``tests/sweep/test_sweep.py``
    checks this against :func:`measure_overhead` on really retrofitted models.
    """
    costs = []
    for b in blocks:
        params, macs = block_cost(b.config, b.channels, b.size, b.layout, b.prefix)
        shape = _input_shape(b.channels, b.size, b.layout, b.prefix)  # the passes counted as for a built block
        _, _, pooled, scaled = _geometry(shape, shape, b.layout, b.prefix, b.size)
        costs.append(
            BlockCost(
                b.path,
                b.site_kind,
                b.position,
                b.stage,
                b.stride,
                b.channels,
                b.width,
                tuple(b.size),
                params,
                macs,
                pooled,
                scaled,
                b.config.module,
            )
        )
    return Overhead(
        base.traced.input_size,
        base.params,
        base.macs,
        base.params + sum(c.params for c in costs),
        base.macs + sum(c.macs for c in costs),
        costs,
    )


@functools.lru_cache(maxsize=4096)
def block_cost(cfg: BlockConfig, channels: int, size: tuple[int, int], layout: str, prefix: int) -> tuple[int, int]:
    """Parameters and multiply-adds (batch 1) of one block of ``cfg`` on a ``channels x size`` map
    (of ``layout``, with ``prefix`` tokens before a token grid): the block itself, built and run on
    the meta device under ``torch.utils.flop_counter``."""
    # the init decides values, not shapes; "paper" skips the preserving init's work on meta tensors
    block = build_attention(
        dataclasses.replace(cfg, init="paper"), channels, layout=layout, prefix=prefix, device="meta"
    )
    counter = FlopCounterMode(display=False)
    with counter:
        block(torch.empty(_input_shape(channels, size, layout, prefix), device="meta"))
    return count_params(block), counter.get_total_flops() // 2


def _input_shape(channels: int, size: tuple[int, int], layout: str, prefix: int) -> tuple[int, ...]:
    """The input (batch 1) of a block on a ``channels x size`` map of ``layout``: (1, C, H, W), (1, H, W, C),
    or (1, prefix + H·W, C) tokens."""
    return {"nchw": (1, channels, *size), "nhwc": (1, *size, channels)}.get(
        layout, (1, prefix + size[0] * size[1], channels)
    )
