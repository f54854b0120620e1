"""Markdown tables for reports, model cards and benchmarks (plain Python: the node may import it).

A `|` inside a cell would end the cell and shift every column after it, so each cell is
escaped (`\\|`); the table's own pipes are the only bare ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def escape_cell(value: object) -> str:
    """The cell's text with `|` escaped and line breaks (which end a table row) as spaces."""
    text = str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return text.replace("|", "\\|")


def table_row(cells: Iterable[object]) -> str:
    """`| a | b |`."""
    return "| " + " | ".join(map(escape_cell, cells)) + " |"


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """The table's lines: header, `|---|` separator, one line per row."""
    return [table_row(header), "|" + "---|" * len(header), *(table_row(r) for r in rows)]
