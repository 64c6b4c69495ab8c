"""The clean report's view: a clean artifact's figures as rich tables for the terminal.

One of the three views of `personanet.stages.clean.CleanReport` (the manifest and
`--json` show the same dict). It reads the figures as recorded, so a report read
back from any clean artifact's manifest renders the same way; nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from personanet.cleaning.rows import ColumnCounts

if TYPE_CHECKING:
    from rich.console import RenderableType

#: the per-column counters, in the order the table shows them
COUNTERS = tuple(f.name for f in dataclasses.fields(ColumnCounts))


def render_report(figures: Mapping[str, Any]) -> RenderableType:
    """A clean artifact's figures (`CleanReport.to_dict()`) as rich tables (the CLI prints
    them on stderr)."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="clean", show_header=False, title_justify="left")
    summary.add_column("what")
    summary.add_column("rows", justify="right")
    summary.add_row("rows in", f"{figures['rows_in']:,}")
    summary.add_row("train", f"{figures['rows_train']:,} ({figures['units_train']:,} people)")
    summary.add_row("test", f"{figures['rows_test']:,} ({figures['units_test']:,} people)")
    summary.add_row("duplicates (exact)", f"{figures['duplicates_exact']:,}")
    summary.add_row("duplicates (by key)", f"{figures['duplicates_by_key']:,}")
    summary.add_row("quarantined", f"{figures['rows_quarantined']:,}")
    for reason, count in figures["quarantined_by_reason"].items():
        summary.add_row(f"  {reason}", f"{count:,}")
    summary.add_row("dropped by bounding", f"{figures['rows_dropped_by_bounding']:,}")
    summary.add_row("split", figures["split_by"])

    columns = Table(title="values per column (train + test)", title_justify="left")
    columns.add_column("column")
    for kind in (*COUNTERS, "quarantined"):
        columns.add_column(kind, justify="right")
    for name, counts in figures.get("columns", {}).items():
        shown = [counts.get(kind, 0) for kind in COUNTERS]
        shown.append(figures["quarantined_by_column"].get(name, 0))
        columns.add_row(name, *(f"{n:,}" if n else "-" for n in shown))
    return Group(summary, columns)
