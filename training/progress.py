"""Progress bars on long work (caching, training epochs), drawn with rich on stderr.

Off when stderr is not a terminal, so that a log file (the GPU host's, CI's) gets no bars.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")


def progress(
    items: Iterable[T], description: str, total: int | None = None, transient: bool = False
) -> Iterator[T]:
    """`items`, with a bar while they are consumed; `transient` removes the bar when done."""
    console = Console(stderr=True)
    yield from track(
        items,
        description=description,
        total=total,
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )
