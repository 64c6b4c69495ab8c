"""Progress on stderr, only where a person is watching.

Bars appear only when stderr is a terminal, `--quiet` is off and TERM is not
"dumb"; NO_COLOR removes colour. Stages call `progress()`/`track()` and never
ask where output goes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_enabled: bool | None = None


def configure(*, quiet: bool) -> None:
    """Decide once, from the CLI, whether bars are drawn."""
    global _enabled
    _enabled = (not quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb")


def enabled() -> bool:
    return bool(_enabled)


#: The width rich lays tables out in when its stream is a pipe or a file: rich would
#: otherwise assume 80 columns and cut cells ("2026112…"); a reader of a log or `less -S`
#: wants whole values. Tables still take only the width they need.
PIPE_WIDTH = 1000


def console(*, stdout: bool = False) -> Any:
    """A rich console on stderr (or stdout) that honours NO_COLOR and TERM=dumb, and
    never cuts a table to 80 columns when the stream is not a terminal."""
    from rich.console import Console

    stream = sys.stdout if stdout else sys.stderr
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(file=stream, no_color="NO_COLOR" in os.environ or None,
                   force_terminal=None, width=PIPE_WIDTH if piped else None)


@contextlib.contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Callable[[float], None]]:
    """Yields `advance(n)`; draws a rich bar on stderr only when enabled."""
    if not enabled():
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def track(items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    with progress(description, total) as advance:
        for item in items:
            yield item
            advance(1)
