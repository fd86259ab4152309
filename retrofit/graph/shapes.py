"""Shape propagation on meta tensors: every node learns its output shape at no compute or memory cost.

Like ``torch.fx.passes.shape_prop.ShapeProp``, an Interpreter subclass, but it runs on the ``meta``
device: parameters are swapped for meta twins per call, so even a model too large for this machine
propagates in milliseconds. Two deliberate departures from running every op:

* layers that never change their input's shape (norms, activations, dropout, identity) pass their
  input through: on meta tensors batch norm runs a Python decomposition (~2 ms a call, most of the
  time of a ResNet pass) for a shape that is known beforehand;
* a node that meta tensors cannot run (code that makes CPU tensors inside, ``.item()``...) is
  retried under ``torch``'s ``FakeTensorMode``, slower but more general;
* a node fake tensors cannot run either (data-dependent control flow in an opaque leaf module, see
  :func:`retrofit.graph.trace.trace`) is run once for real on random CPU inputs of the same shapes: it
  costs that node's compute, and is the last resort before giving up.

:func:`count_macs` runs the same pass under ``torch.utils.flop_counter.FlopCounterMode`` and stores
each node's multiply-adds (the counter's FLOPs / 2: it counts one multiply-add as two FLOPs).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_aggregate
from torch.utils.flop_counter import FlopCounterMode

from ..errors import RetrofitError, first_line
from .trace import Traced

# Activation layers (retrofit.graph.nodes.is_activation); each keeps its input's shape
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardtanh,
)
# Layers whose output has their input's shape (subclasses included: timm's BatchNormAct2d...).
SHAPE_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    *ACTIVATIONS,
    nn.Softsign,
    nn.Tanhshrink,
)

CALLS = ("call_module", "call_function", "call_method")  # the node kinds that compute something


def twin(module: nn.Module, meta: bool = True) -> nn.Module:
    """A shallow copy of ``module`` and its children to run instead of it: with parameters and buffers
    on meta (``meta=True``), and with its own copies of dict/list/set attributes, so that caches a
    forward fills (timm's attention-bias caches, say) are filled in the copy, not in the model."""
    copied = copy.copy(module)
    copied.__dict__ = {k: copy.copy(v) if type(v) in (dict, list, set) else v for k, v in module.__dict__.items()}
    if meta:
        copied._parameters = {
            k: None if p is None else nn.Parameter(p.detach().to("meta"), p.requires_grad)
            for k, p in module._parameters.items()
        }
        copied._buffers = {k: None if b is None else b.to("meta") for k, b in module._buffers.items()}
    copied._modules = {k: None if c is None else twin(c, meta) for k, c in module._modules.items()}
    return copied


def _upsampled(module: nn.Upsample, sides) -> tuple[int, int] | None:
    if module.size is not None:
        size = module.size if isinstance(module.size, (tuple, list)) else (module.size,) * 2
        return tuple(int(s) for s in size) if len(size) == 2 else None
    scale = module.scale_factor
    scale = scale if isinstance(scale, (tuple, list)) else (scale,) * 2
    if len(scale) != 2:
        return None
    return tuple(math.floor(float(s) * float(f)) for s, f in zip(sides, scale))


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if value is None:
        return None
    return map_aggregate(value, lambda v: _to_meta(v) if isinstance(v, torch.Tensor) else v)


class MetaShapeProp(fx.Interpreter):
    """Runs an analysis graph of ``model`` on meta tensors; stores outputs in ``node.meta["val"]``.

    ``constants`` holds the values fx made attributes of the traced root (see ``Traced.constants``).
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, constants: dict | None = None):
        super().__init__(model, garbage_collect_values=True, graph=graph)
        self.constants = constants or {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception:
            self.retrying(n)
            out = self._run_fake(n)
        n.meta["val"] = out
        return out

    def retrying(self, n: fx.Node) -> None:
        """Called before each new attempt at ``n`` (fake tensors, then real ones) after one failed."""

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, SHAPE_PRESERVING) and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and len(args) == 1 and not kwargs:
            # the layers most models are made of: their own forward on meta weights, no twin needed
            return module._conv_forward(args[0], _to_meta(module.weight), _to_meta(module.bias))
        if type(module) is nn.Upsample and len(args) == 1 and not kwargs and args[0].dim() == 4:
            # on meta, interpolate runs a Python decomposition (most of HRNet's scan); its output
            # size is F.interpolate's own rule: the given size, or floor(side * scale_factor)
            size = _upsampled(module, args[0].shape[2:])
            if size is not None:
                return args[0].new_empty((*args[0].shape[:2], *size))
        if type(module) is nn.Linear and len(args) == 1 and not kwargs:
            return torch.nn.functional.linear(args[0], _to_meta(module.weight), _to_meta(module.bias))
        return twin(module)(*args, **kwargs)

    def get_attr(self, target, args, kwargs):
        if target in self.constants:
            return _to_meta(self.constants[target])
        return _to_meta(super().get_attr(target, args, kwargs))

    def _run_fake(self, n: fx.Node) -> Any:
        """Retry one node under FakeTensorMode, with the real module and CPU-shaped inputs."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)  # a failure here is reported below, in one line
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:

                def fake(v):
                    if isinstance(v, torch.Tensor) and v.device.type == "meta":
                        # empty CPU memory is never touched: from_tensor reads only the metadata
                        return mode.from_tensor(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype))
                    return v

                args, kwargs = map_aggregate(args, fake), map_aggregate(kwargs, fake)
                out = self._call(n, args, kwargs) if n.op in CALLS else super().run_node(n)
        except Exception as err:
            try:
                self.retrying(n)
                return self._run_real(n)
            except Exception:
                pass
            reason = first_line(err)
            raise RetrofitError(
                f"cannot work out the shapes at {n.name} ({n.format_node()[:80]}): {reason}; "
                f"check the input size (--input-size) the model expects"
            ) from err
        finally:
            fake_log.setLevel(level)
        return _to_meta(out)

    def _run_real(self, n: fx.Node) -> Any:
        """Run one node for real, on random CPU tensors shaped like its (meta) inputs."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        g = torch.Generator().manual_seed(0)

        def real(v):
            if isinstance(v, torch.Tensor) and v.device.type == "meta":
                if v.is_floating_point():
                    return torch.randn(v.shape, generator=g, dtype=v.dtype)
                return torch.zeros(v.shape, dtype=v.dtype)
            return v

        args, kwargs = map_aggregate(args, real), map_aggregate(kwargs, real)
        if n.op not in CALLS:
            raise RetrofitError(f"cannot run {n.op} nodes for real")
        with torch.no_grad():
            return _to_meta(self._call(n, args, kwargs))

    def _call(self, n: fx.Node, args, kwargs) -> Any:
        """Run a call node on the given (fake or real) values; a module runs as a real-tensor twin."""
        if n.op == "call_module":
            return twin(self.fetch_attr(n.target), meta=False)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], n.target)(*args[1:], **kwargs)  # call_method


def propagate_shapes(traced: Traced, batch: int = 1) -> None:
    """Give every node of ``traced.graph`` its output (a meta tensor) in ``node.meta["val"]``."""
    MetaShapeProp(traced.model, traced.graph, traced.constants).run(*_meta_inputs(traced, batch))


def count_macs(traced: Traced, batch: int = 1) -> int:
    """Propagate shapes and store each node's multiply-adds in ``node.meta["macs"]``; return the total."""
    counter = FlopCounterMode(display=False)

    class Counting(MetaShapeProp):
        """Each node's multiply-adds: those of its last attempt (a failed one may have run convs)."""

        wasted = 0

        def run_node(self, n):
            self.start = before = counter.get_total_flops()
            out = super().run_node(n)
            n.meta["macs"] = (counter.get_total_flops() - self.start) // 2
            self.wasted += self.start - before
            return out

        def retrying(self, n):
            self.start = counter.get_total_flops()

    with counter:
        counting = Counting(traced.model, traced.graph, traced.constants)
        counting.run(*_meta_inputs(traced, batch))
    return (counter.get_total_flops() - counting.wasted) // 2 - _counted_twice(traced)


def _counted_twice(traced: Traced) -> int:
    """A kept module inside a traced forward is one node there, run whole, and the modules it calls
    are traced again as sub-roots (retrofit.graph.opaque): the node keeps only its own forward's share."""
    twice = 0
    for call in traced.calls():
        if call.kept is not None and call.node is not None:
            inner = sum(n.meta.get("macs", 0) for sub in call.children() for n in _nodes_of(sub))
            share = min(inner, call.node.meta.get("macs", 0))
            call.node.meta["macs"] = call.node.meta.get("macs", 0) - share
            twice += share
    return twice


def _nodes_of(call) -> list[fx.Node]:
    return [call.node] if call.leaf and call.node is not None else list(call.nodes())


def _meta_inputs(traced: Traced, batch: int) -> list:
    """What the graph's placeholders are fed: the image for the model's own input, and for the inputs
    of the parts a kept forward calls, meta tensors shaped like what they received (retrofit.graph.opaque)."""
    dtype = next((p.dtype for p in traced.model.parameters() if p.is_floating_point()), torch.float32)
    image = torch.empty((batch, *traced.input_size), dtype=dtype, device="meta")
    holders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if not any("example" in n.meta for n in holders):
        return [image]
    values = []
    for n in holders:
        if "example" in n.meta:
            values.append(n.meta["example"])
        else:  # the model's own inputs: the image first, the others' defaults
            values.append(image if not values else (n.args[0] if n.args else None))
    return values
