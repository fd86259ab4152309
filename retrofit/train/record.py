"""The metrics of a run: one row per evaluation, and the best one with the weights it measured."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Record:
    """The rows of a run (``original``, ``step 0``, ``epoch 1``...: the lines of ``metrics.jsonl``) and
    the best row by val top-1 (the original does not compete), with a copy of the weights it measured
    (the model's, or the EMA's) and which module they came from."""

    def __init__(self, rows: list[dict[str, Any]] | None = None, best: dict[str, Any] | None = None):
        self.rows: list[dict[str, Any]] = rows if rows is not None else []
        self.best = best
        self.best_module: nn.Module | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None  # None: the best came before a resume

    def add(self, name: str, epoch: int, phase: int, train: dict | None, val: dict, module: nn.Module) -> dict:
        """Add a row (``train``: the epoch's training numbers, None for an evaluation only; ``val``: its
        validation numbers) and return it; a new best is kept in memory, its weights copied."""
        row = dict(name=name, epoch=epoch, phase=phase, train_loss=None, lr=None, train_images=None, **val)
        row.update(train or {})
        self.rows.append(row)
        if name != "original" and (self.best is None or row["top1"] > self.best["top1"]):
            self.best = row
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            self.best_module = module
        return row
