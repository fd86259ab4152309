"""Find the sites of a traced model: where an SE block can go.

Four kinds, read off the flat analysis graph (see :mod:`retrofit.graph.trace`) with its shapes:

* ``residual``: an addition of two same-shaped NCHW tensors that both come from one *fork* node
  (the fork is the merge's immediate dominator in the data flow: every path from the input to the
  merge passes through it). The operand whose path from the fork holds fewer weighted layers
  (convolutions, linears) is the *shortcut*: ``identity`` when it holds none, else ``projection``
  (at most ``MAX_PROJECTION`` of them); the other is the residual *branch*. Sums of two equally deep
  paths (RepVGG's parallel convs) or of two long ones (HRNet's fusions) are not residual units; nor
  is a sum inside one layer (a module without submodules) with no weighted operation on either side:
  it is part of that layer's formula (ConvNeXt-V2's ``GlobalResponseNorm``, ``x + gamma * (x * nx) +
  beta``, is a norm). A unit whose identity covers only some of its channels (ReXNet's
  ``cat([y[:, :C] + x, y[:, C:]], 1)``) is one residual site, anchored at the concatenation that
  closes it, its branch ``y``.
* ``inception``: a channel concatenation of two or more branches from one fork. A concatenation
  that includes the fork itself (DenseNet) is not one; nor is one nested in another Inception merge
  (Inception-v3's 7b/7c inner concats), lying inside a residual branch (Inception-ResNet units
  are residual units) or closing a residual unit (ReXNet's, above).
* ``conv3x3``: a 3x3 convolution on a residual branch, with the chain of norms and activations that
  follows it (the ``inside`` position puts the block at the end of that chain).
* ``pyramid``: a feature-pyramid merge (an FPN's top-down sum): a coarser map upsampled
  (``F.interpolate``, ``nn.Upsample``, a transposed convolution) plus a lateral projection of this
  level. It looks like a residual unit with a projection shortcut, but it is none: its deep side leaves
  this resolution and comes back, and the paper never put SE there. Off by default (``DEFAULT_OFF``):
  a recipe gets these sites only when its ``kinds`` names them.

A site's stage is log2 of its output stride (input height / site height, rounded), as in the notes:
stage 2 is the first ResNet stage (stride 4), stage 5 the last (stride 32).

Layouts (``Site.layout``): residual merges are found on ``nchw`` feature maps, on channels-last
``nhwc`` maps (Swin-style blocks) and on ``tokens`` sequences (B, N, C) of transformer blocks. For
tokens the patch grid is read off the token count: N = prefix + (H / p) * (W / p) for a patch size p
(the stride), the prefix (class and register tokens) taken from the model's ``num_prefix_tokens``
where it says, else the smallest that fits. The SE block squeezes over the spatial positions (the
grid tokens: prefix tokens are not positions of the image) and excites the channels of every token
(see :mod:`retrofit.blocks.se_layout`). Inception merges and 3x3 convolutions are ``nchw`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import RetrofitError
from ..graph import nodes as N
from ..graph.model import resolve_input_size
from ..graph.shapes import count_macs, propagate_shapes
from ..graph.trace import Traced, level_of, none_defaults, trace

KINDS = ("residual", "inception", "conv3x3", "pyramid")
# The kinds a recipe gets only when its `kinds` names them.
DEFAULT_OFF = ("pyramid",)
# Why a pyramid site is not a residual unit: what `retrofit sites` and `add-se` say of them.
PYRAMID_NOTE = (
    "a coarser map upsampled plus a lateral projection of this level, not a residual unit (its deep side "
    "leaves this resolution and comes back; the paper never put SE there)"
)
# The kind of the sites a recipe names by module path (`at:`, retrofit.surgery.named): not discovered, asked for.
NAMED = "module"
# At most this many prefix (class, register, distillation) tokens before a token sequence's patch grid.
MAX_PREFIX_TOKENS = 16
# A shortcut is an identity or a projection: a 1x1 conv (ResNet), pooling + 1x1 conv (ResNet-D),
# depthwise + pointwise (GhostNet). Longer paths on both sides are a fusion of branches (HRNet).
MAX_PROJECTION = 2


@dataclass(eq=False)
class SiteRefs:
    """Where a site sits in the analysis graph (internal; used by positions and surgery)."""

    anchor: fx.Node  # the merge, the concatenation or the convolution
    fork: fx.Node | None = None  # where the merged paths start
    branch: fx.Node | None = None  # residual: the branch operand of the merge
    shortcut: fx.Node | None = None  # residual: the shortcut operand
    branch_nodes: frozenset = frozenset()  # residual: nodes between the fork and the branch operand
    # residual, partial: the sum of the shortcut and the branch's first channels, when the unit's merge
    # (the anchor) is the concatenation that closes it; the branch is then the tensor both sides slice
    sum: fx.Node | None = None
    chain_end: fx.Node | None = None  # conv3x3: last norm/activation after the convolution
    unit: Site | None = None  # conv3x3: the residual site whose branch holds it


@dataclass(frozen=True)
class Site:
    """A place where an SE block can go.

    Attributes:
        kind: ``residual``, ``inception``, ``conv3x3`` or ``pyramid``.
        module: path of the module whose ``forward`` holds the site (``""``: the model itself).
        node: name of the anchoring node in the analysis graph (merge, concatenation, convolution).
        channels, size: channels and (height, width) of the anchor's output.
        stride, stage: output stride of the site and its stage, ``log2(stride)``.
        detail: ``identity``/``projection`` shortcut, number of Inception branches, the conv's path, or
            ``top-down + lateral`` (a pyramid merge).
        layout: ``nchw``, ``nhwc`` (channels last) or ``tokens`` (B, N, C); ``size`` is the spatial
            grid in each (for tokens: the patch grid, without the prefix tokens).
        prefix: tokens layout: the number of prefix (class, register) tokens before the patch grid.
    """

    kind: str
    module: str
    node: str
    channels: int
    size: tuple[int, int]
    stride: int
    stage: int
    detail: str
    refs: SiteRefs = field(repr=False, compare=False, hash=False)
    layout: str = "nchw"
    prefix: int = 0


@dataclass(frozen=True)
class Skipped:
    """A candidate the analysis (or the surgery) passed over, and why."""

    where: str
    reason: str


@dataclass(eq=False)
class Scan:
    """Everything the analysis saw: the traced model, its sites, and what it skipped."""

    traced: Traced
    sites: list[Site]
    skipped: list[Skipped]
    macs: int

    def count(self, kind: str) -> int:
        return sum(s.kind == kind for s in self.sites)

    def kinds(self) -> tuple[str, ...]:
        """The kinds to report: the first three always, ``pyramid`` where the model has such sites."""
        return tuple(k for k in KINDS if k not in DEFAULT_OFF or self.count(k))

    def summary(self) -> str:
        return ", ".join(f"{self.count(k)} {k}" for k in self.kinds())

    def pyramid_note(self) -> str | None:
        """One line on the model's pyramid sites, why they are not residual units and how to select
        them; None when it has none."""
        n = self.count("pyramid")
        return (
            (
                f"{n} pyramid site(s), feature-pyramid merges: {PYRAMID_NOTE}; off by default, --kinds "
                f"residual,pyramid (recipe kinds: [residual, pyramid]) selects them"
            )
            if n
            else None
        )


def find_sites(model: nn.Module, input_size: tuple[int, ...] | None = None) -> list[Site]:
    """The sites the pass sees in ``model`` (any ``nn.Module`` or ``torch.fx.GraphModule``).

    Args:
        model: the network; it is traced, never run on real data.
        input_size: ``(C, H, W)`` of one input; default: the model's own
            (:func:`retrofit.graph.model.own_input_size`), else ``(3, 224, 224)``.

    Example::

        >>> sites = retrofit.find_sites(timm.create_model("resnet50"))
        >>> sum(s.kind == "residual" for s in sites), sites[0].module, sites[0].stage
        (16, 'layer1.0', 2)
    """
    return scan(model, resolve_input_size(model, input_size)).sites


def scan(model: nn.Module, input_size: tuple[int, ...], macs: bool = False) -> Scan:
    """Trace ``model``, propagate shapes on meta tensors (counting multiply-adds if ``macs``) and
    find its sites."""

    def shapes(traced: Traced) -> int:
        if macs:
            return count_macs(traced)
        propagate_shapes(traced)
        return 0

    traced = trace(model, input_size)
    try:
        found = shapes(traced)
    except RetrofitError as first:
        if not none_defaults(model):
            raise
        # a placeholder for an optional input (Hiera's mask=None) took the branch for a given one
        try:
            traced = trace(model, input_size, none_inputs=True)
            found = shapes(traced)
        except RetrofitError:
            raise first from first.__cause__  # the retry failed too: the first failure is the real cause
    return analyse(traced, found)


def analyse(traced: Traced, macs: int = 0) -> Scan:
    """Find the sites of an already traced and shape-propagated model."""
    return _Analysis(traced).run(macs)


class _Analysis:
    def __init__(self, traced: Traced):
        self.traced = traced
        self.nodes = list(traced.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.data = self._data_nodes()
        self.idom = self._dominators()
        self.skipped: list[Skipped] = [Skipped(path or "<model>", line) for path, line in traced.opaque]

    # -- graph facts -----------------------------------------------------------------------
    def _data_nodes(self) -> set:
        """Nodes that carry tensors computed from the inputs (not parameters, not shapes)."""
        data = set()
        for n in self.nodes:
            if n.op == "output":
                continue
            val = n.meta.get("val")
            carries_tensor = isinstance(val, torch.Tensor) or (
                isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
            )
            if carries_tensor and (n.op == "placeholder" or any(a in data for a in n.all_input_nodes)):
                data.add(n)
        return data

    def _dominators(self) -> dict:
        """Immediate dominators of the data nodes (Cooper-Harvey-Kennedy on a DAG in topological
        order; ``None`` stands for a virtual root above the inputs). Linear in practice: the
        intersections stop at the nearest fork."""
        order, idom = self.order, {}

        def rank(n):
            return -1 if n is None else order[n]

        def intersect(a, b):
            while a is not b:
                while rank(a) > rank(b):
                    a = idom[a]
                while rank(b) > rank(a):
                    b = idom[b]
            return a

        idom[None] = None
        for n in self.nodes:
            if n not in self.data:
                continue
            preds = [p for p in n.all_input_nodes if p in self.data]
            dom = preds[0] if preds else None
            for p in preds[1:]:
                dom = intersect(dom, p)
            idom[n] = dom
        return idom

    def _region(self, end: fx.Node, fork: fx.Node, limit: int | None = None) -> tuple[set, int]:
        """Data nodes on the paths from ``fork`` (excluded) to ``end`` (included), and how many of
        them are weighted layers. With ``limit``, the walk stops once more than ``limit`` weighted
        layers are seen (the region is then partial): a side that long is no shortcut, and walking
        HRNet's fusion paths in full made the scan quadratic in the model's size."""
        region, stack, weighted = set(), [end], 0
        while stack:
            v = stack.pop()
            if v is fork or v in region or v not in self.data:
                continue
            region.add(v)
            if N.is_weighted(v):
                weighted += 1
                if limit is not None and weighted > limit:
                    break
            stack.extend(v.all_input_nodes)
        return region, weighted

    def _where(self, n: fx.Node) -> str:
        path = level_of(n).path
        return f"{path or '<model>'} ({n.name})"

    def _site(
        self,
        kind: str,
        anchor: fx.Node,
        detail: str,
        refs: SiteRefs,
        at: fx.Node | None = None,
        layout: tuple[str, tuple[int, int], int] | None = None,
    ) -> Site:
        shape = N.shape(at or anchor)
        name, size, prefix = layout or ("nchw", (shape[2], shape[3]), 0)
        channels = shape[1] if name == "nchw" else shape[-1]
        stage = stage_of(self.traced, size[0])
        return Site(
            kind, level_of(anchor).path, anchor.name, channels, size, 2**stage, stage, detail, refs, name, prefix
        )

    # -- the three kinds -----------------------------------------------------------------
    def run(self, macs: int) -> Scan:
        sums = [s for n in self.nodes if (s := self._residual(n)) is not None]
        residual = self._partial(self._outermost([s for s in sums if s.kind == "residual"]))
        pyramid = [s for s in sums if s.kind == "pyramid"]
        inception = self._inception(residual)
        convs = self._convs(residual)
        sites = sorted(residual + inception + convs + pyramid, key=lambda s: self.order[s.refs.anchor])
        return Scan(self.traced, sites, self.skipped, macs)

    def _residual(self, n: fx.Node) -> Site | None:
        if n not in self.data or (operands := N.add_operands(n)) is None:
            return None
        a, b = operands
        shape = N.shape(a)
        if a not in self.data or b not in self.data or shape is None or shape != N.shape(b) or a is b:
            return None
        if len(shape) not in (3, 4):
            return None
        layout = layout_of(self.traced, n, shape)
        if isinstance(layout, str):
            self.skipped.append(Skipped(self._where(n), f"sum of {layout}: not supported"))
            return None
        fork = self.idom[n]
        if fork is None:
            return None
        if fork in (a, b):  # x + f(x): the identity is the shortcut, whatever f holds (PoolFormer's pooling)
            shortcut, branch = (a, b) if a is fork else (b, a)
            region, kind = self._region(branch, fork)[0], "identity"
        else:
            # both sides walked only as far as a shortcut can go; the branch is walked in full after
            walks = {v: self._region(v, fork, MAX_PROJECTION) for v in (a, b)}
            depth = {v: w[1] for v, w in walks.items()}
            if depth[a] == depth[b] or min(depth.values()) > MAX_PROJECTION:
                said = {v: f"more than {MAX_PROJECTION}" if d > MAX_PROJECTION else str(d) for v, d in depth.items()}
                self.skipped.append(
                    Skipped(
                        self._where(n),
                        f"sum of two paths with {said[a]} and {said[b]} "
                        f"weighted layers: neither is an identity or a short projection "
                        f"shortcut, not a residual unit",
                    )
                )
                return None
            branch, shortcut = (a, b) if depth[a] > depth[b] else (b, a)
            if N.is_upsample(branch):  # an FPN's top-down sum: the lateral conv looked like a projection
                refs = SiteRefs(n, fork=fork, branch=branch, shortcut=shortcut)
                return self._site("pyramid", n, "top-down + lateral", refs, layout=layout)
            region = walks[branch][0] if depth[branch] <= MAX_PROJECTION else self._region(branch, fork)[0]
            kind = "identity" if depth[shortcut] == 0 else "projection"
        layer = level_of(n).module
        if next(layer.children(), None) is None and not any(N.is_weighted(v) for v in region):
            self.skipped.append(
                Skipped(
                    self._where(n),
                    f"a sum inside one layer ({type(layer).__name__}: no "
                    f"submodules, no weighted operation on either side) is part of that "
                    f"layer's formula, not a residual unit",
                )
            )
            return None
        refs = SiteRefs(n, fork=fork, branch=branch, shortcut=shortcut, branch_nodes=frozenset(region))
        return self._site("residual", n, kind, refs, layout=layout)

    def _outermost(self, residual: list[Site]) -> list[Site]:
        """Drop sums inside the branch of a wider residual unit: Res2Net's hierarchical sums over
        channel splits are part of their bottleneck. Sums on the unit's full width (units nested in
        a residual group) stay sites."""
        widest: dict[fx.Node, Site] = {}  # node -> the widest unit whose branch holds it
        for unit in residual:
            for v in unit.refs.branch_nodes:
                if v not in widest or widest[v].channels < unit.channels:
                    widest[v] = unit
        kept = []
        for site in residual:
            unit = widest.get(site.refs.anchor)
            if unit is not None and unit.channels > site.channels:
                self.skipped.append(
                    Skipped(
                        self._where(site.refs.anchor),
                        f"inside the residual branch of "
                        f"{unit.module or '<model>'}, on a channel split: part of that unit",
                    )
                )
                continue
            kept.append(site)
        return kept

    def _partial(self, residual: list[Site]) -> list[Site]:
        """Residual units whose identity covers only some channels: ReXNet's ``LinearBottleneck`` ends in
        ``cat([y[:, :C] + x, y[:, C:]], 1)`` for a branch output ``y`` wider than the input ``x``. The
        concatenation is that unit's merge, not an Inception merge, and the sum is part of it: one site,
        anchored at the concatenation (the unit's output, every channel), its branch ``y`` (both sides
        slice it), its shortcut the sum's."""
        units = {s.refs.anchor: s for s in residual}
        merged: dict[int, Site] = {}  # id(the sum's site) -> the unit's
        for n in self.nodes:
            if n not in self.data or (operands := N.cat_operands(n)) is None or len(N.shape(n) or ()) != 4:
                continue
            tensors, dim = [N.unmarked(t) for t in operands[0]], operands[1]
            sums = [units[t] for t in tensors if t in units]
            if dim % 4 != 1 or len(sums) != 1 or sums[0].layout != "nchw" or sums[0].refs.fork is not self.idom[n]:
                continue
            unit = sums[0]
            rest = [t for t in tensors if t is not unit.refs.anchor]
            source = N.channel_slice_of(unit.refs.branch)
            if (
                source is None
                or any(N.channel_slice_of(t) is not source for t in rest)
                or not set(source.users) <= {unit.refs.branch, *rest}
            ):
                continue
            refs = SiteRefs(
                n,
                fork=unit.refs.fork,
                branch=source,
                shortcut=unit.refs.shortcut,
                branch_nodes=unit.refs.branch_nodes | set(rest),
                sum=unit.refs.anchor,
            )
            merged[id(unit)] = self._site(
                "residual", n, f"{unit.detail}, on {unit.channels} of {N.shape(n)[1]} channels", refs
            )
        return [merged.get(id(s), s) for s in residual]

    def _inception(self, residual: list[Site]) -> list[Site]:
        in_branches = {v: s for s in residual for v in s.refs.branch_nodes}
        merges = {s.refs.anchor for s in residual}
        found: dict[fx.Node, Site] = {}
        for n in self.nodes:
            if n not in self.data or n in merges or (operands := N.cat_operands(n)) is None:
                continue
            tensors, dim = operands
            shape = N.shape(n)
            if shape is None or len(shape) != 4 or dim % 4 != 1 or len(tensors) < 2:
                continue
            if not all(isinstance(t, fx.Node) and t in self.data for t in tensors):
                continue
            fork = self.idom[n]
            if fork is None:
                continue
            if fork in tensors:
                self.skipped.append(
                    Skipped(
                        self._where(n),
                        "concatenation that includes its own input (DenseNet style): not an Inception merge",
                    )
                )
                continue
            if n in in_branches:
                unit = in_branches[n]
                self.skipped.append(
                    Skipped(
                        self._where(n),
                        f"inside the residual branch of {unit.module or '<model>'}: part of that residual unit",
                    )
                )
                continue
            found[n] = self._site("inception", n, f"{len(tensors)} branches", SiteRefs(n, fork=fork))
        # a concatenation that feeds another one directly (through markers) is nested in it
        nested = set()
        for n in found:
            for t in map(N.unmarked, N.cat_operands(n)[0]):
                if t in found:
                    nested.add(t)
                    self.skipped.append(
                        Skipped(self._where(t), f"nested in the Inception merge of {found[n].module or '<model>'}")
                    )
        return [s for n, s in found.items() if n not in nested]

    def _convs(self, residual: list[Site]) -> list[Site]:
        sites, seen = [], set()
        for unit in sorted(residual, key=lambda s: len(s.refs.branch_nodes)):  # innermost unit first
            for v in sorted(unit.refs.branch_nodes, key=self.order.get):
                if v in seen or not N.is_conv3x3(v) or len(N.shape(v) or ()) != 4:
                    continue
                seen.add(v)
                end = chain_end(v, N.is_pointwise)
                path = v.meta["call"].path if v.op == "call_module" else v.name
                refs = SiteRefs(v, fork=unit.refs.fork, chain_end=end, unit=unit)
                sites.append(self._site("conv3x3", v, path, refs, at=end))
        return sites


def stage_of(traced: Traced, height: int) -> int:
    """log2 of the output stride of a map ``height`` high: the image's height over it, rounded."""
    return max(0, round(math.log2(traced.image_size[0] / height))) if height > 0 else 0


def spatial(traced: Traced, h: int, w: int) -> bool:
    """Whether (h, w) can be the image's height and width at some output stride: both sides
    shrunk by the same power of two (NCHW). A channels-last (N, H, W, C) tensor fails this."""
    in_h, in_w = traced.image_size
    return (
        h > 0
        and w > 0
        and round(math.log2(in_h / h)) == round(math.log2(in_w / w))
        and abs(in_h / h - in_w / w) <= 0.5 * max(in_h / h, in_w / w)
    )


def layout_of(traced: Traced, n: fx.Node, shape: tuple[int, ...]) -> tuple[str, tuple[int, int], int] | str:
    """``(layout, spatial size, prefix tokens)`` of the tensor ``n`` of ``shape`` (a merge's output,
    a module's), or why it has none."""
    if len(shape) == 4 and spatial(traced, shape[2], shape[3]):
        return "nchw", (shape[2], shape[3]), 0
    if len(shape) == 4 and spatial(traced, shape[1], shape[2]):
        return "nhwc", (shape[1], shape[2]), 0
    if len(shape) == 4:
        return "4-d tensors whose dims are neither (N, C, H, W) nor (N, H, W, C) of the image"
    if shape[1] == 1:
        return (
            "one-token tensors (B, 1, C) (a class token alone, as in CaiT's class attention): no positions to squeeze"
        )
    grid = token_grid(traced, n, shape[1])
    if grid is None:
        return (
            f"token tensors (B, N, C) whose {shape[1]} tokens match no patch grid of the "
            f"{traced.image_size[0]}x{traced.image_size[1]} input: the squeeze axis is unknown"
        )
    return "tokens", grid[:2], grid[2]


def token_grid(traced: Traced, n: fx.Node, tokens: int) -> tuple[int, int, int] | None:
    """``(grid height, grid width, prefix)`` with ``tokens = prefix + height * width`` for a
    patch grid of the input; the prefix from the nearest module saying ``num_prefix_tokens``
    (timm's ViT family), else the smallest one that fits."""
    known, call = None, level_of(n)
    while call is not None and known is None:
        p = getattr(call.module, "num_prefix_tokens", None)
        known = p if isinstance(p, int) and not isinstance(p, bool) else None
        call = call.parent
    in_h, in_w = traced.image_size
    # the model's prefix first; then any (CaiT's patch blocks run before its class token joins)
    for wanted in ([known] if known is not None else []) + [None]:
        best = None
        for patch in range(1, min(in_h, in_w) + 1):
            for gh, gw in ((in_h // patch, in_w // patch), (-(-in_h // patch), -(-in_w // patch))):
                prefix = tokens - gh * gw
                fits = prefix == wanted if wanted is not None else 0 <= prefix <= MAX_PREFIX_TOKENS
                if fits and (best is None or prefix < best[2]):
                    best = (gh, gw, prefix)
            if best is not None:
                return best
    return None


def chain_end(node: fx.Node, follows) -> fx.Node:
    """Follow ``node``'s sole users while ``follows(user)`` holds and the shape is kept."""
    while len(node.users) == 1:
        (user,) = node.users
        if not (follows(user) and user.args and user.args[0] is node and N.shape(user) == N.shape(node)):
            break
        node = user
    return node
