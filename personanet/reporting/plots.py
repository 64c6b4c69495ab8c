"""evaluate's PNG plots: ROC, calibration, accuracy per group, the membership-inference attack.

Each plot is a view of the same evaluation that metrics.json records (see
`personanet.reporting.report`). Figures are drawn with matplotlib's Agg
canvas (no display, no global backend switch), imported only when
`write_plots` runs, so importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from personanet.reporting.report import (
    GROUP_GATE_METRIC,
    format_value,
    is_finite_number,
    suppressed_size_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_DPI = 110
#: the groups plot is this wide (inches) whatever the number of groups; groups stack downwards
GROUPS_PLOT_WIDTH = 7.0
#: most bars in one panel of the groups plot: past it, the lowest and highest half each are
#: drawn (the groups served worst and best), and the title says how many are left to metrics.json
MAX_PLOT_BARS = 24
#: a group label longer than this is cut in the plot (report.md and metrics.json keep it whole)
PLOT_LABEL_CHARS = 28


def write_plots(out_dir: Path, *,
                roc: tuple[ArrayLike, ArrayLike] | None = None,
                calibration: tuple[ArrayLike, ArrayLike, ArrayLike] | None = None,
                groups: Mapping[str, Any] | None = None,
                attack_roc: tuple[ArrayLike, ArrayLike] | None = None,
                task: str = "classification",
                confusion: Mapping[str, Any] | None = None) -> list[str]:
    """Write roc.png, calibration.png, groups.png and attack_roc.png; return the names written.

    Each figure is skipped when its input is None (a regressor has no ROC;
    no audit, no attack ROC; no sensitive column, no groups plot).

    - ``roc``: (fpr, tpr) from `metrics.roc_curve`: how well the model ranks
      positives above negatives.
    - ``calibration``: (confidence, accuracy, count) from
      `metrics.calibration_curve`: whether the model's stated confidence can
      be trusted by whoever acts on it.
    - ``groups``: `metrics.group_metrics` output: accuracy (MAE for
      regression) of every group of every sensitive column, side by side; bars
      of unequal height are groups the model serves unequally.
    - ``attack_roc``: (fpr, tpr) from `audit.attack_roc_curve`, on log-log
      axes with the diagonal of a blind guess: a curve far above the diagonal
      at the left (low FPR) means some members can be identified confidently,
      a privacy harm an AUC near 0.5 can hide.
    - ``confusion``: `classes.class_metrics`' confusion matrix (multi-class):
      confusion_matrix.png, each true class's row as shares of its people, so the
      classes a model mistakes for one another stand out whatever their sizes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if roc is not None:
        written.append(_save(_roc_figure(*roc), out_dir / "roc.png"))
    if calibration is not None:
        written.append(_save(_calibration_figure(*calibration), out_dir / "calibration.png"))
    if groups:
        written.append(_save(_groups_figure(groups, GROUP_GATE_METRIC.get(task, "accuracy")),
                             out_dir / "groups.png"))
    if attack_roc is not None:
        written.append(_save(_attack_roc_figure(*attack_roc), out_dir / "attack_roc.png"))
    if confusion is not None and confusion.get("labels"):
        written.append(_save(_confusion_figure(confusion), out_dir / "confusion_matrix.png"))
    return written


def _confusion_figure(confusion: Mapping[str, Any]) -> Figure:
    counts = np.asarray(confusion["counts"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    rows, columns = list(confusion["labels"]), list(confusion["predicted"])
    figure = _figure(1.2 + 0.45 * len(columns), 1.0 + 0.45 * len(rows))
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(columns)), [_short_label(c) for c in columns])
    ax.set_yticks(range(len(rows)), [_short_label(r) for r in rows])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_title("confusion matrix (share of each true class)")
    figure.colorbar(image, ax=ax, fraction=0.046)
    return figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> str:
    # No "Software" entry: identical figures give identical bytes, so artifacts hash stably.
    figure.savefig(path, format="png", metadata={"Software": None})
    return path.name


def _roc_figure(fpr: ArrayLike, tpr: ArrayLike) -> Figure:
    f, t = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    figure = _figure(5, 5)
    ax = figure.subplots()
    ax.plot(f, t, color="C0", label=f"model (AUC = {np.trapezoid(t, f):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC curve (test set)")
    ax.legend(loc="lower right")
    return figure


def _calibration_figure(confidence: ArrayLike, accuracy: ArrayLike, count: ArrayLike) -> Figure:
    conf = np.asarray(confidence, dtype=float)
    acc = np.asarray(accuracy, dtype=float)
    n = np.asarray(count, dtype=float)
    figure = _figure(5, 6)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    top.plot(conf, acc, marker="o", color="C0", label="model")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="Calibration (top-label)")
    top.legend(loc="upper left")
    bottom.bar(conf, n, width=1 / 30, color="C0")
    bottom.set(xlabel="confidence (largest class probability)", ylabel="people")
    return figure


def _groups_figure(groups: Mapping[str, Any], metric: str) -> Figure:
    """One panel per sensitive column, one horizontal bar per reported group.

    The width is fixed and the bars stack downwards, at most `MAX_PLOT_BARS`
    per panel, so 40 categories or 30 bins stay legible; suppressed groups
    share one line that gives neither their metrics nor their sizes.
    """
    panels = [_groups_panel(column, entry, metric) for column, entry in groups.items()]
    heights = [0.9 + 0.3 * max(1, len(rows)) for _, rows, _ in panels]
    figure = _figure(GROUPS_PLOT_WIDTH, sum(heights) + 0.2)
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (title, rows, values) in zip(axes, panels, strict=True):
        positions = range(len(rows))
        bars = ax.barh(positions, [v if v is not None else 0.0 for v in values], color="C0")
        ax.bar_label(bars, labels=[format_value(v) if v is not None else "" for v in values],
                     fontsize=8, padding=2)
        ax.set_yticks(positions, rows, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=metric, title=title)
        defined = [v for v in values if v is not None]
        if metric in ("accuracy", "balanced_accuracy", "f1", "recall"):
            ax.set_xlim(0, 1.12)  # room for the value labels
        elif defined:
            ax.set_xlim(0, max(defined) * 1.15 or 1.0)
    return figure


def _groups_panel(column: str, entry: Mapping[str, Any], metric: str
                  ) -> tuple[str, list[str], list[float | None]]:
    """(title, row labels, values) of one column's panel in the groups plot."""
    reported = [(label, figures) for label, figures in (entry.get("groups") or {}).items()
                if not figures.get("suppressed")]
    suppressed = len(entry.get("groups") or {}) - len(reported)
    title = f"{metric} by {column}"
    if len(reported) > MAX_PLOT_BARS:
        ranked = sorted(reported, key=lambda item: (not is_finite_number(item[1].get(metric)),
                                                    item[1].get(metric) or 0.0))
        half = MAX_PLOT_BARS // 2
        title += f" ({len(reported) - 2 * half} middle groups in metrics.json)"
        reported = ranked[:half] + ranked[-half:]
    rows = [f"{_short_label(label)} (n={figures.get('n', '?')})" for label, figures in reported]
    values = [float(figures[metric]) if is_finite_number(figures.get(metric)) else None
              for _, figures in reported]
    if suppressed:
        rows.append(f"{suppressed} group{'s' if suppressed > 1 else ''} suppressed "
                    f"(n {suppressed_size_text(entry)})")
        values.append(None)
    return title, rows, values


def _attack_roc_figure(fpr: ArrayLike, tpr: ArrayLike) -> Figure:
    f, t = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    positive = np.r_[f[f > 0], t[t > 0]]
    # Log axes cannot show 0: draw zero rates at a floor below the smallest observed rate.
    floor = min(float(positive.min()) if positive.size else 1e-4, 1e-3) / 2
    figure = _figure(5, 5)
    ax = figure.subplots()
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", label="blind guess")
    ax.step(np.maximum(f, floor), np.maximum(t, floor), where="post", color="C3",
            label=f"loss-threshold attack (AUC = {np.trapezoid(t, f):.3f})")
    for target in (0.01, 0.001):
        if target > floor:
            ax.axvline(target, color="grey", linewidth=0.5, linestyle=":")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1),
           xlabel="false positive rate (non-members accused)",
           ylabel="true positive rate (members identified)",
           title="Membership-inference attack")
    ax.legend(loc="lower right")
    return figure


def _short_label(label: Any) -> str:
    text = str(label).replace("\n", " ")
    if len(text) <= PLOT_LABEL_CHARS:
        return text
    # Keep both ends: long names often differ only at the end ("... region 12").
    head = (PLOT_LABEL_CHARS - 1) // 2
    return text[:head] + "…" + text[-(PLOT_LABEL_CHARS - 1 - head):]
