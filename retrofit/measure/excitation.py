"""What each channel gate's excitation does on data: the paper's "Role of Excitation", per block.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507, section 6.4 ("Role of
Excitation"): early blocks excite channels alike for every class, later ones class-specifically, and
the last stage's saturate or give one pattern for all classes (little recalibration).

:class:`Recorder` hooks every gate of a model (:func:`retrofit.blocks.excitation.gate_of`: the module whose
output is the raw gate value ``g``, in the gate's own range; the block scales by ``g / origin``) and its
block (for the block's input ``x``), and accumulates over the images it sees, in float64, shifted by the
first image's values (so an excitation that never changes gives exactly zero spread and change):

* ``mean``: the mean of ``g`` over images and channels;
* ``image spread``: per channel the standard deviation of ``g`` over images, averaged over channels;
* ``class spread``: per channel the standard deviation over classes of the class means of ``g``, averaged
  over channels: the paper's class-specificity (0: every class excited alike);
* ``saturated``: the share of channels whose mean ``g`` is within 0.05 of the gate's upper bound
  (1 for the sigmoid, hard sigmoid and tanh; none for ReLU);
* ``local change``: how much the block's output changes, relative, on these images when its excitation
  is replaced by its mean: ``sqrt(sum (g - mean_c g)^2 E / sum g^2 E)``, sums over images ``n`` and channels
  ``c``, ``E_nc`` the block input's energy (sum of ``x^2`` over positions): ``||x (s - s_mean)|| / ||x s||``.
  One pass gives it for every block at once (:func:`retrofit.fold` sorts by it).

The constancy measured at the model's output (:func:`replaced`: one block's gate replaced by its mean, all
others live) is computed by :func:`retrofit.inspect`, one pass per block: the relative change of the
logits, ``||L_b - L|| / ||L||`` over all images and classes, and the change of the mean cross-entropy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..blocks.excitation import gate_of
from ..blocks.se import GATES

SATURATION = 0.05  # a channel is saturated when its mean gate is within this of the gate's upper bound
UPPER = {"sigmoid": 1.0, "hard_sigmoid": 1.0, "tanh": 1.0}  # gates with an upper bound (relu has none)


@dataclass
class GateReport:
    """One gate's excitation statistics on the inspected images (see the module docstring)."""

    path: str
    stage: int
    position: str
    module: str
    channels: int
    gate: str
    origin: float  # the block scales by raw gate / origin
    constant: bool  # input-independent by its weights (no data needed)
    mean: float
    image_spread: float
    class_spread: float
    saturated: float | None  # share of channels; None for a gate without upper bound
    local_change: float
    logit_change: float | None = None  # at the model's output (retrofit.inspect, output_change=True)
    loss_change: float | None = None
    channel_means: list[float] = field(default_factory=list)  # mean raw gate per channel
    class_means: list[list[float]] = field(default_factory=list)  # [class][channel]

    @property
    def scale(self) -> torch.Tensor:
        """The constant scale this block's mean excitation gives (what a fold puts in its place)."""
        return torch.tensor(self.channel_means, dtype=torch.float64) / self.origin

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Sums:
    """Shifted float64 sums for one gate (``d = g - g_first``)."""

    def __init__(self, channels: int, classes: int):
        z = torch.zeros(channels, dtype=torch.float64)
        self.ref: torch.Tensor | None = None
        self.n = 0
        self.d, self.d2, self.energy, self.d_e, self.d2_e = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
        self.by_class = torch.zeros(classes, channels, dtype=torch.float64)
        self.class_n = torch.zeros(classes, dtype=torch.float64)

    def add(self, g: torch.Tensor, e: torch.Tensor, targets: torch.Tensor | None) -> None:
        g, e = g.detach().to("cpu", torch.float64), e.detach().to("cpu", torch.float64)
        if self.ref is None:
            self.ref = g[0].clone()
        d = g - self.ref
        self.n += len(g)
        self.d += d.sum(0)
        self.d2 += (d * d).sum(0)
        self.energy += e.sum(0)
        self.d_e += (d * e).sum(0)
        self.d2_e += (d * d * e).sum(0)
        if targets is not None:
            t = targets.to("cpu").long()
            self.by_class.index_add_(0, t, d)
            self.class_n += torch.bincount(t, minlength=len(self.class_n)).to(torch.float64)

    def summary(self) -> dict[str, Any]:
        n, mean_d = self.n, self.d / self.n
        means = self.ref + mean_d
        image_var = (self.d2 / n - mean_d * mean_d).clamp_min(0)
        seen = self.class_n > 0
        class_d = self.by_class[seen] / self.class_n[seen, None]
        class_spread = class_d.std(0, unbiased=False).mean() if len(class_d) > 1 else torch.zeros(())
        ref, e = self.ref, self.energy
        change = (self.d2_e - 2 * mean_d * self.d_e + mean_d * mean_d * e).sum().clamp_min(0)
        output = (ref * ref * e + 2 * ref * self.d_e + self.d2_e).sum()
        return dict(
            mean=float(means.mean()),
            image_spread=float(image_var.sqrt().mean()),
            class_spread=float(class_spread),
            local_change=float((change / output).sqrt()) if output > 0 else 0.0,
            channel_means=means.tolist(),
            class_means=[
                (self.ref + row).tolist() if k else []
                for row, k in zip(self.by_class / self.class_n.clamp_min(1)[:, None], self.class_n.tolist())
            ],
        )


def _energy(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Per image and channel, the sum of ``x^2`` over every position (and token)."""
    x = x.detach().to(torch.float64)
    if layout == "nchw":
        return (x * x).flatten(2).sum(2)
    return (x * x).flatten(1, -2).sum(1)


class Recorder:
    """Hooks on the gates ``blocks`` (:class:`retrofit.surgery.info.BlockInfo`) of ``model`` that accumulate
    their excitations; set :attr:`targets` to each batch's labels before its forward (for the class means).

    Example::

        >>> gates = retrofit.get_info(se_model).blocks[:2]
        >>> batches = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
        >>> with Recorder(se_model.eval(), gates, classes=2) as rec:
        ...     for x, y in batches:
        ...         rec.targets = y
        ...         logits = se_model(x)
        >>> [r.path for r in rec.reports()]
        ['layer1.0.se', 'layer1.1.se']
    """

    def __init__(self, model: nn.Module, blocks: list, classes: int):
        self.model, self.blocks, self.classes = model, list(blocks), classes
        self.sums = {b.path: _Sums(b.channels, classes) for b in self.blocks}
        self.targets: torch.Tensor | None = None
        self._handles: list = []
        self._pending: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Recorder:
        for b in self.blocks:
            block = self.model.get_submodule(b.path)
            gate, _ = gate_of(block)
            self._handles.append(gate.register_forward_hook(self._gate_hook(b.path)))
            self._handles.append(block.register_forward_hook(self._block_hook(b)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _gate_hook(self, path: str):
        def hook(module, args, out):
            self._pending[path] = out.reshape(out.shape[0], -1)

        return hook

    def _block_hook(self, b):
        def hook(module, args, out):
            g = self._pending.pop(b.path)
            self.sums[b.path].add(g, _energy(args[0], b.layout), self.targets)

        return hook

    def reports(self) -> list[GateReport]:
        """One :class:`GateReport` per gate (without the model-level change, filled in by the caller)."""
        out = []
        for b in self.blocks:
            sums = self.sums[b.path]
            if sums.n == 0:
                continue
            block = self.model.get_submodule(b.path)
            gate = b.config.gate
            summary = sums.summary()
            upper = UPPER.get(gate) if gate in GATES else None
            means = torch.tensor(summary["channel_means"])
            saturated = float((means >= upper - SATURATION).double().mean()) if upper is not None else None
            out.append(
                GateReport(
                    b.path,
                    b.stage,
                    b.position,
                    b.config.module,
                    b.channels,
                    gate,
                    gate_of(block)[1],
                    False,
                    saturated=saturated,
                    **summary,
                )
            )
        return out


@contextlib.contextmanager
def replaced(model: nn.Module, path: str, raw: torch.Tensor) -> Iterator[None]:
    """Within this context the gate of block ``path`` outputs ``raw`` (its mean raw gate, one value per
    channel) for every image: the block scales by the constant ``raw / origin``."""
    gate, _ = gate_of(model.get_submodule(path))

    def hook(module, args, out):
        value = raw.to(device=out.device, dtype=out.dtype).reshape(1, *out.shape[1:])
        return value.expand_as(out).clone()

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
