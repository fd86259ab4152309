"""Model cards: a markdown ``<name>.README.md`` next to each saved model or adapter (PEFT writes a
``README.md`` beside its adapters; here one folder can hold several models, so each card is named after
its file and two outputs never overwrite each other's card).

A card says what the file is and how to load it: the base model (architecture, the weights it was made
on, for an adapter the sha256 it checks), the recipe, the blocks' overhead, the file's size against the
full model's, the fine-tuning results when there was a fine-tune, the date and the command line. Its
facts about the file are read back from the file itself. It is written atomically, like the weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import timm
import torch
from rich.table import Table
from torch import nn

from ..errors import RetrofitError
from ..measure.fit import FitTable
from ..measure.report import overhead_table, results_table
from ..surgery.info import FOLD_KINDS
from .adapter import state_bytes
from .atomic import atomic_write
from .header import Header, read_header


def card_path(weights: str | Path) -> Path:
    """``se_resnet50.safetensors`` -> ``se_resnet50.README.md``."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}.README.md")


def write_card(
    weights: str | Path,
    model: nn.Module | None = None,
    *,
    overhead: Any = None,
    result: Any = None,
    command: str | None = None,
    base_name: str | None = None,
) -> Path:
    """Write the card of the retrofit file ``weights`` (already saved) and return its path.

    Args:
        weights: a file written by :func:`retrofit.save` (full model or adapter).
        model: the model it was saved from (for the full model's size next to an adapter's).
        overhead: a :class:`retrofit.Overhead` (add-se's report) for the overhead table.
        result: a :class:`retrofit.FinetuneResult` for the fine-tuning table.
        command: the command line that made the file.
        base_name: what the base is, when the file does not say (a full model's card).
    """
    weights = Path(weights)
    header = read_header(weights)
    load = (
        f'retrofit.load("{weights.name}", base="BASE_WEIGHTS")  # or base=the base nn.Module'
        if header.adapter
        else f'retrofit.load("{weights.name}")'
        if header.architecture
        else f'retrofit.load("{weights.name}", base=MyNet())  # the plain network'
    )
    lines = card_lines(
        header,
        weights.stem,
        weights.name,
        weights.stat().st_size,
        load,
        model=model,
        overhead=overhead,
        result=result,
        command=command,
        base_name=base_name,
    )
    return write_text(card_path(weights), "\n".join(lines) + "\n", weights.name)


def card_lines(
    header: Header,
    title: str,
    file_name: str,
    size: int,
    load: str,
    *,
    model: nn.Module | None = None,
    overhead: Any = None,
    result: Any = None,
    command: str | None = None,
    base_name: str | None = None,
    target: str | None = None,
) -> list[str]:
    """The markdown of a card (see the module doc): ``header`` describes the saved file ``file_name`` of
    ``size`` bytes, ``load`` is the Python line that loads it, ``target`` what a command is given (default:
    the file; a folder's name for a folder)."""
    retrofit_version = version("retrofit")
    arch = header.architecture or "a network that is not from timm"
    kind = "adapter" if header.adapter else "retrofitted model"
    lines = [
        f"# {title}",
        "",
        f"{'An adapter' if header.adapter else 'A model'}: `{arch}` with {header.blocks} `{header.recipe.module}` "
        f"block(s) inserted by retrofit {retrofit_version} (recipe: {header.recipe.describe()}).",
        "",
        "## Base model",
        "",
        f"- architecture: `{arch}`" + (" (timm)" if header.architecture else ""),
        f"- constructor arguments: `{json.dumps(header.model_kwargs)}`; traced at input "
        f"{'x'.join(map(str, header.input_size))}",
    ]
    name = header.base_name if header.adapter else base_name
    if name:
        lines.append(f"- base weights: {name}")
    if header.adapter:
        lines.append(
            f"- sha256 of the {header.base_tensors} base tensors it takes from the base (name, dtype, "
            f"shape, bytes; checked on load): `{header.base_sha256}`"
        )
    lines += ["", "## Loading", "", "```python", "import retrofit", "", f"model = {load}", "```", ""]
    if header.adapter:
        lines += [
            f"or `retrofit finetune {target or file_name} --base BASE_WEIGHTS --data DIR` to fine-tune it further.",
            "",
        ]
    lines += ["## Recipe", "", "```json", json.dumps(header.recipe.to_dict(), indent=2), "```", ""]
    lines += _folds_section(header.folds, header.blocks)
    if overhead is not None:
        lines += ["## Overhead", "", table_markdown(overhead_table(overhead)), ""]
    lines += ["## File", "", "| file | size |", "| --- | --- |", f"| `{file_name}` ({kind}) | {_mb(size)} |"]
    if header.adapter and model is not None:
        full = state_bytes(model)
        lines.append(f"| the full model's weights | {_mb(full)} (the adapter is {100 * size / full:.1f}%) |")
    lines.append("")
    if result is not None:
        lines += [
            "## Fine-tuning",
            "",
            table_markdown(results_table(result, title="")),
            f"Best by val top-1: {result.best['name']} ({result.best['top1']:.2f}%); {len(result.classes)} classes.",
            "",
        ]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "## Provenance",
        "",
        f"- written {now}; retrofit {retrofit_version}, torch {torch.__version__}, timm "
        f"{timm.__version__}, Python {platform.python_version()}",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    return lines


def write_text(path: Path, text: str, saved: str) -> Path:
    """Write a card atomically; a failure says that the weights (``saved``) are saved all the same."""
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except RetrofitError as err:
        raise RetrofitError(f"{err} ({saved} itself is saved)") from None
    return path


def _folds_section(folds: list, blocks: int) -> list[str]:
    """The blocks ``retrofit fold`` replaced by constant scales, and where each went."""
    if not folds:
        return []
    kept = blocks - len(folds)
    verb = "computes" if kept == 1 else "compute"
    lines = [
        "## Folded blocks",
        "",
        f"{len(folds)} of the {blocks} blocks were folded by `retrofit fold` into "
        "constant "
        f"scales ({kept} still {verb} an excitation). `retrofit.strip` removes the blocks and channel scales "
        f"and keeps the scales folded into neighbours; `retrofit.bypass` computes the same network.",
        "",
        "| block | folded into |",
        "| --- | --- |",
    ]
    lines += [
        f"| `{f.path}` | {FOLD_KINDS[f.into]}" + (f" (`{f.neighbour}`)" if f.neighbour else "") + " |" for f in folds
    ]
    return lines + [""]


def command_line() -> str:
    """The command line of this process, as a user would type it (``retrofit add-se ...``)."""
    return shlex.join(["retrofit", *sys.argv[1:]])


def table_markdown(table: Table | FitTable) -> str:
    """A table the CLI prints as a markdown table: title, header, rows, caption (every column: a card is
    not a console)."""
    if isinstance(table, FitTable):
        table = table.full()
    columns = table.columns
    rows = list(zip(*[[str(c) for c in col.cells] for col in columns])) if columns else []
    out = [f"**{table.title}**", ""] if table.title else []
    out.append("| " + " | ".join(str(c.header) or " " for c in columns) + " |")
    out.append("| " + " | ".join("---:" if c.justify == "right" else "---" for c in columns) + " |")
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    if table.caption:
        out += ["", f"{table.caption}"]
    return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n:,} bytes)"
