"""worker.markdown: tables whose cells cannot break the columns."""

from __future__ import annotations

from worker.markdown import escape_cell, markdown_table


def _cells(line: str) -> list[str]:
    """A row's cells as a Markdown reader splits them: at pipes not preceded by a backslash."""
    inner = line.strip()[1:-1]
    cells, cell, i = [], "", 0
    while i < len(inner):
        if inner[i] == "\\" and inner[i + 1 : i + 2] == "|":
            cell += "\\|"
            i += 2
            continue
        if inner[i] == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += inner[i]
        i += 1
    return [*cells, cell.strip()]


def test_a_pipe_in_a_cell_keeps_the_columns() -> None:
    lines = markdown_table(("source", "n"), [("a|b", 3), ("line\nbreak", "")])
    assert lines[0] == "| source | n |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| a\\|b | 3 |"
    assert [len(_cells(line)) for line in lines] == [2, 2, 2, 2]
    assert _cells(lines[3]) == ["line break", ""]


def test_escape_cell_leaves_plain_text_alone() -> None:
    assert escape_cell("0.704 (0.628-0.769)") == "0.704 (0.628-0.769)"
    assert escape_cell(12) == "12"
    assert escape_cell("x | y") == "x \\| y"
