"""Forward latency of a retrofitted model relative to its original, measured side by side.

One process, one input, inference mode: every model is warmed up, then the models run in turns, the
order rotating at each round, so a drift of the machine (another job, a frequency change) hits them
alike. A round times each model once, back to back, so the ratio of two models' times in one round
compares them under the same load; the ratio reported is the median of those per-round ratios, with a
distribution-free confidence interval for it (:meth:`Timing.interval`): when the interval holds 1.0
the run measured no difference. Timings of two separate runs are not comparable on a shared machine;
ratios from one run are.

    >>> timing = measure_latency({"resnet50": plain, "se": se_model}, batch=4, input_size=(3, 128, 128))
    >>> ratio = timing.ratio("se", "resnet50")   # e.g. 1.07: the retrofit costs 7% more time per batch
    >>> low, high, level = timing.interval("se", "resnet50")  # e.g. 1.04, 1.10, 0.979: a 97.9% interval
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RetrofitError
from ..events import Event, OnEvent, emit, legacy


@dataclass
class Timing:
    """Seconds per forward pass of each model, one sample per round."""

    samples: dict[str, list[float]]
    batch: int
    input_size: tuple[int, ...]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratios(self, name: str, reference: str) -> list[float]:
        """One ratio per round: ``name``'s time over ``reference``'s in the same round."""
        return [a / b for a, b in zip(self.samples[name], self.samples[reference])]

    def ratio(self, name: str, reference: str) -> float:
        """The median of the per-round ratios of ``name`` over ``reference`` (1.05: 5% slower)."""
        return statistics.median(self.ratios(name, reference))

    def interval(self, name: str, reference: str, level: float = 0.95) -> tuple[float, float, float]:
        """``(low, high, coverage)``: a confidence interval for the median per-round ratio, from order
        statistics alone (no normality assumed): the k-th smallest and the k-th largest of the n ratios,
        k the largest with P(Binomial(n, 1/2) <= k - 1) <= (1 - level) / 2, so ``coverage`` =
        1 - 2 P(Binomial(n, 1/2) <= k - 1) >= ``level`` (10 rounds: the 2nd and 9th, 97.9%). Under 6
        rounds no k reaches 95%: the smallest and the largest ratio, with their lower coverage."""
        r = sorted(self.ratios(name, reference))
        n, alpha = len(r), (1 - level) / 2
        k, below = 0, 0.0  # k ratios left out on each side; below = P(Binomial(n, 1/2) <= k - 1)
        while k < n // 2 and below + math.comb(n, k) / 2**n <= alpha:
            below, k = below + math.comb(n, k) / 2**n, k + 1
        if k == 0:
            return r[0], r[-1], 1 - 2 / 2**n
        return r[k - 1], r[n - k], 1 - 2 * below

    def within_noise(self, name: str, reference: str, level: float = 0.95) -> bool:
        """The interval holds 1.0: this run measured no difference between the two."""
        low, high, _ = self.interval(name, reference, level)
        return low <= 1.0 <= high


def measure_latency(
    models: Mapping[str, nn.Module],
    *,
    batch: int = 8,
    input_size: tuple[int, ...] = (3, 224, 224),
    runs: int = 10,
    warmup: int = 2,
    seed: int = 0,
    on_event: OnEvent | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> Timing:
    """Time the forward passes of ``models`` on one random input, interleaved (see the module doc).

    Args:
        models: name -> model; each is put in eval mode (and back in its own mode afterwards).
        batch: images per forward pass.
        input_size: ``(C, H, W)`` of one image.
        runs: timed rounds (each times every model once).
        warmup: untimed rounds per model first (allocator, caches, lazy init).
        on_event: called with a ``round`` :class:`retrofit.Event` after each round, warm-up included
            (``data``: ``done``, ``total``; a progress bar).
        on_round: deprecated: ``on_event``.

    Raises:
        RetrofitError: a bad batch or run count, or a model that lives on the meta device.
    """
    on_event = legacy(on_event, "retrofit.measure_latency", on_round=on_round)
    if batch < 1 or runs < 1 or warmup < 0:
        raise RetrofitError(f"latency needs batch >= 1 and runs >= 1, got batch {batch}, runs {runs}")
    for name, model in models.items():
        if any(p.is_meta for p in model.parameters()):
            raise RetrofitError(f"{name} has no real weights (built on the meta device): latency needs a real model")
    modes = {name: m.training for name, m in models.items()}
    g = torch.Generator().manual_seed(seed)
    first = next((p for m in models.values() for p in m.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    x = torch.randn((batch, *input_size), generator=g).to(device=device, dtype=dtype)
    names = list(models)
    samples: dict[str, list[float]] = {name: [] for name in names}
    try:
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            for w in range(warmup):
                for name in names:
                    models[name](x)
                _round(on_event, w + 1, warmup + runs)
            for i in range(runs):
                k = i % len(names)
                for name in names[k:] + names[:k]:  # rotating order: no model always runs first
                    _sync(device)
                    t = time.perf_counter()
                    models[name](x)
                    _sync(device)
                    samples[name].append(time.perf_counter() - t)
                _round(on_event, warmup + i + 1, warmup + runs)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return Timing(samples, batch, tuple(input_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round(on_event: OnEvent | None, done: int, total: int) -> None:
    emit(on_event, Event("latency", "round", f"round {done}/{total}", {"done": done, "total": total}))
