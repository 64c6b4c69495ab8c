"""How a stage's result is shown: one JSON object, one line per stage, and a rich view.

stdout carries the result (`--json`: exactly one object; otherwise one line per
stage, easy to parse with `cut`); the rich view goes to stderr, so it never
mixes with what a script reads. Every view is built from the same
`StageResult` figures.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from personanet.cli import context

if TYPE_CHECKING:
    from personanet.stages.base import StageResult

#: the figures `run`'s summary table shows per stage
HEADLINES = {
    "collect": ("rows", "columns_dropped"),
    "clean": ("rows_train", "rows_test", "duplicates_removed", "rows_quarantined",
              "rows_dropped_by_bounding"),
    "train": ("private", "epsilon", "delta", "steps", "final_loss", "device"),
    "evaluate": ("accuracy", "roc_auc", "largest_group_gap", "attack_auc",
                 "epsilon_lower_bound", "gates_failed"),
    "predict": ("rows_scored", "rows_rejected", "model_private"),
}


def emit(results: list[StageResult] | StageResult, *, extra: dict[str, Any] | None = None
         ) -> None:
    """stdout: one JSON object (--json) or one line per stage; the table goes to stderr."""
    options = context.options
    items = results if isinstance(results, list) else [results]
    if options.json:
        if len(items) == 1 and not extra:
            payload = items[0].to_json()
        else:
            payload = {"stage": options.command, "stages": [r.to_json() for r in items],
                       **(extra or {})}
        context.print_json(payload)
        return
    for r in items:
        reused = "reused" if r.reused else "new"
        rows = r.figures.get("rows")
        figures = f" rows={rows}" if rows is not None else ""
        sys.stdout.write(f"{r.stage} {r.version} {reused}{figures} {r.path}\n")
    if not options.quiet and options.log_format == "text":
        _render_summary(items)


def _render_summary(items: list[StageResult]) -> None:
    """A stage's own view of its figures on stderr, or one table for several stages."""
    from rich.table import Table

    from personanet.ui import console

    if len(items) == 1:
        view = _stage_view(items[0])
        if view is not None:
            console().print(view)
            return

    table = Table(title="personanet", show_header=True, header_style="bold")
    for column in ("stage", "version", "reused", "figures"):
        table.add_column(column)
    for r in items:
        names = HEADLINES.get(r.stage, ())
        shown = {k: r.figures[k] for k in names if r.figures.get(k) not in (None, [], {})}
        table.add_row(r.stage, r.version, "yes" if r.reused else "no",
                      ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
    console().print(table)


def _stage_view(result: StageResult) -> Any:
    """The stage's own rich view (clean's report, evaluate's summary), or None for a table."""
    if result.stage == "clean":
        from personanet.reporting.clean_view import render_report

        return render_report(result.figures)
    if result.stage == "evaluate":
        from personanet.reporting.report import render_summary
        from personanet.stages.files import METRICS

        return render_summary(json.loads((result.path / METRICS).read_text("utf-8")))
    return None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
