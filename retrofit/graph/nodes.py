"""What a node of the analysis graph does: merge, convolution, pointwise layer, regularizer...

Small predicates the site analysis is written in. A node's module (for ``call_module`` nodes) comes
from the call tree recorded while tracing, so no name lookup is needed.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from timm.layers import get_attn
from torch import fx, nn

from ..blocks.se import SqueezeExcite
from .shapes import ACTIVATIONS, SHAPE_PRESERVING
from .trace import output_marker

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_WEIGHTED_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.linear,
    torch.conv2d,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.einsum,
    operator.matmul,
}
_ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.softplus,
    F.hardtanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_REGULARIZERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_REGULARIZER_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_UPSAMPLE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
_UPSAMPLE_MODULES = (nn.Upsample, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def module_of(node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls."""
    if node.op != "call_module":
        return None
    return node.meta["call"].module


def tensor(node: fx.Node) -> torch.Tensor | None:
    """The node's propagated output if it is a tensor."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def shape(node: fx.Node) -> tuple[int, ...] | None:
    t = tensor(node)
    return tuple(t.shape) if t is not None else None


def is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is output_marker


def add_operands(node: fx.Node) -> tuple | None:
    """The two operands of an addition of two nodes (``a + b``, ``torch.add``, ``a.add(b)``)."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if not is_add or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[:2]
    return (a, b) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None


def unmarked(node: fx.Node) -> fx.Node:
    """``node`` with the output markers of traced-through calls stepped over."""
    while is_marker(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def channel_slice_of(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` slices along its channels (``t[:, a:b]``, an NCHW map's dim 1), else None."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    source, index = node.args
    if not isinstance(source, fx.Node) or not isinstance(index, tuple) or len(index) < 2:
        return None
    whole = slice(None)
    if index[0] != whole or not isinstance(index[1], slice) or index[1].step not in (None, 1):
        return None
    return source if all(i == whole or i is Ellipsis for i in index[2:]) else None


def cat_operands(node: fx.Node) -> tuple[list, int] | None:
    """The tensors and dimension of a concatenation node."""
    if node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    return list(tensors), dim


def is_weighted(node: fx.Node) -> bool:
    """A layer that mixes channels or features with weights: convolution, linear, matmul."""
    module = module_of(node)
    if module is not None:
        return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)) or any(
            p.dim() > 1 for p in module.parameters()
        )
    return node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS


def is_conv3x3(node: fx.Node) -> bool:
    """A 2-d convolution with a 3x3 kernel (grouped and depthwise included)."""
    module = module_of(node)
    if module is not None:
        return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3)
    if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d) and len(node.args) > 1:
        weight = node.args[1]
        return isinstance(weight, fx.Node) and (shape(weight) or ())[-2:] == (3, 3)
    return False


def is_activation(node: fx.Node) -> bool:
    module = module_of(node)
    if module is not None:
        return isinstance(module, ACTIVATIONS) or type(module).__module__.startswith("timm.layers.activations")
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def is_regularizer_module(module: nn.Module) -> bool:
    """Dropout-like modules (and identities) that end a residual branch in timm: drop-path, dropout."""
    return isinstance(module, _REGULARIZERS) or type(module).__name__ in ("DropPath", "DropBlock2d")


def is_regularizer(node: fx.Node) -> bool:
    module = module_of(node)
    if module is not None:
        return is_regularizer_module(module)
    return node.op == "call_function" and node.target in _REGULARIZER_FUNCTIONS


def is_pointwise(node: fx.Node) -> bool:
    """Keeps its input's shape and mixes no channels: norms, activations, regularizers, markers."""
    if is_marker(node) or is_activation(node) or is_regularizer(node):
        return True
    module = module_of(node)
    return module is not None and isinstance(module, SHAPE_PRESERVING)


# timm's attention factory names whose modules rescale their input (sk and splat are convolutions)
EXCITATIONS = ("se", "ese", "eca", "ceca", "cbam", "lcbam", "gc", "ge", "coord")


@functools.cache
def excitation_classes() -> tuple[type, ...]:
    """Blocks that only rescale a feature map: retrofit's SE and timm's attention modules."""
    return (SqueezeExcite, *{get_attn(name) for name in EXCITATIONS})


def in_excitation(node: fx.Node) -> bool:
    """``node`` is an excitation block's node, or computed inside one (a traced-through timm SE)."""
    call = node.meta.get("call")
    while call is not None:
        if isinstance(call.module, excitation_classes()):
            return True
        call = call.parent
    return False


def is_upsample(node: fx.Node) -> bool:
    """A resize to a larger map (``F.interpolate``, ``nn.Upsample``, a transposed convolution) of a
    coarser one, markers stepped over: the top-down path of a feature pyramid, or a decoder's."""
    node = unmarked(node)
    resizes = (node.op == "call_function" and node.target in _UPSAMPLE_FUNCTIONS) or isinstance(
        module_of(node), _UPSAMPLE_MODULES
    )
    if not resizes or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = shape(node.args[0]), shape(node)
    return (
        before is not None
        and after is not None
        and len(before) == len(after) >= 3
        and all(b <= a for b, a in zip(before[2:], after[2:]))
        and before[2:] != after[2:]
    )
