"""report.md's "Classes" section: per-class accuracy and precision of a multi-class model,
suppressed classes shown by their "fewer than" size only, nothing for a binary model."""

from __future__ import annotations

import numpy as np

from personanet.reporting.classes import class_metrics
from personanet.reporting.report import render_markdown


def test_report_lists_each_class_and_hides_small_ones() -> None:
    y = np.array([0] * 6 + [1] * 6 + [2] * 2)
    proba = np.eye(3)[[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 0]]
    entry = class_metrics(y, proba, ["a", "b", "c"], min_group_size=5)
    report = render_markdown({"task": "classification", "per_class": entry})
    assert "## Classes" in report
    assert "| a | 6 | 0.833 | 0.833 |" in report
    assert "| b | 6 | 1.000 | 0.857 |" in report
    assert "| c | <5 | n/a | n/a |" in report


def test_a_binary_report_has_no_classes_section() -> None:
    assert "## Classes" not in render_markdown({"task": "classification"})


def test_group_tables_leave_out_columns_no_group_has_a_figure_for() -> None:
    """Positive rate is a two-class metric: a 10-class model's group table drops the empty
    column; a binary model's keeps it."""
    from personanet.reporting.metrics import group_metrics

    rng = np.random.default_rng(0)
    groups = {"sex": np.array(["F", "M"] * 30)}
    y3 = rng.integers(0, 3, 60)
    many = group_metrics(groups, y3, np.eye(3)[y3], ["a", "b", "c"], min_group_size=5)
    assert all(g["positive_rate"] is None for g in many["sex"]["groups"].values())
    report = render_markdown({"task": "classification", "groups": many})
    header = next(line for line in report.splitlines() if line.startswith("| Group |"))
    assert "Positive rate" not in header and "Accuracy" in header
    row = next(line for line in report.splitlines() if line.startswith("| F |"))
    assert row.count("|") == header.count("|")  # the cells follow the header

    y2 = rng.integers(0, 2, 60)
    two = group_metrics(groups, y2, np.eye(2)[y2], ["no", "yes"], min_group_size=5)
    report = render_markdown({"task": "classification", "groups": two})
    assert "Positive rate" in next(line for line in report.splitlines()
                                   if line.startswith("| Group |"))
