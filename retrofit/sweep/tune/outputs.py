"""The files of a tune in its output folder, each written atomically (:func:`retrofit.files.atomic.atomic_write`):

* ``trials.jsonl``: one JSON line per trial (its recipe, costs, epochs, top-1, state, fine-tune rows),
  rewritten after each trial: an export of the store, which stays the source of truth;
* ``tune.json``: the trials, the summary, the finish rows, the verdict, the winner, the identity;
* ``best_recipe.yaml``: the winner's recipe (per-stage maps included), which ``add-se --recipe`` takes; its
  searched fine-tune settings (learning rate, phase-2 epochs) are in a comment, a recipe having no such keys;
* ``best.safetensors`` (``adapter.safetensors`` with ``adapter=True``): the winner's model of the finish's
  first seed, moved from ``finalists/`` where its job saved it (on the machine that ran that job).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ...files.atomic import atomic_write
from ..rows import SweepRow
from .finish import FINALISTS

TRIALS, TUNE, BEST_RECIPE, BEST_MODEL, BEST_ADAPTER = (
    "trials.jsonl",
    "tune.json",
    "best_recipe.yaml",
    "best.safetensors",
    "adapter.safetensors",
)


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_trials(out: Path, rows: list[dict[str, Any]]) -> None:
    write_text(out / TRIALS, "".join(json.dumps(r) + "\n" for r in rows))


def write_best_recipe(out: Path, best: SweepRow, trials: int) -> Path:
    """``best_recipe.yaml``: the recipe, headed by what chose it."""
    header = [
        f"# retrofit tune: the best of {trials} trials (trial {best.trial}), re-run over seeds "
        f"{','.join(map(str, best.seeds))}: top-1 {best.top1:.2f} ± {best.top1_std:.2f}%"
    ]
    if best.delta_top1 is not None:
        ci = f" [95% CI {best.delta_top1_ci[0]:+.2f}, {best.delta_top1_ci[1]:+.2f}]" if best.delta_top1_ci else ""
        header.append(f"# against the control '{best.control}': Δ top-1 {best.delta_top1:+.2f}{ci}")
    if best.train:
        header.append(
            "# fine-tune it with " + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in best.train.items())
        )
    header.append("# retrofit add-se MODEL --recipe best_recipe.yaml")
    body = yaml.safe_dump(best.recipe.to_dict(), sort_keys=False)
    path = out / BEST_RECIPE
    write_text(path, "\n".join(header) + "\n" + body)
    return path


def place_winner(out: Path, trial: int, adapter: bool) -> Path | None:
    """Move the winner's model from ``finalists/`` to ``best.safetensors`` (or ``adapter.safetensors``) and
    remove the other finalists' models; None when its job ran on another machine (another output folder).
    Several processes on one folder may do this at once: whoever comes second finds it done."""
    folder = out / FINALISTS
    target = out / (BEST_ADAPTER if adapter else BEST_MODEL)
    source = folder / f"trial-{trial}.safetensors"
    try:
        os.replace(source, target)
    except FileNotFoundError:
        pass
    for other in folder.glob("trial-*.safetensors") if folder.is_dir() else ():
        other.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    return target if target.is_file() else None


def write_tune_json(out: Path, data: dict[str, Any]) -> None:
    write_text(out / TUNE, json.dumps(data, indent=2) + "\n")
