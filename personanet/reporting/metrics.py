"""Model quality on held-out people: overall, with confidence intervals, and per group.

Pure functions of numpy arrays (numpy and scipy only, no scikit-learn): the
`evaluate` stage feeds them the test split's labels and predicted
probabilities and writes what they return into metrics.json. Every value is a
plain Python float/int (or None where a metric is undefined), so the dicts go
to JSON unchanged.

Conventions:

- Classifiers: ``y_true`` holds class indices ``0..k-1`` into ``classes``;
  ``proba`` is ``(n, k)``, one row of class probabilities per example; the
  predicted class is the row's argmax.
- Binary (``k == 2``): precision, recall and F1 are those of the positive
  class ``classes[1]``. Multi-class: macro averages (the unweighted mean over
  the classes present in ``y_true`` or in the predictions, as scikit-learn
  does), so a small class counts as much as a large one.
- A metric that is undefined on the data (ROC AUC with a single class
  present, R2 with a constant target) is None, never NaN.

Why per group: a model can be accurate on average and wrong for a minority.
`group_metrics` reports every metric for each value of each sensitive column
and the largest gap between groups, which is what a fairness gate reads.
Small groups are themselves a privacy hazard (the accuracy of a group of one
says whether that person was classified correctly), so evaluate passes a
`min_group_size` (config `evaluate.min_group_size`) that suppresses them: a
suppressed group publishes neither its metrics nor its size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: equal-width confidence bins for expected calibration error (Guo et al. 2017)
ECE_BINS = 15
#: probabilities are clipped to [LOG_LOSS_EPS, 1 - LOG_LOSS_EPS] so log loss stays finite
LOG_LOSS_EPS = 1e-15
#: metrics whose spread across groups `group_metrics` reports (classifiers)
CLASSIFICATION_GAP_METRICS = ("accuracy", "balanced_accuracy", "f1", "recall", "positive_rate",
                              "roc_auc", "ece")
#: metrics whose spread across groups `group_regression_metrics` reports
REGRESSION_GAP_METRICS = ("mae", "rmse", "r2")
#: label used for a missing value of a sensitive column
MISSING_GROUP = "(missing)"


# --- classification ---------------------------------------------------------------------------


def classification_metrics(y_true: ArrayLike, proba: ArrayLike, *, classes: list[str]
                           ) -> dict[str, Any]:
    """Accuracy, balanced accuracy, precision/recall/F1, ROC AUC, log loss, ECE and n.

    Keys: ``accuracy``, ``balanced_accuracy`` (mean recall over the classes
    present in ``y_true``), ``precision``, ``recall``, ``f1`` (positive class
    ``classes[1]`` when binary, macro otherwise; 0.0 where a ratio has a zero
    denominator), ``roc_auc`` (binary; macro one-vs-rest over the classes
    present for multi-class; None with fewer than two classes present),
    ``log_loss`` (natural log, probabilities clipped to ``[1e-15, 1 - 1e-15]``),
    ``ece`` (expected calibration error, 15 equal-width bins of the top
    probability), ``positive_rate`` and ``prevalence`` (share predicted /
    labelled ``classes[1]``; binary only, else None: comparing
    ``positive_rate`` across groups is demographic parity), ``n``.
    """
    y, p = _check_classification(y_true, proba, classes)
    k = p.shape[1]
    n = len(y)
    y_pred = p.argmax(axis=1)
    confusion = confusion_matrix(y, y_pred, n_classes=k)
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    hits = np.diag(confusion)

    per_class_recall = _ratio(hits, true_counts)
    per_class_precision = _ratio(hits, pred_counts)
    per_class_f1 = _ratio(2 * per_class_precision * per_class_recall,
                          per_class_precision + per_class_recall)
    present = true_counts > 0
    if k == 2:
        precision, recall, f1 = (per_class_precision[1], per_class_recall[1], per_class_f1[1])
        positive_rate: float | None = float(pred_counts[1] / n)
        prevalence: float | None = float(true_counts[1] / n)
    else:
        labels = present | (pred_counts > 0)
        precision = per_class_precision[labels].mean()
        recall = per_class_recall[labels].mean()
        f1 = per_class_f1[labels].mean()
        positive_rate = prevalence = None

    true_proba = np.clip(p[np.arange(n), y], LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    return {
        "accuracy": float(hits.sum() / n),
        "balanced_accuracy": float(per_class_recall[present].mean()),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": _multiclass_auc(y, p),
        "log_loss": float(-np.log(true_proba).mean()),
        "ece": expected_calibration_error(y, p),
        "positive_rate": positive_rate,
        "prevalence": prevalence,
        "n": n,
    }


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, *, n_classes: int) -> NDArray[np.int64]:
    """Counts ``[true class, predicted class]`` as a ``(n_classes, n_classes)`` int array."""
    t = np.asarray(y_true, dtype=np.int64)
    q = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * n_classes + q, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes)


def roc_auc_score(y_true_binary: ArrayLike, scores: ArrayLike) -> float | None:
    """Area under the ROC curve: the chance a random positive outscores a random negative.

    Ties count one half (the Mann-Whitney U statistic over average ranks), so a
    constant score gives exactly 0.5. None when only one class is present.
    """
    from scipy.stats import rankdata

    y = np.asarray(y_true_binary).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true_binary: ArrayLike, scores: ArrayLike, *, drop_intermediate: bool = True
              ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """False and true positive rates of the rule ``score >= threshold``, for each threshold.

    Thresholds descend from ``+inf`` (nobody flagged: the point (0, 0)) to the
    lowest score (everybody flagged: (1, 1)). ``drop_intermediate`` removes
    points on straight segments, which changes no area and no plot. Raises
    ValueError unless both classes are present.

    For privacy, the interesting corner is the lower left: an attacker who
    flags few people but is right about them (high TPR at low FPR) harms those
    people even when the overall AUC looks harmless (Carlini et al. 2022).
    """
    y = np.asarray(y_true_binary).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError("a ROC curve needs both positive and negative examples")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[last_of_tie].astype(np.float64)
    fps = (last_of_tie + 1) - tps
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, s_sorted[last_of_tie]]
    if drop_intermediate and len(tps) > 2:
        bends = np.flatnonzero(np.r_[True, np.diff(fps, 2) != 0, True] |
                               np.r_[True, np.diff(tps, 2) != 0, True])
        tps, fps, thresholds = tps[bends], fps[bends], thresholds[bends]
    return fps / fps[-1], tps / tps[-1], thresholds


def calibration_curve(y_true: ArrayLike, proba: ArrayLike, *, n_bins: int = ECE_BINS
                      ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Reliability diagram of the top-label probability: (mean confidence, accuracy, count).

    Examples are binned by their largest class probability ("confidence") into
    ``n_bins`` equal-width bins ``(0, 1/n_bins], ...``; for each non-empty bin
    it returns the mean confidence, the share of correct predictions and the
    count. A calibrated model lies on the diagonal: of the people it is 80%
    sure about, 80% are right. Off the diagonal, its probabilities mislead
    whoever acts on them, and they may mislead differently per group.
    """
    y, p = _check_classification(y_true, proba, None)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    sum_conf = np.bincount(bins, weights=confidence, minlength=n_bins)
    sum_correct = np.bincount(bins, weights=correct, minlength=n_bins)
    filled = counts > 0
    return (sum_conf[filled] / counts[filled], sum_correct[filled] / counts[filled],
            counts[filled].astype(np.int64))


def expected_calibration_error(y_true: ArrayLike, proba: ArrayLike, *, n_bins: int = ECE_BINS
                               ) -> float:
    """Mean |accuracy - confidence| over the calibration bins, weighted by bin size; in [0, 1]."""
    confidence, accuracy, counts = calibration_curve(y_true, proba, n_bins=n_bins)
    return float(np.sum(counts * np.abs(accuracy - confidence)) / counts.sum())


# --- regression -------------------------------------------------------------------------------


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """``mae``, ``rmse``, ``r2`` (None when the target is constant) and ``n``."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    q = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != q.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {q.shape[0]}")
    if len(t) == 0:
        raise ValueError("no examples to evaluate")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q))):
        raise ValueError("y_true and y_pred must be finite")
    residual = t - q
    ss_res = float(np.sum(residual**2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(residual))),
        "rmse": math.sqrt(ss_res / len(t)),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else None,
        "n": len(t),
    }


# --- bootstrap --------------------------------------------------------------------------------


def bootstrap_ci(metric_fn: Callable[..., float | None], *arrays: ArrayLike, n_resamples: int,
                 seed: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``metric_fn(*arrays)`` at ``level``.

    Rows are resampled with replacement, the same rows from every array, so
    labels stay paired with predictions. Deterministic from ``seed``.
    Resamples where the metric is undefined (None or NaN, e.g. AUC on a
    resample with one class) are skipped; when more than half are undefined,
    or ``n_resamples`` is 0, the interval is ``(None, None)``: a percentile of
    the few survivors would be biased, not an interval.

    The interval says how much the metric would move on another test set of
    people like these; it says nothing of bias in how they were sampled.
    """
    values = [metric_fn(*sample) for sample in _resamples(arrays, n_resamples, seed)]
    return _percentile_interval(values, n_resamples, level)


def bootstrap_cis(metrics_fn: Callable[..., Mapping[str, Any]], *arrays: ArrayLike,
                  n_resamples: int, seed: int, level: float = 0.95
                  ) -> dict[str, tuple[float | None, float | None]]:
    """`bootstrap_ci` for every numeric metric of a dict-valued ``metrics_fn``, in one pass.

    ``bootstrap_cis(lambda y, p: classification_metrics(y, p, classes=c), y, p, ...)``
    gives every classification metric's interval from the same resamples
    (``n`` is left out: it does not vary).
    """
    per_metric: dict[str, list[Any]] = {}
    for i, sample in enumerate(_resamples(arrays, n_resamples, seed)):
        for key, value in metrics_fn(*sample).items():
            if key == "n" or isinstance(value, bool):
                continue
            per_metric.setdefault(key, [None] * i).append(value)
        for values in per_metric.values():
            values.extend([None] * (i + 1 - len(values)))
    return {key: _percentile_interval(values, n_resamples, level)
            for key, values in per_metric.items()}


def _resamples(arrays: tuple[ArrayLike, ...], n_resamples: int, seed: int
               ) -> Iterator[list[np.ndarray]]:
    if n_resamples < 0:
        raise ValueError("n_resamples must be >= 0")
    if not arrays:
        raise ValueError("bootstrap needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = len(data[0])
    if n == 0 or any(len(a) != n for a in data):
        raise ValueError("bootstrap arrays must be non-empty and of equal length")
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        rows = rng.integers(0, n, size=n)
        yield [a[rows] for a in data]


def _percentile_interval(values: list[Any], n_resamples: int, level: float
                         ) -> tuple[float | None, float | None]:
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    defined = np.array([float(v) for v in values if _is_number(v)], dtype=np.float64)
    if n_resamples == 0 or len(defined) * 2 < n_resamples:
        return None, None
    tail = (1 - level) / 2
    low, high = np.quantile(defined, [tail, 1 - tail])
    return float(low), float(high)


# --- groups -----------------------------------------------------------------------------------


def group_metrics(groups: Mapping[str, ArrayLike], y_true: ArrayLike, proba: ArrayLike,
                  classes: list[str], *, min_group_size: int = 1,
                  order: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """`classification_metrics` for each value of each sensitive column, and the largest gaps.

    Returns ``{column: {"min_group_size": k, "groups": {value: {...}}, "gaps": {metric: gap}}}``.
    ``groups`` maps each sensitive column to one group label per example.
    A group with fewer than ``min_group_size`` examples is reported as
    ``{"suppressed": True}``, without its size (a count of one or two people
    is itself a fact about them), and takes no part in the gaps. When the
    suppressed groups of a column hold fewer than ``min_group_size`` people
    together, the smallest reported groups are suppressed too, so that their
    total (n minus the reported sizes) does not give a small group away. A gap is
    ``{"gap", "max_group", "max", "min_group", "min"}`` between two different
    groups where the metric is defined, or None with fewer than two such
    groups (one group has no gap, which is not a gap of 0); gaps are reported
    for accuracy, balanced accuracy, F1, recall (equal opportunity), positive
    rate (demographic parity), ROC AUC and ECE.

    ``order`` lists a column's groups as they should read (bins in ascending
    order, public categories); listed groups appear even when empty (then
    suppressed), other labels seen follow sorted. Without it, labels are sorted.

    A large gap means the model serves one group worse than another; read it
    next to the group sizes, since a small group's metrics are noisy.
    """
    y, p = _check_classification(y_true, proba, classes)

    def metrics_of(rows: NDArray[np.bool_]) -> dict[str, Any]:
        return classification_metrics(y[rows], p[rows], classes=classes)

    return _per_group(groups, len(y), metrics_of, CLASSIFICATION_GAP_METRICS, min_group_size,
                      order or {})


def group_regression_metrics(groups: Mapping[str, ArrayLike], y_true: ArrayLike,
                             y_pred: ArrayLike, *, min_group_size: int = 1,
                             order: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """`group_metrics` for a regression target: MAE, RMSE and R2 per group, and their gaps."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    q = np.asarray(y_pred, dtype=np.float64).ravel()

    def metrics_of(rows: NDArray[np.bool_]) -> dict[str, Any]:
        return regression_metrics(t[rows], q[rows])

    return _per_group(groups, len(t), metrics_of, REGRESSION_GAP_METRICS, min_group_size,
                      order or {})


def _per_group(groups: Mapping[str, ArrayLike], n: int,
               metrics_of: Callable[[NDArray[np.bool_]], dict[str, Any]],
               gap_metrics: tuple[str, ...], min_group_size: int,
               order: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    if min_group_size < 1:
        raise ValueError("min_group_size must be at least 1")
    report: dict[str, Any] = {}
    for column, raw in groups.items():
        values = _group_labels(raw)
        if len(values) != n:
            raise ValueError(f"sensitive column {column!r} has {len(values)} values, expected {n}")
        present, counts = np.unique(values, return_counts=True)
        counted = {str(v): int(c) for v, c in zip(present, counts, strict=True)}
        listed = [str(label) for label in order.get(column, ())]
        labels = list(dict.fromkeys([*listed, *sorted(set(counted) - set(listed))]))
        sizes = {value: counted.get(value, 0) for value in labels}
        suppressed = _suppressed_groups(sizes, min_group_size)
        per_value: dict[str, dict[str, Any]] = {}
        for value in labels:
            if value in suppressed:
                per_value[value] = {"suppressed": True}
            else:
                per_value[value] = metrics_of(values == value)
        report[column] = {"min_group_size": min_group_size, "groups": per_value,
                          "gaps": {m: _gap(per_value, m) for m in gap_metrics}}
    return report


def _suppressed_groups(sizes: Mapping[str, int], min_group_size: int) -> set[str]:
    """The groups too small to publish, and enough others that their total is not small either.

    The test set's size is published, so the people in a column's suppressed groups together
    number n minus the reported sizes: with one small group suppressed, that is its size.
    While that total is below ``min_group_size`` (and above 0), the smallest reported group is
    suppressed too (complementary suppression, as statistical offices do for tables).
    """
    suppressed = {g for g, size in sizes.items() if size < min_group_size}
    hidden = sum(sizes[g] for g in suppressed)
    reported = sorted((g for g in sizes if g not in suppressed), key=lambda g: sizes[g])
    for group in reported:
        if not 0 < hidden < min_group_size:
            break
        suppressed.add(group)
        hidden += sizes[group]
    return suppressed


def _group_labels(raw: ArrayLike) -> NDArray[np.str_]:
    def label(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return MISSING_GROUP
        return str(v)

    return np.array([label(v) for v in np.asarray(raw, dtype=object).ravel()], dtype=np.str_)


def _gap(per_value: dict[str, dict[str, Any]], metric: str) -> dict[str, Any] | None:
    defined = {g: m[metric] for g, m in per_value.items()
               if not m.get("suppressed") and _is_number(m.get(metric))}
    if len(defined) < 2:
        return None
    # The two ends of one ordering: with tied values, max() and min() would both pick the
    # first group and report a group against itself.
    ranked = sorted(defined, key=lambda g: defined[g])
    low, high = ranked[0], ranked[-1]
    return {"gap": float(defined[high] - defined[low]), "max_group": high,
            "max": float(defined[high]), "min_group": low, "min": float(defined[low])}


# --- helpers ----------------------------------------------------------------------------------


def _check_classification(y_true: ArrayLike, proba: ArrayLike, classes: list[str] | None
                          ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"proba must be (n, k) with k >= 2, got shape {p.shape}")
    if classes is not None and len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} classes but proba has {p.shape[1]} columns")
    if y.ndim != 1 or len(y) != p.shape[0]:
        raise ValueError(f"y_true must be 1-d with {p.shape[0]} entries, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("no examples to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold class indices (integers), got {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"class indices must be in [0, {p.shape[1] - 1}]")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must be finite and in [0, 1]")
    return y.astype(np.int64), p


def _multiclass_auc(y: NDArray[np.int64], p: NDArray[np.float64]) -> float | None:
    if p.shape[1] == 2:
        return roc_auc_score(y == 1, p[:, 1])
    present = np.unique(y)
    if len(present) < 2:
        return None
    aucs = [roc_auc_score(y == c, p[:, c]) for c in present]
    return float(np.mean([a for a in aucs if a is not None]))


def _ratio(numerator: NDArray[Any], denominator: NDArray[Any]) -> NDArray[np.float64]:
    """Elementwise numerator / denominator, 0.0 where the denominator is 0."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(float(value)))
