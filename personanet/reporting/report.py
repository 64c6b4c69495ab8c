"""What evaluate writes for people: metrics.json's structure, report.md, the gates, a summary.

One dict (``metrics``, saved as metrics.json) is the single source; report.md,
the rich summary on stderr and the gates are views of it. It holds only
aggregates over people, never a record, so it stays unencrypted (README.md,
"Artifacts").

metrics.json::

    {
      "schema": 1,
      "task": "classification" | "regression",
      "model": {
        "version": "...",            # the model artifact's version id
        "private": true,             # false for a --no-dp model
        "epsilon": 1.0,              # the accountant's epsilon (None when not private)
        "delta": 1e-05,              # None when not private
        # optional: "privacy_unit" ("email"), "target", "classes" [..],
        #           "noise_multiplier", "sample_rate", "steps", "accountant"
      },
      "data": {...},                 # optional: test artifact version, n_train, n_test, ...
      "overall": {...},              # metrics.classification_metrics / regression_metrics
      "ci": {                        # percentile bootstrap over test people
        "level": 0.95, "n_resamples": 200, "seed": 42,
        "intervals": {"accuracy": [low, high], ...}   # [None, None] where undefined
      },
      "groups": {                    # metrics.group_metrics, one entry per sensitive column
        "sex": {
          "min_group_size": 20,      # evaluate.min_group_size: smaller groups are suppressed
          "grouping": {"by": "value"},   # or {"by": "bins", "edges": [...], "labels": [...]}
          "groups": {"Female": {"n": 5421, "accuracy": ..., ...},
                     "Other": {"suppressed": true}},      # no size: it is below 20
          "gaps": {"accuracy": {"gap": 0.07, "max_group": "Female", "max": 0.91,
                                "min_group": "Male", "min": 0.84}, "f1": None, ...}
        }                            # a gap is None with fewer than two reported groups
      },
      "audit": {...} | None,         # audit.AuditResult.to_json(); None when the audit is off
      "gates": [                     # build_gates(); evaluate exits 69 if any passed == false
        {"name": "min_accuracy", "rule": ">=", "threshold": 0.8, "value": 0.84,
         "passed": true, "detail": "test accuracy"}
      ]
    }

Any number may be None where it is undefined (a ROC AUC with one class
present). ``passed`` is None where a gate does not apply (the audit gate of a
non-private model, a gap gate with fewer than two reportable groups).

The PNG plots drawn from the same evaluation live in `personanet.reporting.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

SCHEMA_VERSION = 1
#: overall metrics shown in report.md and the summary, in order, with their labels
CLASSIFICATION_ROWS = (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                       ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"),
                       ("roc_auc", "ROC AUC"), ("log_loss", "Log loss"),
                       ("ece", "Expected calibration error"))
REGRESSION_ROWS = (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²"))
#: per-group columns of report.md, by task
GROUP_COLUMNS = {"classification": (("accuracy", "Accuracy"), ("balanced_accuracy", "Bal. acc."),
                                    ("f1", "F1"), ("recall", "Recall"),
                                    ("positive_rate", "Positive rate"), ("roc_auc", "AUC")),
                 "regression": (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²"))}
#: the metric each group gap gate and the groups plot use, by task
GROUP_GATE_METRIC = {"classification": "accuracy", "regression": "mae"}

# --- gates ------------------------------------------------------------------------------------


def build_gates(*, overall: Mapping[str, Any], groups: Mapping[str, Any] | None = None,
                audit: Mapping[str, Any] | None = None, min_accuracy: float | None = None,
                max_group_gap: float | None = None, max_attack_auc: float | None = None,
                audit_epsilon: bool = True, task: str = "classification"
                ) -> list[dict[str, Any]]:
    """The gates of `[evaluate]` checked against the figures; only configured ones appear.

    - ``min_accuracy``: test accuracy >= threshold.
    - ``max_group_gap``: the largest gap between groups of any sensitive column
      (accuracy; MAE for regression) <= threshold: a fairness gate.
    - ``max_attack_auc``: the membership-inference attack's AUC <= threshold.
    - ``audit_epsilon`` (when an audit ran): the empirical epsilon lower bound
      <= the claimed epsilon; a failure is evidence the privacy claim is false.

    A gate whose figure is missing (accuracy of a regressor, a gap with one
    group, an audit that did not run) has ``passed`` None and says why in
    ``detail``; it does not pass silently, and the caller decides whether a
    gate it cannot check should stop the run.
    """
    gates: list[dict[str, Any]] = []
    if min_accuracy is not None:
        value = overall.get("accuracy")
        detail = "test accuracy" if is_finite_number(value) else "no accuracy for this task"
        gates.append(_gate("min_accuracy", ">=", min_accuracy, value, detail))
    if max_group_gap is not None:
        metric = GROUP_GATE_METRIC.get(task, "accuracy")
        column, gap = _largest_gap(groups or {}, metric)
        if gap is None:
            gates.append(_gate("max_group_gap", "<=", max_group_gap, None,
                               f"no sensitive column has two reportable groups ({metric})"))
        else:
            detail = (f"{metric} of {column}: {gap['max_group']} {gap['max']:.3f} vs "
                      f"{gap['min_group']} {gap['min']:.3f}")
            gates.append(_gate("max_group_gap", "<=", max_group_gap, gap["gap"], detail))
    if max_attack_auc is not None:
        value = audit.get("attack_auc") if audit else None
        gates.append(_gate("max_attack_auc", "<=", max_attack_auc, value,
                           "membership-inference attack AUC" if audit else "audit did not run"))
    if audit_epsilon and audit:
        claimed = audit.get("epsilon_claimed")
        bound = audit.get("epsilon_lower_bound")
        if claimed is None:
            gates.append({"name": "audit_epsilon", "rule": "<=", "threshold": None,
                          "value": bound, "passed": None,
                          "detail": "non-private model: no epsilon claim to test"})
        else:
            gates.append(_gate("audit_epsilon", "<=", claimed, bound,
                               "empirical epsilon lower bound vs the claimed epsilon"))
    return gates


def failed_gates(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The gates that failed (``passed`` is False); evaluate exits 69 when any did."""
    return [g for g in metrics.get("gates", []) if g.get("passed") is False]


def _gate(name: str, rule: str, threshold: float, value: Any, detail: str) -> dict[str, Any]:
    passed: bool | None = None
    if is_finite_number(value):
        passed = value >= threshold if rule == ">=" else value <= threshold
    return {"name": name, "rule": rule, "threshold": threshold,
            "value": value if is_finite_number(value) else None, "passed": passed, "detail": detail}


def _largest_gap(groups: Mapping[str, Any], metric: str
                 ) -> tuple[str | None, dict[str, Any] | None]:
    best: tuple[str | None, dict[str, Any] | None] = (None, None)
    for column, entry in groups.items():
        gap = (entry.get("gaps") or {}).get(metric)
        if gap and (best[1] is None or gap["gap"] > best[1]["gap"]):
            best = (column, gap)
    return best


# --- report.md --------------------------------------------------------------------------------


def privacy_sentence(model: Mapping[str, Any]) -> str:
    """The model's privacy guarantee in one sentence (a loud warning when it has none)."""
    if not model.get("private"):
        return ("**WARNING: this model was trained WITHOUT differential privacy.** It can "
                "memorise and reveal the people in its training data; use it for comparison "
                "only, and never ship it or share its outputs.")
    epsilon, delta = model.get("epsilon"), model.get("delta")
    if not is_finite_number(epsilon) or not is_finite_number(delta):
        raise ValueError("a private model needs model.epsilon and model.delta")
    epsilon = float(model["epsilon"])
    unit = model.get("privacy_unit")
    level = model.get("unit_level") or {}
    if level.get("level") == "row":  # k rows a person, DP-SGD over rows (docs/training.md)
        person = level.get("person_epsilon")
        bound = (f"(ε = {float(person):.3g}, δ = {_delta(level.get('person_delta'))}) by group "
                 "privacy" if is_finite_number(person) else "no bound group privacy can give")
        return (f"This model was trained with (ε = {epsilon:.2f}, δ = {_delta(delta)})-"
                f"differential privacy **per row**, not per person: a person may have up to "
                f"{level.get('rows_per_unit')} rows, so one person's records are protected "
                f"only at {bound} (train.privacy_unit_level = \"row\")."
                + (" The dataset's privacy budget was charged that per-person figure."
                   if level.get("ledger_charged") == "person_epsilon" else ""))
    per = f"per person (privacy unit: `{unit}`)" if unit else "per person"
    return (f"This model was trained with (ε = {epsilon:.2f}, δ = {_delta(delta)})-differential "
            f"privacy {per}: adding or removing any one person's records changes the "
            f"probability of any outcome of training by at most a factor of "
            f"e^{epsilon:.2f} ≈ {math.exp(epsilon):.2f}, except with probability at most "
            f"{_delta(delta)}.")


def render_markdown(metrics: Mapping[str, Any], *, figures: Sequence[str] = ()) -> str:
    """report.md: privacy, metrics with CIs, groups and gaps, the audit, gates and figures.

    ``figures`` are the file names `write_plots` returned; they are linked at
    the end, relative to report.md.
    """
    model = metrics.get("model") or {}
    task = metrics.get("task", "classification")
    title = f"# Evaluation of model `{model.get('version', '?')}`"
    if model.get("target"):
        title += f" (target `{model['target']}`)"
    lines = [title, "", "## Privacy", "", privacy_sentence(model), ""]
    lines += _markdown_metrics(metrics, task)
    from personanet.reporting.classes import markdown_per_class

    lines += markdown_per_class(metrics.get("per_class"))
    lines += _markdown_groups(metrics.get("groups") or {}, task)
    lines += _markdown_audit(metrics.get("audit"))
    lines += _markdown_gates(metrics.get("gates") or [])
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{Path(name).stem}]({name})" for name in figures]
        lines.append("")
    return "\n".join(lines)


def _markdown_metrics(metrics: Mapping[str, Any], task: str) -> list[str]:
    overall = metrics.get("overall") or {}
    ci = metrics.get("ci") or {}
    intervals = ci.get("intervals") or {}
    level = ci.get("level", 0.95)
    rows = REGRESSION_ROWS if task == "regression" else CLASSIFICATION_ROWS
    n = overall.get("n")
    lines = ["## Metrics", "",
             f"On {n if n is not None else '?'} held-out people. Intervals: "
             + (f"{level:.0%} percentile bootstrap over {ci.get('n_resamples')} resamples."
                if intervals else "not computed."), "",
             f"| Metric | Value | {level:.0%} CI |", "|---|---:|---:|"]
    for key, label in rows:
        if key in overall:
            lines.append(f"| {label} | {format_value(overall[key])} "
                         f"| {_interval(intervals.get(key))} |")
    return [*lines, ""]


def _reported_columns(entry: Mapping[str, Any], task: str) -> list[tuple[str, str]]:
    """The task's group columns that have a figure for some reported group: a metric of
    two classes (positive rate, AUC) has none for a multi-class model, and an empty
    column says nothing."""
    columns = GROUP_COLUMNS.get(task, GROUP_COLUMNS["classification"])
    shown = [figures for figures in (entry.get("groups") or {}).values()
             if not figures.get("suppressed")]
    if not shown:
        return list(columns)
    return [(key, label) for key, label in columns
            if any(figures.get(key) is not None for figures in shown)]


def _markdown_groups(groups: Mapping[str, Any], task: str) -> list[str]:
    lines = ["## Groups", ""]
    if not groups:
        return [*lines, "No sensitive columns are configured.", ""]
    lines += ["Every metric per group of each sensitive column. Suppressed groups are too small "
              "to report without describing individual people: neither their metrics nor their "
              "size are published (and where they hold few people together, the smallest "
              "reported group is suppressed too, so their total gives none away).", ""]
    for column, entry in groups.items():
        lines += [f"### `{column}`", ""]
        columns = _reported_columns(entry, task)
        grouping = entry.get("grouping") or {}
        if grouping.get("by") == "bins":
            lines += [f"Groups are bins of the public bounds, edges "
                      f"{', '.join(_cell(e) for e in grouping.get('edges') or [])}.", ""]
        lines += ["| Group | n | " + " | ".join(label for _, label in columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        for value, figures in (entry.get("groups") or {}).items():
            if figures.get("suppressed"):
                size = suppressed_size_text(entry)
                cells = ["suppressed"] + [""] * (len(columns) - 1)
            else:
                size = str(figures.get("n", "?"))
                cells = [format_value(figures.get(key)) for key, _ in columns]
            lines.append(f"| {_cell(value)} | {size} | " + " | ".join(cells) + " |")
        gaps = [(key, label, (entry.get("gaps") or {}).get(key)) for key, label in columns]
        shown = [(label, gap) for _, label, gap in gaps if gap]
        lines.append("")
        if shown:
            lines.append("Largest gaps between groups:")
            lines.append("")
            lines += [f"- {label}: {gap['gap']:.3f} ({_cell(gap['max_group'])} {gap['max']:.3f} "
                      f"vs {_cell(gap['min_group'])} {gap['min']:.3f})" for label, gap in shown]
        else:
            lines.append("Fewer than two reportable groups: no gaps.")
        lines.append("")
    return lines


def _markdown_audit(audit: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Membership-inference audit", ""]
    if not audit:
        return [*lines, "The audit did not run.", ""]
    claimed = audit.get("epsilon_claimed")
    bound = audit.get("epsilon_lower_bound")
    confidence = audit.get("confidence", 0.95)
    lines += [
        "A loss-threshold attack guesses who was in the training data; the empirical ε is "
        f"a lower bound at {confidence:.0%} confidence on the privacy loss it demonstrates "
        "(Jagielski et al. 2020).", "",
        "| Claimed ε | Empirical ε lower bound | Attack AUC | TPR @ 1% FPR | TPR @ 0.1% FPR "
        "| Members | Non-members |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {format_value(claimed, 2) if claimed is not None else 'none (non-private)'} "
        f"| {format_value(bound, 2)} | {format_value(audit.get('attack_auc'))} "
        f"| {format_value(audit.get('tpr_at_1pct_fpr'), 4)} "
        f"| {format_value(audit.get('tpr_at_01pct_fpr'), 4)} "
        f"| {audit.get('n_members', '?')} | {audit.get('n_nonmembers', '?')} |", ""]
    if claimed is None:
        lines.append("No privacy claim to test: the attack demonstrates "
                     f"ε ≥ {format_value(bound, 2)}.")
    elif is_finite_number(bound) and bound > claimed:
        lines.append(f"**The audit refutes the claim:** the attack demonstrates ε ≥ "
                     f"{bound:.2f} > {claimed:.2f}. The noise, the sampling or the privacy "
                     "accounting is broken, or data leaked around training. Do not ship.")
    else:
        proven = float(audit["epsilon_lower_bound"]) if is_finite_number(bound) else 0.0
        shown = (f"demonstrates ε ≥ {proven:.2f}, within" if proven > 0
                 else "demonstrates no measurable privacy loss (bound 0), within")
        lines.append(f"The attack {shown} the claimed ε = {claimed:.2f}. This is consistent "
                     "with the claim but does not certify it: a lower bound from one weak "
                     "attack, not a proof of privacy.")
    return [*lines, ""]


def _markdown_gates(gates: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Gates", ""]
    if not gates:
        return [*lines, "No gates are configured.", ""]
    lines += ["| Gate | Rule | Threshold | Value | Result | Detail |",
              "|---|---|---:|---:|---|---|"]
    for gate in gates:
        lines.append(f"| {gate['name']} | value {gate['rule']} threshold "
                     f"| {format_value(gate.get('threshold'))} | {format_value(gate.get('value'))} "
                     f"| {_verdict(gate.get('passed'))} | {_cell(gate.get('detail', ''))} |")
    return [*lines, ""]


# --- summary on stderr ------------------------------------------------------------------------


def render_summary(metrics: Mapping[str, Any]) -> Table:
    """A compact rich table of the headline figures, for the console on stderr."""
    from rich.table import Table

    model = metrics.get("model") or {}
    task = metrics.get("task", "classification")
    overall = metrics.get("overall") or {}
    intervals = (metrics.get("ci") or {}).get("intervals") or {}
    table = Table(title=f"evaluate: model {model.get('version', '?')}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("detail")
    if model.get("private"):
        table.add_row("privacy", f"ε={model.get('epsilon'):.2f}",
                      f"δ={_delta(model.get('delta'))} per "
                      f"{(model.get('unit_level') or {}).get('level', 'person')}")
    else:
        table.add_row("privacy", "[bold red]NONE[/]", "[bold red]non-private model[/]")
    for key, label in REGRESSION_ROWS if task == "regression" else CLASSIFICATION_ROWS:
        if key in overall:
            interval = intervals.get(key)
            table.add_row(label, format_value(overall[key]), f"CI {_interval(interval)}"
                          if interval and interval[0] is not None else "")
    metric = GROUP_GATE_METRIC.get(task, "accuracy")
    for column, entry in (metrics.get("groups") or {}).items():
        gap = (entry.get("gaps") or {}).get(metric)
        if gap:
            table.add_row(f"{metric} gap: {column}", format_value(gap["gap"]),
                          f"{gap['max_group']} vs {gap['min_group']}")
    audit = metrics.get("audit")
    if audit:
        claimed = audit.get("epsilon_claimed")
        table.add_row("audit ε lower bound", format_value(audit.get("epsilon_lower_bound"), 2),
                      f"claimed {format_value(claimed, 2)}" if claimed is not None else "no claim")
        table.add_row("attack AUC", format_value(audit.get("attack_auc")),
                      f"TPR@0.1%FPR {format_value(audit.get('tpr_at_01pct_fpr'), 4)}")
    for gate in metrics.get("gates") or []:
        table.add_row(f"gate {gate['name']}", format_value(gate.get("value")),
                      f"{_rich_verdict(gate.get('passed'))} ({gate['rule']} "
                      f"{format_value(gate.get('threshold'))})")
    return table


# --- formatting (shared with plots.py) ------------------------------------------------------


def is_finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(float(value)))


def format_value(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(value)
    if is_finite_number(value):
        return f"{float(value):.{digits}f}"
    return str(value)


def _delta(value: Any) -> str:
    return f"{float(value):.2g}" if is_finite_number(value) else "n/a"


def _interval(interval: Sequence[Any] | None) -> str:
    if not interval or interval[0] is None or interval[1] is None:
        return "n/a"
    return f"[{format_value(interval[0])}, {format_value(interval[1])}]"


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "not checked"
    return "pass" if passed else "**FAIL**"


def _rich_verdict(passed: bool | None) -> str:
    if passed is None:
        return "[yellow]not checked[/]"
    return "[green]pass[/]" if passed else "[bold red]FAIL[/]"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def suppressed_size_text(entry: Mapping[str, Any]) -> str:
    """What is said of a suppressed group's size: below the threshold, never the count."""
    threshold = entry.get("min_group_size")
    return f"< {threshold}" if is_finite_number(threshold) else "suppressed"
