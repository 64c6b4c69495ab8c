"""Per-class figures of a multi-class model: accuracy per true class, and the confusion matrix.

What a digit classifier's report needs beyond one accuracy: which classes it gets wrong,
and as what. metrics.json is not encrypted, so a true class with fewer than
``evaluate.min_group_size`` test people is left out of both (its size only is given as
"fewer than"), as the fairness groups are (`personanet.reporting.groups`): a class of
one would say whether that person was classified correctly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def class_metrics(y_true: ArrayLike, proba: ArrayLike, classes: list[str], *,
                  min_group_size: int) -> dict[str, Any]:
    """``{"per_class": {label: {"n", "accuracy", "precision"}}, "confusion_matrix":
    {"labels", "counts", "suppressed"}}``.

    ``accuracy`` of a class is its recall (the share of its test people predicted as
    it); ``precision`` the share of predictions of it that are right (None when never
    predicted). ``counts[i][j]``: people of true class ``labels[i]`` predicted
    ``classes[j]``; rows of suppressed classes are left out.
    """
    y = np.asarray(y_true, dtype=np.int64)
    predicted = np.asarray(proba).argmax(axis=1)
    k = len(classes)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y, predicted), 1)
    per_class: dict[str, Any] = {}
    shown: list[int] = []
    suppressed: list[str] = []
    for index, label in enumerate(classes):
        n = int(counts[index].sum())
        if n < min_group_size:
            suppressed.append(label)
            per_class[label] = {"n": f"<{min_group_size}", "accuracy": None,
                                "precision": None}
            continue
        shown.append(index)
        predicted_as = int(counts[:, index].sum())
        per_class[label] = {
            "n": n, "accuracy": round(float(counts[index, index] / n), 6),
            "precision": (round(float(counts[index, index] / predicted_as), 6)
                          if predicted_as else None)}
    return {"per_class": per_class,
            "confusion_matrix": {"labels": [classes[i] for i in shown],
                                 "predicted": list(classes),
                                 "counts": counts[shown].tolist(), "suppressed": suppressed}}


def markdown_per_class(entry: dict[str, Any] | None) -> list[str]:
    """report.md's "Classes" section: one row per true class (size, accuracy, precision),
    the suppressed ones shown by their "fewer than" size only; nothing for a binary model."""
    if not entry or not entry.get("per_class"):
        return []
    lines = ["## Classes", "",
             "Per true class: its accuracy (the share of its test people predicted as it) and "
             "the precision of predicting it; the confusion matrix is among the figures.", "",
             "| Class | n | Accuracy | Precision |", "|---|---:|---:|---:|"]
    for label, figures in entry["per_class"].items():
        cells = ["n/a" if figures.get(key) is None else f"{figures[key]:.3f}"
                 for key in ("accuracy", "precision")]
        lines.append(f"| {label} | {figures.get('n')} | {cells[0]} | {cells[1]} |")
    return [*lines, ""]
