"""Tables that fit the terminal without cutting what people come for.

A column marked `keep` (a server's name, its URL, its state) is never cut or dropped. When a row
is wider than the terminal, the narrowable columns (a model's name) shrink first, then the others
are dropped in the order the table gives, and a last line says how to see them (`--wide`). Output
to a pipe or a file, or with `--wide`, is every column whole; no line ends in spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.text import Text

GAP = "  "
ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    name: str
    right: bool = False
    keep: bool = False  # never cut, never dropped
    drop: int = 0  # columns with a higher number go first; 0 is dropped last
    narrow_to: int = 0  # may be cut to this many cells (with …) before any column is dropped


Cell = str | Text


def _text(cell: Cell) -> Text:
    return cell if isinstance(cell, Text) else Text(cell)


def _cut(text: Text, width: int) -> Text:
    if text.cell_len <= width:
        return text
    cut = text.copy()
    cut.truncate(max(width - 1, 0))
    cut.append(ELLIPSIS)
    return cut


def fit(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int | None) -> tuple[list[int], dict[int, int], list[str]]:
    """Which columns to show (indexes), the width each narrowed one gets, and the names dropped."""
    natural = [max([cell_len(c.name), *(_text(r[i]).cell_len for r in rows)]) for i, c in enumerate(columns)]
    shown = list(range(len(columns)))
    narrowed: dict[int, int] = {}

    def total() -> int:
        return sum(narrowed.get(i, natural[i]) for i in shown) + len(GAP) * (len(shown) - 1)

    if width is None or total() <= width:
        return shown, narrowed, []
    dropped: list[str] = []
    order = sorted((i for i in shown if not columns[i].keep), key=lambda i: (-columns[i].drop, -i))
    for i in order:  # in the table's order: a narrowable column is narrowed when its turn comes
        if total() <= width:
            break
        c = columns[i]
        if c.narrow_to and natural[i] > c.narrow_to:
            narrowed[i] = max(c.narrow_to, cell_len(c.name), natural[i] - (total() - width))
            continue
        shown.remove(i)
        dropped.append(c.name)
    for i in order:  # still too wide: the narrowed ones go too
        if total() <= width:
            break
        if i in narrowed:
            shown.remove(i)
            del narrowed[i]
            dropped.append(columns[i].name)
    return shown, narrowed, dropped


def render(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int | None, header: bool = True) -> list[Text]:
    """The table's lines: fitted to `width` (None: every column whole), never padded at the end;
    with a last line that names the columns left out, if any."""
    shown, narrowed, dropped = fit(columns, rows, width)
    cells = [[_cut(_text(r[i]), narrowed[i]) if i in narrowed else _text(r[i]) for i in shown] for r in rows]
    heads = [Text(columns[i].name, style="bold") for i in shown]
    widths = [max([heads[k].cell_len if header else 0, *(row[k].cell_len for row in cells)]) for k in range(len(shown))]
    lines = []
    for row in ([heads] if header else []) + cells:
        line = Text()
        for k, cell in enumerate(row):
            pad = widths[k] - cell.cell_len
            last = k == len(row) - 1
            if k:
                line.append(GAP)
            if columns[shown[k]].right:
                line.append(" " * pad)
                line.append_text(cell)
            else:
                line.append_text(cell)
                if not last:
                    line.append(" " * pad)
        line.rstrip()
        lines.append(line)
    if dropped:
        names = ", ".join(name for name in dropped if name) or "sparklines"
        lines.append(Text(f"(more with --wide: {names})", style="dim"))
    return lines


def terminal_width(console_width: int, is_terminal: bool, wide: bool) -> int | None:
    """The width a table must fit: the terminal's, or none for a pipe, a file or --wide."""
    return console_width if is_terminal and not wide else None
