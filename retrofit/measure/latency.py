"""Forward latency of a retrofitted model relative to its original, measured side by side.

One process, one input, inference mode: every model is warmed up, then the models run in turns, the
order rotating at each round, so a drift of the machine (another job, a frequency change) hits them
alike; each model's time is the median of its rounds, and the ratio is taken between medians of the
same run. Timings of two separate runs are not comparable on a shared machine; ratios from one run are.

    >>> timing = measure_latency({"resnet50": plain, "se": se_model}, batch=8, input_size=(3, 224, 224))
    >>> timing.ratio("se", "resnet50")      # e.g. 1.07: the retrofit costs 7% more time per batch
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..errors import RetrofitError


@dataclass
class Timing:
    """Seconds per forward pass of each model, one sample per round."""

    samples: dict[str, list[float]]
    batch: int
    input_size: tuple[int, ...]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median time of ``name`` over median time of ``reference`` (1.05: 5% slower)."""
        return self.median(name) / self.median(reference)


def measure_latency(models: Mapping[str, nn.Module], *, batch: int = 8,
                    input_size: tuple[int, ...] = (3, 224, 224), runs: int = 10, warmup: int = 2,
                    seed: int = 0) -> Timing:
    """Time the forward passes of ``models`` on one random input, interleaved (see the module doc).

    Args:
        models: name -> model; each is put in eval mode (and back in its own mode afterwards).
        batch: images per forward pass.
        input_size: ``(C, H, W)`` of one image.
        runs: timed rounds per model (the median is reported).
        warmup: untimed rounds per model first (allocator, caches, lazy init).

    Raises:
        RetrofitError: a bad batch or run count, or a model that lives on the meta device.
    """
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
            for _ in range(warmup):
                for name in names:
                    models[name](x)
            for i in range(runs):
                k = i % len(names)
                for name in names[k:] + names[:k]:  # rotating order: no model always runs first
                    _sync(device)
                    t = time.perf_counter()
                    models[name](x)
                    _sync(device)
                    samples[name].append(time.perf_counter() - t)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return Timing(samples, batch, tuple(input_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
