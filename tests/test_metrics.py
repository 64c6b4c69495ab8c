"""Evaluation metrics (README: Reading your outputs), checked against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from personanet.reporting.metrics import (
    bootstrap_ci,
    bootstrap_cis,
    calibration_curve,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    group_metrics,
    group_regression_metrics,
    regression_metrics,
    roc_auc_score,
    roc_curve,
)

BINARY = ["no", "yes"]
# y = [0, 0, 1, 1, 1]; P(yes) = [.1, .6, .4, .8, .9]; predictions [0, 1, 0, 1, 1]:
# TP = 2, FP = 1, FN = 1, TN = 1.
Y_SMALL = np.array([0, 0, 1, 1, 1])
P_SMALL = np.array([0.1, 0.6, 0.4, 0.8, 0.9])


def binary_proba(p_positive: np.ndarray) -> np.ndarray:
    p = np.asarray(p_positive, dtype=float)
    return np.c_[1 - p, p]


# --- classification, by hand ------------------------------------------------------------------


def test_binary_metrics_match_hand_computation() -> None:
    m = classification_metrics(Y_SMALL, binary_proba(P_SMALL), classes=BINARY)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # positive scores {.4, .8, .9} beat negatives {.1, .6} in 5 of 6 pairs
    assert m["roc_auc"] == pytest.approx(5 / 6)
    true_class_proba = [0.9, 0.4, 0.4, 0.8, 0.9]
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(true_class_proba)))
    # bins: conf .9 (2 right) -> .1; conf .6 (both wrong) -> .6; conf .8 (right) -> .2
    assert m["ece"] == pytest.approx(0.4 * 0.1 + 0.4 * 0.6 + 0.2 * 0.2)
    assert m["positive_rate"] == pytest.approx(3 / 5)
    assert m["prevalence"] == pytest.approx(3 / 5)


def test_multiclass_metrics_are_macro_averages() -> None:
    y = np.array([0, 1, 2, 2])
    proba = np.array([[0.7, 0.2, 0.1],
                      [0.1, 0.3, 0.6],
                      [0.2, 0.2, 0.6],
                      [0.2, 0.5, 0.3]])
    m = classification_metrics(y, proba, classes=["a", "b", "c"])
    # per class precision (1, 0, 1/2), recall (1, 0, 1/2), F1 (1, 0, 1/2)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    # one-vs-rest AUCs: a 1, b 2/3, c (1 + .5 + 1 + 0) / 4 (a tie counts one half)
    assert m["roc_auc"] == pytest.approx((1 + 2 / 3 + 0.625) / 3)
    assert m["positive_rate"] is None and m["prevalence"] is None


def test_zero_division_gives_zero_not_nan() -> None:
    # Nobody predicted positive: precision is 0/0.
    m = classification_metrics(np.array([0, 1, 1]), binary_proba([0.1, 0.2, 0.3]),
                               classes=BINARY)
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_auc_is_none_when_only_one_class_is_present() -> None:
    m = classification_metrics(np.array([1, 1, 1]), binary_proba([0.2, 0.7, 0.9]),
                               classes=BINARY)
    assert m["roc_auc"] is None
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_perfect_classifier_has_auc_one_and_reversed_zero() -> None:
    y = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc_score(y, scores) == 1.0
    assert roc_auc_score(y, -scores) == 0.0


def test_constant_scores_have_auc_one_half() -> None:
    assert roc_auc_score([0, 1, 0, 1, 1], np.full(5, 0.3)) == 0.5


def test_log_loss_stays_finite_for_confidently_wrong_predictions() -> None:
    m = classification_metrics(np.array([1, 0]), binary_proba([0.0, 1.0]), classes=BINARY)
    assert m["log_loss"] == pytest.approx(-math.log(1e-15))


def test_ece_is_zero_for_a_perfectly_calibrated_toy() -> None:
    # 80% confident about ten people, eight of them right; 60% about five, three right.
    y = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 2)
    p = np.array([0.8] * 10 + [0.6] * 5)
    assert expected_calibration_error(y, binary_proba(p)) == pytest.approx(0.0)


def test_ece_of_an_overconfident_model_is_the_confidence_accuracy_gap() -> None:
    y = np.array([1, 0] * 10)
    assert expected_calibration_error(y, binary_proba(np.full(20, 0.9))) == pytest.approx(0.4)


def test_calibration_curve_reports_nonempty_bins_only() -> None:
    confidence, accuracy, count = calibration_curve(Y_SMALL, binary_proba(P_SMALL))
    assert confidence == pytest.approx([0.6, 0.8, 0.9])
    assert accuracy == pytest.approx([0.0, 1.0, 1.0])
    assert count.tolist() == [2, 1, 2]


def test_confusion_matrix_rows_are_true_classes() -> None:
    cm = confusion_matrix([0, 0, 1, 1, 1], [0, 1, 0, 1, 1], n_classes=2)
    assert cm.tolist() == [[1, 1], [1, 2]]


@pytest.mark.parametrize(("y", "proba", "message"), [
    (np.array([0, 2]), binary_proba([0.1, 0.2]), "class indices"),
    (np.array([0.0, 1.0]), binary_proba([0.1, 0.2]), "integers"),
    (np.array([0, 1, 1]), binary_proba([0.1, 0.2]), "1-d with 2"),
    (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), "finite"),
    (np.array([0, 1]), np.array([0.1, 0.2]), "shape"),
])
def test_malformed_inputs_are_rejected(y: np.ndarray, proba: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, proba, classes=BINARY)


def test_class_list_must_match_probability_columns() -> None:
    with pytest.raises(ValueError, match="3 classes"):
        classification_metrics(Y_SMALL, binary_proba(P_SMALL), classes=["a", "b", "c"])


def test_metrics_agree_with_scikit_learn() -> None:
    # A dev dependency, imported plainly: a cross-check that skips when absent checks nothing.
    import sklearn.metrics as sk

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet([1, 1, 1], 300)
    m = classification_metrics(y, proba, classes=["a", "b", "c"])
    pred = proba.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(sk.f1_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, proba, multi_class="ovr"))
    assert m["log_loss"] == pytest.approx(sk.log_loss(y, proba))


# --- ROC curve --------------------------------------------------------------------------------


def test_roc_curve_matches_hand_computation() -> None:
    fpr, tpr, thresholds = roc_curve(Y_SMALL, P_SMALL, drop_intermediate=False)
    assert fpr.tolist() == pytest.approx([0, 0, 0, 0.5, 0.5, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert thresholds.tolist() == [math.inf, 0.9, 0.8, 0.6, 0.4, 0.1]


def test_roc_curve_drops_only_collinear_points() -> None:
    y = np.array([1, 1, 1, 0, 0])
    fpr, tpr, _ = roc_curve(y, np.array([5, 4, 3, 2, 1]))
    assert list(zip(fpr.tolist(), tpr.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 1)]


def test_roc_curve_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        roc_curve([1, 1], [0.2, 0.4])


labels_and_scores = st.integers(2, 60).flatmap(lambda n: st.tuples(
    hnp.arrays(bool, n).filter(lambda y: 0 < y.sum() < len(y)),
    hnp.arrays(np.int64, n, elements=st.integers(-50, 50))))


@settings(max_examples=60, deadline=None)
@given(labels_and_scores)
def test_auc_is_invariant_to_monotone_transforms_of_scores(data: tuple) -> None:
    y, scores = data
    transformed = 2.0 * scores.astype(float) ** 3 + scores - 7  # strictly increasing, exact
    assert roc_auc_score(y, transformed) == pytest.approx(roc_auc_score(y, scores))


@settings(max_examples=60, deadline=None)
@given(labels_and_scores)
def test_auc_equals_the_area_under_the_roc_curve(data: tuple) -> None:
    y, scores = data
    fpr, tpr, _ = roc_curve(y, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, scores))


@settings(max_examples=60, deadline=None)
@given(labels_and_scores)
def test_negating_scores_mirrors_the_auc(data: tuple) -> None:
    y, scores = data
    assert roc_auc_score(y, scores) + roc_auc_score(y, -scores) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(
    hnp.arrays(np.int64, n, elements=st.integers(0, 2)),
    hnp.arrays(float, (n, 3), elements=st.floats(0.01, 1.0)))))
def test_rate_metrics_lie_in_the_unit_interval(data: tuple) -> None:
    y, weights = data
    proba = weights / weights.sum(axis=1, keepdims=True)
    m = classification_metrics(y, proba, classes=["a", "b", "c"])
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "ece"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["roc_auc"] is None or 0.0 <= m["roc_auc"] <= 1.0
    assert m["log_loss"] >= 0.0


# --- regression -------------------------------------------------------------------------------


def test_regression_metrics_match_hand_computation() -> None:
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 5])
    assert m == {"mae": pytest.approx(0.25), "rmse": pytest.approx(0.5),
                 "r2": pytest.approx(1 - 1 / 5), "n": 4}


def test_r2_is_none_for_a_constant_target() -> None:
    assert regression_metrics([3, 3, 3], [3, 2, 4])["r2"] is None


def test_regression_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ"):
        regression_metrics([1, 2], [1])


# --- bootstrap --------------------------------------------------------------------------------


def accuracy_of(y: np.ndarray, proba: np.ndarray) -> float:
    return classification_metrics(y, proba, classes=BINARY)["accuracy"]


def test_bootstrap_is_deterministic_from_the_seed() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    proba = binary_proba(rng.uniform(size=200))
    first = bootstrap_ci(accuracy_of, y, proba, n_resamples=50, seed=7)
    assert bootstrap_ci(accuracy_of, y, proba, n_resamples=50, seed=7) == first
    assert bootstrap_ci(accuracy_of, y, proba, n_resamples=50, seed=8) != first


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation() -> None:
    x = np.random.default_rng(1).normal(size=400)
    low, high = bootstrap_ci(np.mean, x, n_resamples=1000, seed=0)
    assert low < x.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * x.std() / 20, rel=0.15)


def test_bootstrap_without_resamples_or_without_a_defined_metric_gives_no_interval() -> None:
    x = np.arange(10.0)
    assert bootstrap_ci(np.mean, x, n_resamples=0, seed=0) == (None, None)
    assert bootstrap_ci(lambda a: None, x, n_resamples=20, seed=0) == (None, None)


def test_bootstrap_of_all_metrics_uses_the_same_resamples_as_one_metric() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 150)
    proba = binary_proba(rng.uniform(size=150))
    cis = bootstrap_cis(lambda a, b: classification_metrics(a, b, classes=BINARY), y, proba,
                        n_resamples=40, seed=3)
    assert cis["accuracy"] == bootstrap_ci(accuracy_of, y, proba, n_resamples=40, seed=3)
    assert "n" not in cis
    assert cis["positive_rate"][0] <= cis["positive_rate"][1]


def test_bootstrap_rejects_arrays_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci(accuracy_of, np.zeros(3, int), binary_proba([0.1, 0.2]), n_resamples=5,
                     seed=0)


# --- groups -----------------------------------------------------------------------------------


def test_group_metrics_report_each_group_and_the_largest_gap() -> None:
    sex = np.array(["F", "F", "M", "M", "M"])
    report = group_metrics({"sex": sex}, Y_SMALL, binary_proba(P_SMALL), BINARY)
    groups = report["sex"]["groups"]
    assert groups["F"]["n"] == 2 and groups["F"]["accuracy"] == pytest.approx(0.5)
    assert groups["M"]["n"] == 3 and groups["M"]["accuracy"] == pytest.approx(2 / 3)
    assert report["sex"]["gaps"]["accuracy"] == {
        "gap": pytest.approx(1 / 6), "max_group": "M", "max": pytest.approx(2 / 3),
        "min_group": "F", "min": pytest.approx(0.5)}
    # each group holds a single class: AUC is undefined in both, so is its gap
    assert report["sex"]["gaps"]["roc_auc"] is None


def test_groups_below_the_minimum_size_are_suppressed_and_left_out_of_gaps() -> None:
    sex = np.array(["F", "F", "M", "M", "M"])
    report = group_metrics({"sex": sex}, Y_SMALL, binary_proba(P_SMALL), BINARY,
                           min_group_size=3)
    # neither the metrics nor the size of a suppressed group are published
    assert report["sex"]["groups"]["F"] == {"suppressed": True}
    assert report["sex"]["gaps"]["accuracy"] is None


def test_missing_group_values_form_their_own_group() -> None:
    race = np.array(["a", None, "a", None, "b"], dtype=object)
    report = group_metrics({"race": race}, Y_SMALL, binary_proba(P_SMALL), BINARY)
    assert set(report["race"]["groups"]) == {"a", "b", "(missing)"}
    assert sum(g["n"] for g in report["race"]["groups"].values()) == 5


def test_group_column_of_the_wrong_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="sex"):
        group_metrics({"sex": np.array(["F"])}, Y_SMALL, binary_proba(P_SMALL), BINARY)


def test_regression_groups_report_error_gaps() -> None:
    report = group_regression_metrics({"g": np.array(["a", "a", "b", "b"])}, [1, 2, 3, 4],
                                      [1, 2, 3, 6])
    assert report["g"]["groups"]["a"]["mae"] == 0.0
    assert report["g"]["gaps"]["mae"]["gap"] == pytest.approx(1.0)
    assert report["g"]["gaps"]["mae"]["max_group"] == "b"
