"""Progress bars for the fine-tuning run: rich bars on stderr on rank 0, nothing elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bars
from rich.text import Text


class Progress:
    """One display for the whole run; each epoch's training and each evaluation is a task on it.

    Disabled (``enabled=False``: other ranks, ``progress=False``) every method is a no-op, so the
    training code calls it unconditionally.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bars = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bars = Bars(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bars is not None:
            self._bars.__exit__(*exc)
            self._bars = None

    def note(self, text: str) -> None:
        """One line of text above the bars (as text: never read as markup)."""
        if self._bars is not None:
            self._bars.console.print(Text(text), soft_wrap=True)

    def task(self, label: str, total: int):
        return self._bars.add_task(label, total=total, info="") if self._bars is not None else None

    def advance(self, task, loss: float | None = None) -> None:
        if task is not None and self._bars is not None:
            self._bars.update(task, advance=1, info=f"loss {loss:.4f}" if loss is not None else "")
