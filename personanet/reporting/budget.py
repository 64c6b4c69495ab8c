"""The privacy budget as rich tables: what ``personanet budget show`` draws.

It renders the summary `personanet.privacy.ledger.budget_summary` computes (a plain dict,
also what ``--json`` prints), so the figures have one source and this module only lays
them out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Group
    from rich.table import Table


def render_budget(summary: dict[str, Any]) -> Group:
    """The ledger as rich tables: the pinned budget and its changes, then one row per run
    (totals in the caption)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if summary.get("pinned"):
        head = (f"budget pinned in the ledger: epsilon {summary['pinned_epsilon']:g}, delta "
                f"{summary['pinned_delta']:g}")
        if summary["config_above_pin"]:
            head += (f" (the config asks for epsilon {summary['config_epsilon']:g}, delta "
                     f"{summary['config_delta']:g}: training is refused until it is lowered "
                     "or `personanet budget set` raises the pin)")
        elif (summary["config_epsilon"], summary["config_delta"]) != (
                summary["pinned_epsilon"], summary["pinned_delta"]):
            head += (f"; the config's stricter epsilon {summary['config_epsilon']:g}, delta "
                     f"{summary['config_delta']:g} applies")
    else:
        head = (f"budget not pinned yet: the next private run pins the config's epsilon "
                f"{summary['config_epsilon']:g}, delta {summary['config_delta']:g}")
    if not summary.get("authenticated", True):
        head += "\nnot authenticated: no key loaded, the ledger's seal was not checked"
    parts: list[Any] = [Text(head)]
    if summary.get("budget_history"):
        changes = Table(title="budget changes", title_justify="left")
        for column in ("at", "action", "epsilon", "delta", "source", "key id", "reason"):
            changes.add_column(column, justify="right" if column in ("epsilon", "delta")
                               else "left")
        for change in summary["budget_history"]:
            def moved(name: str, change: dict[str, Any] = change) -> str:
                before = change.get(f"previous_{name}")
                now = f"{change[name]:g}"
                return now if before is None or before == change[name] else f"{before:g} -> {now}"
            changes.add_row(str(change.get("at", "?")), str(change.get("action", "?")),
                            moved("epsilon"), moved("delta"), str(change.get("source") or "-"),
                            str(change.get("key_id") or "-"), str(change.get("reason") or "-"))
        parts.append(changes)
    parts.append(_render_runs(summary))
    return Group(*parts)


def _render_runs(summary: dict[str, Any]) -> Table:
    """One row per run, totals in the caption."""
    from rich.table import Table

    table = Table(title=f"privacy budget: {summary['dataset']}", title_justify="left")
    for column in ("run", "status", "private", "epsilon", "delta", "accountant", "steps",
                   "model version"):
        table.add_column(column, justify="right" if column in ("epsilon", "delta", "steps")
                         else "left")
    for entry in summary["entries"]:
        private = entry.get("private", True)
        status = entry.get("status", "?")
        if not private:
            eps_text, delta_text = "none (not DP)", "-"
        elif status == "reserved":
            eps_text = f"{entry['epsilon']:.4g} reserved"
            delta_text = f"{entry['delta']:.2g}"
        else:
            eps_text = f"{entry.get('epsilon_spent') or 0.0:.4g}"
            delta_text = f"{entry.get('delta_spent') or 0.0:.2g}"
        if status == "reserved":
            status = "unfinished (counted; `train --resume`)"
        steps = entry.get("steps")
        planned = entry.get("steps_planned")
        steps_text = f"{steps or 0}/{planned}" if planned else str(steps or "-")
        table.add_row(str(entry.get("run_id", "?")), status, "yes" if private else "NO",
                      eps_text, delta_text, str(entry.get("accountant") or "-"), steps_text,
                      str(entry.get("version") or "-"))
    table.caption = (
        f"epsilon: spent {_composed(summary)}; by addition {summary['added_epsilon']:.4g} "
        f"(settled {summary['spent_epsilon']:.4g} + reserved "
        f"{summary['reserved_epsilon']:.4g}); remaining {summary['remaining_epsilon']:.4g} of "
        f"{summary['budget_epsilon']:.4g}\ndelta: {summary['budget_delta']:.3g}, of which "
        f"{summary['budget_delta'] - summary['remaining_delta']:.3g} spent by runs without "
        "DP-SGD parameters (the DP-SGD runs are composed at what is left)"
    )
    table.caption += "\n" + _next_run(summary)
    if summary["non_private_runs"]:
        table.caption += (f"\n{summary['non_private_runs']} non-private (--no-dp) run(s): "
                          "those models carry no DP guarantee")
    table.caption_justify = "left"
    return table



def _composed(summary: dict[str, Any]) -> str:
    """The epsilon every counted run spends together (reservations included), and how."""
    how = {"prv": "composed by PRV", "rdp": "composed by RDP",
           "addition": "the runs' own figures added up, lower than composed"
           }.get(str(summary.get("composition_method")), "by addition")
    return (f"{summary['composed_epsilon']:.4g} ({how}, at delta "
            f"{summary['budget_delta']:.3g}, reservations included)")


def _next_run(summary: dict[str, Any]) -> str:
    """What one more run would cost, and on what that figure rests."""
    nxt = summary["next_run"]
    if nxt["basis"] == "config":
        return (f"one more run at the config's train.epsilon costs at most "
                f"{nxt['epsilon']:.4g} (no DP-SGD run recorded yet to compose it with)")
    if nxt.get("mechanism") == "group-privacy":
        return (f"one more run identical to the last one ({nxt['like_run']}: row level, up "
                f"to {nxt.get('rows_per_unit')} rows a person, charged its per-person "
                f"epsilon) would add epsilon {nxt['epsilon']:.4g} (composed total "
                f"{nxt['composed_epsilon']:.4g}); train.privacy_unit_level = \"person\" "
                "costs far less")
    return (f"one more run identical to the last one ({nxt['like_run']}: noise "
            f"{nxt['noise_multiplier']:.4g}, sample rate {nxt['sample_rate']:.4g}, "
            f"{nxt['steps']} steps) would add epsilon {nxt['epsilon']:.4g} (composed total "
            f"{nxt['composed_epsilon']:.4g}; {nxt['epsilon_by_addition']:.4g} by addition); "
            "the config's own plan is known only once train has read the rows")
