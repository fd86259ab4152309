"""The tune of a timm model by name: what ``retrofit tune MODEL`` computes, as one library call.

>>> result = retrofit.tune_model("test_resnet", "data/", {"r": [4, 16], "position": ["post"]}, num_classes=3,
...                              input_size=(3, 32, 32), trials=2, epochs=1, finalists=0, batch_size=8)
>>> (result.output_dir / "tune.json").is_file()
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...files.create import build_named
from ...measure.meta import build_and_scan
from .api import SEARCH_SEED, TuneResult, tune


def tune_model(
    name: str,
    data: str | Path,
    space: Any = None,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | str | None = None,
    input_size: Any = None,
    search_seed: int = SEARCH_SEED,
    output_dir: str | Path | None = None,
    **kwargs: Any,
) -> TuneResult:
    """Build the timm model ``name`` (weights from ``checkpoint``, timm's ``pretrained`` ones, or random ones
    drawn from ``search_seed``, so every process and a rerun build the same model and resume the same study)
    and :func:`retrofit.tune` it on ``data`` over ``space``; ``output_dir`` defaults to ``NAME-tune/``, the
    other keyword arguments are :func:`retrofit.tune`'s (``trials``, ``budget``, ``config``, ``epochs``...).
    """
    weightless = checkpoint is None and not pretrained
    net, found = build_and_scan(
        lambda: build_named(name, checkpoint, pretrained, num_classes, seed=search_seed if weightless else None),
        input_size,
        meta=False,
    )
    out = Path(output_dir).expanduser() if output_dir is not None else Path(f"{name}-tune")
    return tune(
        net,
        data,
        space,
        input_size=found.traced.input_size,
        search_seed=search_seed,
        output_dir=out,
        found=found,
        **kwargs,
    )
