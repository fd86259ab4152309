"""Insert SE blocks: plan the insertions a recipe asks for, then rewrite the modules that own them.

Surgery touches the smallest module whose forward holds an insertion's edges. That module's forward
is rebuilt at its own level from the analysis graph (:class:`OwnerGraph`): its own operations are
copied, each child module it calls becomes one ``call_module`` node (so the child keeps its own
forward, train/eval behaviour included), and the SE node is spliced in. The result is installed on the
same instance (:mod:`retrofit.graph_forward`): the model keeps its class, methods and state-dict keys.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import inspect
import itertools
import operator
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate, map_arg

from . import nodes as N
from .errors import RetrofitError, RetrofitWarning
from .graph_forward import install_forward
from .positions import POSITIONS, Insertion, SkipSite
from .recipe import Recipe, resolve_recipe
from .se import SqueezeExcite
from .sites import Scan, Skipped, scan
from .trace import Call, RetrofitTracer, Traced, attributes_kept, level_of


@dataclass(frozen=True)
class BlockInfo:
    """One inserted block and the site it serves."""

    path: str          # the block's module path, e.g. "layer1.0.se"
    position: str
    site_kind: str
    site_module: str   # the module whose forward holds the site
    stage: int
    stride: int
    channels: int
    width: int


@dataclass
class RetrofitInfo:
    """What :func:`add_se` did to a model; kept on it as ``model._retrofit``."""

    recipe: Recipe
    input_size: tuple[int, ...]
    architecture: str | None
    blocks: list[BlockInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def add_se(model: nn.Module, recipe: Recipe | str | dict | None = None, *, inplace: bool = False,
           input_size: tuple[int, ...] | None = None, **fields: Any) -> nn.Module:
    """Insert Squeeze-and-Excitation blocks into ``model`` following a recipe.

    Args:
        model: any ``nn.Module`` or ``torch.fx.GraphModule`` (a timm model, or your own).
        recipe: a :class:`~retrofit.Recipe`, a built-in recipe name (``"timm"``, ``"post"``...), a
            YAML path or a dict; default: ``Recipe()`` (standard position, r=16, preserving init).
        inplace: modify ``model`` itself instead of a deep copy.
        input_size: ``(C, H, W)`` used to trace shapes; default: timm's ``pretrained_cfg``, else
            ``(3, 224, 224)``.
        **fields: recipe fields overriding the recipe's (``position``, ``r``, ``gate``, ``stages``...).

    Returns:
        The retrofitted model: the same class as ``model``, every original state-dict key unchanged,
        plus one block per site (``<module>.se`` for the standard position).

    Raises:
        RetrofitError: a bad recipe, a position with no site in this model, a stage it does not have.

    Example::

        >>> model = timm.create_model("resnet50")
        >>> se_model = retrofit.add_se(model, position="inside", r=8, stages=[4])
        >>> se_model = retrofit.add_se(model, recipe="timm")   # timm's seresnet50 layout
    """
    from .models import resolve_input_size

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
    insertions, skipped = plan(found, recipe)
    info = RetrofitInfo(recipe, found.traced.input_size, architecture_of(found.traced.model),
                        skipped=list(found.skipped) + skipped)
    calls_of: dict[int, int] = {}
    for call in found.traced.calls():
        calls_of[id(call.module)] = calls_of.get(id(call.module), 0) + 1
    by_owner: dict[int, tuple[Call, list[Insertion]]] = {}
    for ins in insertions:
        owner = owner_of(ins)
        if calls_of[id(owner.module)] > 1:  # one forward serves every call: they would all change
            info.skipped.append(Skipped(_site_name(ins.site), f"{owner.path or '<model>'} is called "
                                        f"{calls_of[id(owner.module)]} times (a shared module): not rewritten"))
            continue
        by_owner.setdefault(id(owner), (owner, []))[1].append(ins)
    narrow = []
    for owner, group in by_owner.values():
        try:
            info.blocks += _rewrite(owner, group, target, recipe, narrow, found.traced)
        except CannotRewrite as err:
            info.skipped += [Skipped(_site_name(ins.site), f"{owner.path or '<model>'}: {err}") for ins in group]
    if not info.blocks:
        reasons = "; ".join(sorted({s.reason for s in info.skipped[len(found.skipped):]})) or "no reason"
        raise RetrofitError(f"no SE block could be inserted in {model_name(found.traced.model)} "
                            f"({reasons})")
    if narrow:
        warnings.warn(RetrofitWarning(
            f"r={recipe.r} gives a reduced width below 1 for {len(narrow)} block(s) "
            f"(fewest channels: {min(narrow)}); raised to min_width={recipe.min_width}"), stacklevel=3)
    previous = getattr(target, "_retrofit", None)
    if isinstance(previous, RetrofitInfo):  # a second retrofit adds to the first
        info.blocks = previous.blocks + info.blocks
    target._retrofit = info
    return info


# -- planning -----------------------------------------------------------------------------------
def plan(found: Scan, recipe: Recipe) -> tuple[list[Insertion], list[Skipped]]:
    """The insertions ``recipe`` asks for in a scanned model (site kinds and stages checked)."""
    position = POSITIONS[recipe.position]
    name = model_name(found.traced.model)
    candidates = [s for s in found.sites if s.kind in position.kinds]
    if not candidates:
        usable = [p for p, spec in POSITIONS.items() if any(s.kind in spec.kinds for s in found.sites)]
        if usable:
            hint = f"positions that fit it: {', '.join(usable)}"
        elif found.skipped:
            reason, n = Counter(s.reason for s in found.skipped).most_common(1)[0]
            hint = f"it has no residual or Inception merge the pass supports ({n} candidates skipped: {reason})"
        else:
            hint = "it has no residual or Inception merge at all"
        raise RetrofitError(f"position '{recipe.position}' has no site in {name}: it needs "
                            f"{' or '.join(position.kinds)} sites and the model has {found.summary()}; {hint}")
    if recipe.stages is not None:
        stages = sorted({s.stage for s in candidates})
        missing = [s for s in recipe.stages if s not in stages]
        if missing:
            raise RetrofitError(f"stage {','.join(map(str, missing))} does not exist in {name} for position "
                                f"'{recipe.position}': its sites are in stages {','.join(map(str, stages))} "
                                f"(stage = log2 of the output stride)")
        candidates = [s for s in candidates if s.stage in recipe.stages]
    insertions, skipped = [], []
    for site in candidates:
        try:
            insertions.append(position.place(site))
        except SkipSite as err:
            skipped.append(Skipped(_site_name(site), f"{recipe.position}: {err}"))
    if not insertions:
        raise RetrofitError(f"position '{recipe.position}' has no usable site in {name}: "
                            f"{skipped[0].reason}")
    return insertions, skipped


class CannotRewrite(Exception):
    """A module's forward cannot be rebuilt safely; the message says why."""


def owner_of(ins: Insertion) -> Call:
    """The innermost module call whose own forward holds the insertion's edges."""
    if ins.users is None:
        return level_of(ins.value)
    calls = [level_of(u) for u in ins.users]
    owner = calls[0]
    for call in calls[1:]:
        ancestors = set()
        c = owner
        while c is not None:
            ancestors.add(id(c))
            c = c.parent
        while id(call) not in ancestors:
            call = call.parent
        owner = call
    return owner


# -- surgery ------------------------------------------------------------------------------------
def _rewrite(owner: Call, group: list[Insertion], target: nn.Module, recipe: Recipe,
             narrow: list[int], traced: Traced) -> list[BlockInfo]:
    module = target.get_submodule(owner.path) if owner.path else target
    rebuilt = OwnerGraph(owner, traced)
    check_mode_independent(module)
    spliced = []
    for ins in group:
        value = rebuilt.rep(ins.value)
        users = None if ins.users is None else rebuilt.rep_users(ins.value, ins.users)
        spliced.append((ins, value, users))
    bases = [("se" if ins.position == "standard" else f"se_{ins.position}") for ins, _, _ in spliced]
    added = []
    try:
        for name, value in rebuilt.constants.items():  # tensors fx kept aside: now the module's own
            module.register_buffer(name, value.clone(), persistent=False)
            added.append(name)
        for (ins, value, users), base in zip(spliced, bases):
            if bases.count(base) > 1:
                base = f"{base}_{_clean(value.name)}"
            name = _free_name(module, base)
            channels = N.shape(ins.value)[1]
            width = recipe.width(channels)
            if channels / recipe.r < 1:
                narrow.append(channels)
            block = SqueezeExcite(channels, width, squeeze=recipe.squeeze, gate=recipe.gate, bias=recipe.bias,
                                  init=recipe.init, device=_device_of(module, target),
                                  dtype=N.tensor(ins.value).dtype)
            setattr(module, name, block)
            added.append(name)
            rebuilt.splice(value, users, name)
        install_forward(module, rebuilt.graph)
    except BaseException:
        for name in added:
            delattr(module, name)
        raise
    prefix = f"{owner.path}." if owner.path else ""
    blocks = added[len(rebuilt.constants):]
    return [BlockInfo(prefix + name, ins.position, ins.site.kind, ins.site.module, ins.site.stage,
                      ins.site.stride, getattr(module, name).channels, getattr(module, name).width)
            for (ins, _, _), name in zip(spliced, blocks)]


class OwnerGraph:
    """One module call's forward rebuilt at its own level from the analysis graph."""

    def __init__(self, call: Call, traced: Traced):
        self.call = call
        self.traced = traced
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}      # analysis node -> node of this graph
        self.children: dict[int, fx.Node] = {}      # id(child Call) -> its call_module node
        self.constants: dict[str, Any] = {}         # tensors to register on the module (non-persistent)
        self.prefix = f"{call.path}." if call.path else ""
        if call.parent is not None:
            self._placeholders()
        self._build()

    # -- building ---------------------------------------------------------------------------
    def _placeholders(self) -> None:
        module = self.call.module
        try:
            sig = inspect.signature(module.forward)
            bound = sig.bind(*self.call.args, **self.call.kwargs)
        except (TypeError, ValueError) as err:
            raise CannotRewrite(f"its forward signature cannot be bound ({err})") from None
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
            raise CannotRewrite("its forward takes *args or **kwargs")
        holders = {p.name: self.graph.placeholder(p.name, default_value=p.default)
                   for p in sig.parameters.values()}
        for name, value in bound.arguments.items():
            self._bind(holders[name], value)

    def _bind(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, fx.Proxy):
            self.env.setdefault(value.node, node)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if _has_proxy(v):
                    self._bind(self.graph.call_function(operator.getitem, (node, i)), v)
        elif isinstance(value, dict):
            for k, v in value.items():
                if _has_proxy(v):
                    self._bind(self.graph.call_function(operator.getitem, (node, k)), v)

    def _build(self) -> None:
        g = self.graph
        for ev in self.call.events:
            if isinstance(ev, Call):
                if ev.leaf:
                    if ev.node is None:
                        continue
                    args, kwargs = map_arg(ev.node.args, self.lookup), map_arg(ev.node.kwargs, self.lookup)
                else:
                    args, kwargs = self._map(ev.args), self._map(ev.kwargs)
                node = g.call_module(self.relative(ev.path), args, kwargs)
                self.children[id(ev)] = node
                if ev.leaf:
                    self.env[ev.node] = node
            elif N.is_marker(ev):
                node = self.children[id(ev.meta["output_of"])]
                for key in ev.meta["output_path"]:
                    node = g.call_function(operator.getitem, (node, key))
                self.env[ev] = node
            elif ev.op == "get_attr":
                self.env[ev] = self._get_attr(ev.target)
            elif ev.op == "output":
                g.output(map_arg(ev.args[0], self.lookup))
            elif ev.op == "placeholder":
                self.env[ev] = g.placeholder(ev.target, default_value=ev.args[0] if ev.args else inspect.Parameter.empty)
            else:
                self.env[ev] = g.create_node(ev.op, ev.target, map_arg(ev.args, self.lookup),
                                             map_arg(ev.kwargs, self.lookup), name=_clean(ev.name))
        if self.call.parent is not None:
            g.output(self._map(self.call.result))

    def _map(self, value: Any) -> Any:
        """Values passed to or returned by a traced-through call, as arguments of this graph."""
        def convert(a):
            if isinstance(a, fx.Proxy):
                return self.lookup(a.node)
            if isinstance(a, torch.Tensor):
                return self._tensor(a)
            if not isinstance(a, _LITERALS):  # generated code could not spell it
                raise CannotRewrite(f"it passes a {type(a).__name__} value to a submodule")
            return a
        return map_aggregate(value, convert)

    def _tensor(self, t: torch.Tensor) -> fx.Node:
        """A tensor handed over as is: one of the module's own, or kept as a constant."""
        module = self.call.module
        for name, own in itertools.chain(module.named_parameters(), module.named_buffers()):
            if own is t:
                return self.graph.get_attr(name)
        qualified = self.traced.tensor_attrs.get(t)
        if qualified is not None and qualified.startswith(self.prefix):
            return self.graph.get_attr(qualified[len(self.prefix):])
        return self._constant(t)

    def _constant(self, value: Any) -> fx.Node:
        if not isinstance(value, torch.Tensor):
            raise CannotRewrite(f"its forward uses a {type(value).__name__} constant")
        name, k = "_retrofit_constant", 0
        while hasattr(self.call.module, f"{name}{k}") or f"{name}{k}" in self.constants:
            k += 1
        self.constants[f"{name}{k}"] = value
        return self.graph.get_attr(f"{name}{k}")

    def _get_attr(self, target: str) -> fx.Node:
        if target in self.traced.constants:  # a value fx kept on the traced root for this forward
            return self._constant(self.traced.constants[target])
        return self.graph.get_attr(self.relative(target))

    def lookup(self, n: fx.Node) -> fx.Node:
        found = self.env.get(n)
        if found is not None:
            return found
        if n.op == "get_attr":  # a parameter first read in another call (fx caches their proxies)
            node = self.env[n] = self._get_attr(n.target)
            return node
        raise CannotRewrite(f"its forward reads {n.name}, which it does not receive as an argument")

    def relative(self, path: str) -> str:
        if not path.startswith(self.prefix):
            raise CannotRewrite(f"it uses {path}, which is not one of its submodules")
        return path[len(self.prefix):]

    # -- splicing -----------------------------------------------------------------------------
    def rep(self, n: fx.Node) -> fx.Node:
        """This level's node for the analysis node ``n`` (it must be computed or received here)."""
        found = self.env.get(n)
        if found is None:
            raise CannotRewrite(f"{n.name} is computed inside a submodule and is not its output")
        return found

    def rep_users(self, value: fx.Node, users: tuple[fx.Node, ...]) -> list[fx.Node]:
        """This level's nodes that read ``value`` on behalf of ``users``: the users themselves, or
        the child calls that contain them (which must then hold no other reader of ``value``)."""
        reps = []
        for u in users:
            if u in self.env:
                reps.append(self.env[u])
                continue
            child = self._child_holding(u)
            others = [w for w in value.users if w not in users and self._child_holding(w) is child]
            if others:
                raise CannotRewrite(f"{child.path} reads the tensor on both sides of the insertion")
            reps.append(self.children[id(child)])
        return reps

    def _child_holding(self, n: fx.Node) -> Call | None:
        c = n.meta["call"]
        while c is not None and c.parent is not self.call:
            c = c.parent
        return c

    def splice(self, value: fx.Node, users: list[fx.Node] | None, name: str) -> None:
        """Insert ``call_module(name)(value)`` and make ``users`` (None: every reader) read it."""
        g = self.graph
        if value.op == "placeholder":
            value_anchor = [n for n in g.nodes if n.op == "placeholder"][-1]
        else:
            value_anchor = value
        with g.inserting_after(value_anchor):
            se = g.call_module(name, (value,))
        if users is None:
            value.replace_all_uses_with(se, delete_user_cb=lambda n: n is not se)
        else:
            for u in users:
                u.replace_input_with(value, se)


_LITERALS = (type(None), bool, int, float, complex, str, type(Ellipsis), torch.dtype, torch.device,
             torch.memory_format, torch.layout)


def _has_proxy(value: Any) -> bool:
    found = []
    map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return bool(found)


def _clean(name: str) -> str:
    """``layer1_0_add_3`` -> ``add``: stable local names, so equal blocks compile to equal code."""
    return re.sub(r"_\d+$", "", name) or name


def _free_name(module: nn.Module, base: str) -> str:
    name, k = base, 2
    while getattr(module, name, None) is not None:
        name, k = f"{base}_{k}", k + 1
    return name


def _device_of(module: nn.Module, model: nn.Module):
    for source in (module, model):
        for t in source.parameters():
            return t.device
        for t in source.buffers():
            return t.device
    return None


def _site_name(site) -> str:
    return f"{site.module or '<model>'} ({site.kind} {site.node})"


# -- train/eval mode ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether the class's forward (or a method of the class it calls) mentions ``training``."""
    seen, todo = set(), [getattr(cls, "forward", None)]
    while todo:
        fn = todo.pop()
        code = getattr(inspect.unwrap(fn), "__code__", None) if fn is not None else None
        stack = [code] if code is not None else []
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            if "training" in c.co_names:
                return True
            stack.extend(k for k in c.co_consts if inspect.iscode(k))
            todo.extend(m for name in c.co_names if inspect.isfunction(m := getattr(cls, name, None)))
    return False


class _OneLevelTracer(RetrofitTracer):
    def __init__(self, root: nn.Module):
        super().__init__()
        self.only = root

    def is_leaf_module(self, m, qualified_name):
        return m is not self.only


def check_mode_independent(module: nn.Module) -> None:
    """A rebuilt forward is traced in one mode; refuse modules whose own forward differs by mode."""
    if not _reads_training(type(module)) or isinstance(module, fx.GraphModule):
        return
    saved = module.training
    try:
        graphs = []
        for mode in (True, False):
            module.training = mode
            with attributes_kept(module, {}):
                graphs.append(str(_OneLevelTracer(module).trace(module)))
    except Exception as err:
        raise CannotRewrite(f"its forward cannot be traced in train and eval mode ({err})") from None
    finally:
        module.training = saved
    if graphs[0] != graphs[1]:
        raise CannotRewrite("its forward computes different things in train and eval mode")


# -- names --------------------------------------------------------------------------------------------
def architecture_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def model_name(model: nn.Module) -> str:
    return architecture_of(model) or type(model).__name__
