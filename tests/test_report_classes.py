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
