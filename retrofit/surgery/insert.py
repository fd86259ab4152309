"""Insert SE blocks: plan the insertions a recipe asks for, then rewrite the modules that own them.

Surgery touches the smallest module whose forward holds an insertion's edges: that forward is rebuilt
at its own level (:mod:`retrofit.graph.rebuild`), the SE node is spliced in, and the result is installed on
the same instance (:mod:`retrofit.graph.forward`): the model keeps its class, methods and state-dict
keys. Sites that cannot be rewritten safely are skipped and reported with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import warnings
from typing import Any

from torch import fx, nn

from ..blocks.attention import build_attention
from ..errors import RetrofitWarning
from ..graph import nodes as N
from ..graph.forward import forward_state, install_forward, installed, restore_forward
from ..graph.model import architecture_of, resolve_input_size
from ..graph.rebuild import splice_blocks
from ..graph.specialise import specialisation
from .info import BlockInfo, RetrofitInfo, get_info, set_info
from .prepare import Rewrite, prepare
from .recipe import Recipe, resolve_recipe
from .sites import Scan, scan


def add_se(
    model: nn.Module,
    recipe: Recipe | str | dict | None = None,
    *,
    inplace: bool = False,
    input_size: tuple[int, ...] | None = None,
    **fields: Any,
) -> nn.Module:
    """Insert Squeeze-and-Excitation blocks into ``model`` following a recipe.

    Args:
        model: any ``nn.Module`` or ``torch.fx.GraphModule`` (a timm model, or your own).
        recipe: a :class:`~retrofit.Recipe`, a built-in recipe name (``"timm"``, ``"post"``...), a
            YAML path or a dict; default: ``Recipe()`` (standard position, r=16, preserving init).
        inplace: modify ``model`` itself instead of a deep copy.
        input_size: ``(C, H, W)`` used to trace shapes; default: the model's own
            (:func:`retrofit.graph.model.own_input_size`: timm's ``pretrained_cfg``, a torchvision
            detector's transform, a Hugging Face config), else ``(3, 224, 224)``.
        **fields: recipe fields overriding the recipe's (``position``, ``r``, ``gate``, ``stages``...;
            ``module="eca"`` inserts another block, ``only``/``skip``/``kinds`` choose the sites,
            ``at=["features.denseblock*"]`` puts blocks on the outputs of the modules named); a block
            field may be a per-stage map (``r={2: 8, 5: 32}``) and ``overrides`` set block fields by
            stage and module glob (see :class:`~retrofit.Recipe`).

    Returns:
        The retrofitted model: the same class as ``model``, every original state-dict key unchanged,
        plus one block per site (``<module>.se`` for the standard position).

    Raises:
        RetrofitError: a bad recipe, a position with no site in this model, a stage it does not have
            (in ``stages``, a per-stage map or an override), an ``only``/``skip``/override glob that
            matches no site, an ``at`` glob that names no module or a module whose output is not a
            feature map.

    Example::

        >>> model = timm.create_model("resnet50")
        >>> se_model = retrofit.add_se(model, position="inside", r=8, stages=[4])
        >>> se_model = retrofit.add_se(model, recipe="timm")   # timm's seresnet50 layout
        >>> eca_model = retrofit.add_se(model, module="eca", only=["layer3.*", "layer4.*"])
        >>> mixed = retrofit.add_se(model, r={2: 8, 3: 8, 4: 16, 5: 32},
        ...                         overrides=[{"only": ["layer4.2"], "module": "eca"}])
        >>> dense = retrofit.add_se(timm.create_model("densenet121"), at=["features.denseblock*"])
    """
    recipe = resolve_recipe(recipe, **fields)
    with paused_gc():
        found = scan(model, resolve_input_size(model, input_size))
        target = model if inplace else copy.deepcopy(model)
        retrofit_scanned(found, target, recipe)
    return target


@contextlib.contextmanager
def paused_gc():
    """Tracing makes many short-lived objects; on a process holding a large model each full
    collection they trigger walks the whole heap (seen: 0.2 s pauses in a 0.1 s resnet101 pass).
    Cycles made meanwhile are collected as usual once the pass is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def retrofit_scanned(found: Scan, target: nn.Module, recipe: Recipe) -> RetrofitInfo:
    """Insert the blocks of ``recipe`` into ``target`` (the scanned model or a copy of it)."""
    prepared = prepare(found, recipe)
    narrow: list[BlockInfo] = []
    blocks: list[BlockInfo] = []
    was_none: list[str] = []
    in_root = 0  # blocks in the root's own forward
    undo: list = []  # one rollback per rewrite installed: a failure (or Ctrl-C) halfway undoes them all
    try:
        for rewrite in prepared.rewrites:
            added = _install(rewrite, target, recipe, narrow, was_none, undo)
            blocks += added
            in_root += len(added) if not rewrite.owner.path else 0
    except BaseException:
        for rollback in reversed(undo):
            rollback()
        raise
    if in_root and not isinstance(target, fx.GraphModule):
        warnings.warn(
            RetrofitWarning(
                f"{in_root} block(s) went into the forward of the model itself ({type(target).__name__}): it runs "
                f"them, but fx tracers (torch.fx.symbolic_trace, torchvision's feature extraction) trace a root's "
                f"class forward and would leave them out; to trace it, retrofit a GraphModule: "
                f"retrofit.add_se(torch.fx.symbolic_trace(model))"
            ),
            stacklevel=3,
        )
    by_config: dict[tuple, list[int]] = {}
    for b in narrow:
        by_config.setdefault((b.config.r, b.config.min_width), []).append(b.channels)
    for (r, min_width), channels in by_config.items():
        warnings.warn(
            RetrofitWarning(
                f"r={r:g} gives a reduced width below 1 for {len(channels)} block(s) "
                f"(fewest channels: {min(channels)}); raised to min_width={min_width}"
            ),
            stacklevel=3,
        )
    previous = get_info(target)
    info = RetrofitInfo(
        recipe,
        found.traced.input_size,
        architecture_of(found.traced.model),
        tuple(blocks),
        tuple(found.skipped) + tuple(prepared.skipped),
        tuple(was_none),
    )
    if previous is not None:  # a second retrofit adds to the first
        info = dataclasses.replace(
            info,
            blocks=previous.blocks + info.blocks,
            was_none=previous.was_none + info.was_none,
            weights=previous.weights,
            base=previous.base,
            base_model=previous.base_model,
            license=previous.license,
        )
    set_info(target, info)
    return info


def _install(
    rewrite: Rewrite, target: nn.Module, recipe: Recipe, narrow: list[BlockInfo], none_attributes: list[str], undo: list
) -> list[BlockInfo]:
    """Build the blocks of one prepared rewrite on ``target`` and install the rebuilt forward; its
    rollback (the module as it was) is appended to ``undo``, and run at once if the rewrite fails."""
    owner, rebuilt = rewrite.owner, rewrite.graph
    module = target.get_submodule(owner.path) if owner.path else target
    infos = rewrite.blocks(recipe)
    buffers, blocks, was_none = [], [], []  # registered so far, removed again if the rewrite fails
    forward = forward_state(module)
    before = installed(module)  # retrofitted before: its blocks are in the rebuilt forward too
    earlier = before.specialised if before is not None and before.specialised is not None else None

    def rollback() -> None:
        restore_forward(module, forward)
        for name in buffers + blocks:
            delattr(module, name)
        for name in was_none:  # timm's `self.se = None`: its forward still reads it
            setattr(module, name, None)

    try:
        graphs = [rebuilt] + ([rewrite.other] if rewrite.other is not None else [])
        for name, tensor in (item for g in graphs for item in g.constants.items()):
            module.register_buffer(name, tensor.clone(), persistent=False)  # kept aside by fx: now the module's
            buffers.append(name)
        for (ins, _, _), name, info in zip(rewrite.spliced, rewrite.names, infos):
            if info.channels / info.config.r < 1 and info.config.reads("r"):
                narrow.append(info)
            block = build_attention(
                info.config,
                info.channels,
                layout=info.layout,
                prefix=info.prefix,
                device=_device_of(module, target),
                dtype=N.tensor(ins.value).dtype,
            )
            if name in vars(module):  # _free_name reuses an attribute only when it is None
                was_none.append(name)
            setattr(module, name, block)
            blocks.append(name)
        splice_blocks(rebuilt, [(v, u) for _, v, u in rewrite.spliced], rewrite.names, rewrite.fused)
        graphs = rebuilt.graph
        if rewrite.other is not None:
            splice_blocks(rewrite.other, rewrite.other_spliced, rewrite.names, rewrite.other_fused)
            mode = owner.module.training  # the mode the analysis graph was traced in
            graphs = {mode: rebuilt.graph, not mode: rewrite.other.graph}
        # what the forward was traced with, so it follows the module's attributes (set_input_size)
        spec = (
            None
            if isinstance(module, fx.GraphModule)
            else specialisation(
                module,
                (earlier.blocks if earlier else ()) + tuple(rewrite.names),
                (earlier.was_none if earlier else ()) + tuple(was_none),
            )
        )
        install_forward(module, graphs, spec)
    except BaseException:
        rollback()
        raise
    undo.append(rollback)
    prefix = f"{owner.path}." if owner.path else ""
    none_attributes += [prefix + name for name in was_none]
    return infos


def _device_of(module: nn.Module, model: nn.Module):
    for source in (module, model):
        for t in source.parameters():
            return t.device
        for t in source.buffers():
            return t.device
    return None
