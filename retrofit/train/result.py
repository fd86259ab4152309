"""What a fine-tune measured: :class:`FinetuneResult` (what decides it: :mod:`retrofit.train.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
