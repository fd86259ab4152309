"""Tables that fit the console they are printed on: a number or a name is never cut or wrapped.

rich lays a table out by shrinking columns, and when they do not fit it shrinks every one of them, a
``no_wrap`` or ``min_width`` column too, so ``4,777,712`` becomes ``4,777,7`` over ``12``; it never
leaves a column out. :class:`FitTable` does that part: it is a rich renderable that builds its
:class:`rich.table.Table` when it is printed, for the width of that console (``Console(width=80)`` in a
test, the terminal in use), so the caller still writes ``console.print(table)``.

* Every column but a free-text one is exactly as wide as its widest cell (or the longest word of its
  header, which wraps at spaces only) and never wraps.
* When the columns do not fit, the optional ones go, lowest ``drop`` first, and the caption names them;
  headline columns (``drop=None``) always stay.
* A free-text column (``text=True``: a note, a reason) takes the width left and folds there.
* A column empty in every row is left out (it says nothing).
* When even the headline columns do not fit, each row is printed as ``header: value`` lines instead,
  one block per row.

    >>> from rich.console import Console
    >>> t = FitTable([Col("model", "left"), Col("params"), Col("% MACs", drop=1)], title="Sweep")
    >>> t.add_row("resnet50", "2,530,992", "0.06%")
    >>> Console(width=80).print(t)
    Sweep
    ┏━━━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━┓
    ┃ model    ┃    params ┃ % MACs ┃
    ┡━━━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━┩
    │ resnet50 │ 2,530,992 │  0.06% │
    └──────────┴───────────┴────────┘
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Group
from rich.table import Table
from rich.text import Text

TEXT_MIN = 20  # the narrowest a free-text column gets before optional columns go for it


@dataclass(frozen=True)
class Col:
    """One column: ``drop`` None for a headline column (never left out), else its place in the order
    the optional columns are left out in (lowest first); ``text`` for free text that may fold."""

    header: str
    justify: str = "right"
    drop: int | None = None
    text: bool = False


def _width(cell: str) -> int:
    return max((cell_len(line) for line in cell.splitlines()), default=0)


class FitTable:
    """A table of text cells laid out for the width it is printed at (see the module doc).

    ``elsewhere``: where a user finds the columns a narrow console leaves out (said in the caption).
    """

    def __init__(
        self, columns: list[Col], *, title: str | None = None, caption: str | None = None, elsewhere: str = "--json"
    ):
        self.columns, self.title, self.caption, self.elsewhere = list(columns), title, caption, elsewhere
        self.rows: list[tuple[list[str], str | None, bool]] = []  # cells, style, a section line before it
        self._section = False

    def add_row(self, *cells: str, style: str | None = None) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(([str(c) for c in cells], style, self._section))
        self._section = False

    def add_section(self) -> None:
        """A line between the rows added so far and the next one."""
        self._section = True

    def _need(self, i: int) -> int:
        """Column ``i``'s width: its widest cell and its header's longest word (free text: at most TEXT_MIN)."""
        col = self.columns[i]
        word = max((cell_len(w) for w in col.header.split()), default=0)
        cells = max((_width(cells[i]) for cells, _, _ in self.rows), default=0)
        return max(word, min(cells, TEXT_MIN) if col.text else cells)

    def _filled(self) -> list[int]:
        return [i for i in range(len(self.columns)) if any(cells[i] for cells, _, _ in self.rows)]

    def _total(self, shown: list[int]) -> int:
        return sum(self._need(i) for i in shown) + 3 * len(shown) + 1  # padding 1 + 1 and a border each, one more

    def layout(self, width: int) -> list[int] | None:
        """The indices of the columns shown at ``width``, or None when the headline ones alone do not fit."""
        shown = self._filled()
        optional = sorted((i for i in shown if self.columns[i].drop is not None), key=lambda i: self.columns[i].drop)
        for i in optional:
            if self._total(shown) <= width:
                break
            shown.remove(i)
        return shown if self._total(shown) <= width else None

    def table(self, width: int) -> Table | Group:
        """The rich table for a console ``width`` columns wide (the narrow lines when it is too narrow)."""
        shown = self.layout(width)
        if shown is None:
            return self._narrow()
        gone = [self.columns[i].header for i in self._filled() if i not in shown]
        caption = self.caption
        if gone:
            caption = (f"{caption} " if caption else "") + (
                f"Not shown at this width: {', '.join(gone)} (a wider terminal or {self.elsewhere} has them)."
            )
        table = Table(title=self.title, title_justify="left", caption=caption, caption_justify="left")
        widths = self._widen(shown, width)
        for i in shown:
            col, need = self.columns[i], widths[i]
            header = "\n".join(textwrap.wrap(col.header, need, break_long_words=False, break_on_hyphens=False))
            if col.text:  # the width the others leave, up to its longest cell; folds inside it
                rest = width - self._total(shown) - sum(widths.values()) + sum(self._need(j) for j in shown) + need
                table.add_column(
                    header, justify=col.justify, overflow="fold", min_width=need, max_width=max(need, rest)
                )
            else:
                table.add_column(header, justify=col.justify, no_wrap=True, min_width=need)
        for cells, style, section in self.rows:
            if section:
                table.add_section()
            table.add_row(*(Text(cells[i]) for i in shown), style=style)
        return table

    def _widen(self, shown: list[int], width: int) -> dict[int, int]:
        """Each shown column's width: what it needs, or its whole header on one line where the width left
        allows (left to right; a free-text column keeps what it needs and takes the rest later)."""
        widths = {i: self._need(i) for i in shown}
        spare = width - self._total(shown)
        for i in shown:
            more = cell_len(self.columns[i].header) - widths[i]
            if 0 < more <= spare and not self.columns[i].text:
                widths[i] += more
                spare -= more
        return widths

    def _narrow(self) -> Group:
        """One block per row, a ``header: value`` line per cell, no borders: for a console too narrow for
        the headline columns (the lines wrap at spaces only where a value is longer than the console)."""
        lines: list = [Text(self.title, style="italic")] if self.title else []
        for n, (cells, style, _) in enumerate(self.rows):
            if n:
                lines.append(Text(""))
            lines += [
                Text(f"{col.header or ' '}: {cell}", style=style or "")
                for col, cell in zip(self.columns, cells)
                if cell
            ]
        if self.caption:
            lines.append(Text(self.caption))
        return Group(*lines)

    def full(self) -> Table:
        """Every column, headers as given, nothing fitted: for text that is no console (a model card)."""
        table = Table(title=self.title, caption=self.caption)
        for col in self.columns:
            table.add_column(col.header, justify=col.justify)
        for cells, style, _ in self.rows:
            table.add_row(*cells, style=style)
        return table

    def __rich_console__(self, console, options):
        yield self.table(options.max_width)
