"""The clean report's view: a clean artifact's figures as rich tables for the terminal,
and the warnings they call for.

One of the three views of `personanet.stages.clean.CleanReport` (the manifest and
`--json` show the same dict). It reads the figures as recorded, so a report read
back from any clean artifact's manifest renders the same way; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from personanet.cleaning.rows import ColumnCounts

if TYPE_CHECKING:
    from rich.console import RenderableType

    from personanet.config import Config

log = logging.getLogger("personanet")

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


def clean_warnings(figures: Mapping[str, Any], config: Config) -> list[str]:
    """What the user must hear about a new clean artifact (said once, when it is made,
    and logged here): an empty side, and a column most of whose values did not parse (an
    export that writes "31/12/2025" or "1.234,5" would otherwise be imputed quietly, row
    after row). Counts only, never a value."""
    warnings = []
    train, test = int(figures["rows_train"]), int(figures["rows_test"])
    if train == 0 or test == 0:
        warnings.append(f"clean left {train} train and {test} test rows: see "
                        "quarantined_by_reason and the split settings")
    kept = train + test
    for name, counts in (figures.get("columns") or {}).items():
        col = config.columns.get(name)
        if col is None:
            continue
        invalid, other = int(counts.get("invalid") or 0), int(counts.get("other") or 0)
        if col.kind in ("numeric", "datetime") and invalid and invalid * 2 >= kept:
            fix = (f"list its formats in columns.{name}.formats, e.g. [\"%d/%m/%Y %H:%M\"]"
                   if col.kind == "datetime" else
                   f"set columns.{name}.decimal / thousands for numbers such as 1.234,5")
            warnings.append(f"columns.{name}: {invalid} of the {kept} kept rows hold a value "
                            f"that did not parse as a {col.kind} (treated as missing, then "
                            f"imputed): {fix}")
        if col.kind == "categorical" and other and other * 2 >= kept:
            warnings.append(f"columns.{name}: {other} of the {kept} kept rows hold a value "
                            f"outside its categories (now \"__other__\"): declare the "
                            f"source's spellings in columns.{name}.aliases, or fix "
                            f"columns.{name}.categories")
    rows_in = int(figures.get("rows_in") or 0)
    for name, count in (figures.get("quarantined_by_column") or {}).items():
        if rows_in and int(count) * 2 >= rows_in:
            col = config.columns.get(name)
            hint = (f"; if the source spells its categories its own way, declare them in "
                    f"columns.{name}.aliases" if col is not None and col.kind == "categorical"
                    else "")
            warnings.append(f"columns.{name}: {count} of the {rows_in} rows were quarantined "
                            f"for this column (see quarantined_by_reason){hint}")
    for warning in warnings:
        log.warning(warning)
    return warnings
