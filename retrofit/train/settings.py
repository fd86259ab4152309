"""What decides a fine-tune's result (:class:`Settings`, checked in one place) and what it measured
(:class:`FinetuneResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RetrofitError, excerpt


@dataclass
class Settings:
    """The knobs that decide the result; a resumed run must use the same ones."""

    epochs: int = 1
    phase2_epochs: int = 0
    lr: float = 1e-3
    phase2_lr: float | None = None  # default: lr / 10
    batch_size: int = 32
    accum_steps: int = 1
    opt: str = "adamw"
    weight_decay: float = 0.0
    sched: str = "cosine"
    warmup_epochs: int = 0
    seed: int = 0
    augment: bool = True
    train_head: bool | None = None  # default: only when the classifier is new
    train_norms: bool = False       # phase 1 also trains the norm layers' affine parameters
    backbone_lr_scale: float = 1.0  # the parameters that are not new train at the phase's lr x this
    smoothing: float = 0.1          # timm's default, and benchmarks/transfer.py's finding (README)
    mixup: float = 0.0
    cutmix: float = 0.0
    distill: bool = False
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    ema_decay: float | None = None  # None: no model EMA
    clip_grad: float | None = None  # None: no gradient clipping
    clip_mode: str = "norm"
    channels_last: bool = False

    def check(self) -> None:
        """One clear error for a value out of range."""
        for name in ("epochs", "phase2_epochs", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise RetrofitError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.epochs + self.phase2_epochs < 1:
            raise RetrofitError("nothing to train: give epochs (phase 1) or phase2_epochs of at least 1")
        for name, ok, what in (
                ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"), ("mixup", self.mixup >= 0, "0 or more"),
                ("cutmix", self.cutmix >= 0, "0 or more"), ("distill_weight", self.distill_weight >= 0, "0 or more"),
                ("distill_temperature", self.distill_temperature > 0, "positive"),
                ("backbone_lr_scale", self.backbone_lr_scale >= 0, "0 or more"),
                ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "in (0, 1)"),
                ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "positive"),
                ("clip_mode", self.clip_mode in ("norm", "value", "agc"), "norm, value or agc")):
            if not ok:
                raise RetrofitError(f"{name} must be {what}, got {excerpt(getattr(self, name))}")


@dataclass
class FinetuneResult:
    """What :func:`finetune` measured. ``rows``: one dict per evaluation (``original``, ``step 0``,
    ``epoch 1``...), the same dicts as the lines of ``metrics.jsonl``."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    skipped_images: int = 0
    output_dir: Path | None = None
    classes: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["name"] == name)
