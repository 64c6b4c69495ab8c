"""Behaviour of the membership-inference audit (Jagielski et al. 2020)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import beta, binomtest

from personanet.privacy.audit import (
    AuditResult,
    attack_roc_curve,
    clopper_pearson_lower,
    clopper_pearson_upper,
    empirical_epsilon,
    membership_inference_audit,
    tpr_at_fpr,
)

DELTA = 1e-5


def audit(members: np.ndarray, nonmembers: np.ndarray, *, claim: float | None = 1.0,
          seed: int = 0, **kwargs: object) -> AuditResult:
    return membership_inference_audit(members, nonmembers, delta=DELTA, epsilon_claimed=claim,
                                      seed=seed, **kwargs)


# --- Clopper-Pearson --------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (17, 500), (499, 500)])
def test_clopper_pearson_bounds_are_beta_quantiles(k: int, n: int) -> None:
    lower = clopper_pearson_lower(k, n, 0.95)
    upper = clopper_pearson_upper(k, n, 0.95)
    assert lower == (0.0 if k == 0 else pytest.approx(beta.ppf(0.05, k, n - k + 1)))
    assert upper == (1.0 if k == n else pytest.approx(beta.ppf(0.95, k + 1, n - k)))


@pytest.mark.parametrize(("k", "n"), [(1, 10), (3, 10), (17, 500), (250, 500)])
def test_one_sided_bounds_are_the_ends_of_the_two_sided_exact_interval(k: int, n: int) -> None:
    interval = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")
    assert clopper_pearson_lower(k, n, 0.95) == pytest.approx(interval.low)
    assert clopper_pearson_upper(k, n, 0.95) == pytest.approx(interval.high)


def test_clopper_pearson_has_closed_forms_at_the_extremes() -> None:
    # With no successes in n, P(0 successes) = (1 - p)^n >= 0.05 iff p <= 1 - 0.05^(1/n).
    assert clopper_pearson_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert clopper_pearson_lower(100, 100, 0.95) == pytest.approx(0.05 ** (1 / 100))


def test_clopper_pearson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        clopper_pearson_upper(11, 10, 0.95)


# --- the epsilon bound from counts ------------------------------------------------------------


def test_empirical_epsilon_from_counts_matches_the_formula() -> None:
    # 90 of 100 members and 10 of 100 non-members flagged; each rate bounded at 97.5%
    tpr_lo = beta.ppf(0.025, 90, 11)
    fpr_hi = beta.ppf(0.975, 11, 90)
    expected = max(math.log((tpr_lo - DELTA) / fpr_hi), math.log((1 - fpr_hi - DELTA) /
                                                                 (1 - tpr_lo)))
    assert empirical_epsilon(90, 100, 10, 100, delta=DELTA) == pytest.approx(expected)
    assert expected > 1.0


def test_an_attack_no_better_than_chance_proves_nothing() -> None:
    assert empirical_epsilon(50, 100, 50, 100, delta=DELTA) == 0.0
    assert empirical_epsilon(0, 100, 0, 100, delta=DELTA) == 0.0


def test_a_larger_delta_weakens_the_bound() -> None:
    strict = empirical_epsilon(90, 100, 10, 100, delta=0.0)
    loose = empirical_epsilon(90, 100, 10, 100, delta=0.1)
    assert 0 < loose < strict


# --- TPR at low FPR ---------------------------------------------------------------------------


def test_tpr_at_fpr_reads_the_roc_as_a_step_function() -> None:
    fpr = np.array([0.0, 0.005, 0.02, 1.0])
    tpr = np.array([0.0, 0.3, 0.6, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.3  # not the interpolated 0.4
    assert tpr_at_fpr(fpr, tpr, 0.001) == 0.0


def test_members_identified_without_a_single_false_accusation_count_at_low_fpr() -> None:
    rng = np.random.default_rng(0)
    members = np.r_[np.full(20, -1.0), rng.uniform(0, 1, 980)]  # 20 members stand out
    nonmembers = rng.uniform(0, 1, 1000)
    result = audit(members, nonmembers)
    assert result.tpr_at_01pct_fpr >= 0.02
    assert result.tpr_at_1pct_fpr >= result.tpr_at_01pct_fpr


# --- the audit --------------------------------------------------------------------------------


def test_identical_member_and_nonmember_losses_give_chance_auc_and_no_epsilon() -> None:
    rng = np.random.default_rng(1)
    result = audit(rng.exponential(1.0, 2000), rng.exponential(1.0, 2000), seed=1)
    assert result.attack_auc == pytest.approx(0.5, abs=0.03)
    assert result.epsilon_lower_bound == 0.0
    assert result.bound_form is None
    assert result.passed is True


def test_perfectly_separated_losses_give_a_large_but_finite_bound() -> None:
    rng = np.random.default_rng(2)
    n = 1000
    result = audit(rng.uniform(0, 1, n), rng.uniform(2, 3, n), claim=1.0, seed=2)
    assert result.attack_auc == 1.0
    assert result.tpr_at_01pct_fpr == 1.0
    assert 2.0 < result.epsilon_lower_bound < math.log(n)
    assert result.passed is False
    assert 1.0 < result.threshold < 2.0


def test_a_non_private_model_has_no_verdict() -> None:
    rng = np.random.default_rng(3)
    result = audit(rng.uniform(0, 1, 500), rng.uniform(2, 3, 500), claim=None)
    assert result.epsilon_claimed is None
    assert result.passed is None
    assert result.epsilon_lower_bound > 0


@pytest.mark.parametrize("mechanism", ["randomized_response", "laplace"])
def test_the_bound_rarely_exceeds_the_true_epsilon_of_a_private_mechanism(mechanism: str) -> None:
    # Losses drawn from mechanisms that are exactly 1-DP: the bound may exceed 1 with
    # probability at most 5%.
    epsilon, exceeded = 1.0, 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        if mechanism == "randomized_response":
            keep = math.exp(epsilon) / (1 + math.exp(epsilon))
            members = (rng.random(400) > keep).astype(float)
            nonmembers = (rng.random(400) > 1 - keep).astype(float)
        else:
            members = rng.laplace(0.0, 1 / epsilon, 400)
            nonmembers = rng.laplace(1.0, 1 / epsilon, 400)
        result = membership_inference_audit(members, nonmembers, delta=0.0,
                                            epsilon_claimed=epsilon, seed=seed)
        exceeded += not result.passed
    assert exceeded <= 5


def test_the_larger_side_is_subsampled_to_balance_the_game() -> None:
    rng = np.random.default_rng(4)
    result = audit(rng.normal(size=3000), rng.normal(size=1001))
    assert (result.n_members, result.n_nonmembers) == (3000, 1001)
    assert result.n_balanced == 1001
    assert result.n_evaluated == 501


def test_the_audit_is_deterministic_from_its_seed() -> None:
    rng = np.random.default_rng(5)
    members, nonmembers = rng.gamma(2.0, 0.4, 1500), rng.gamma(2.0, 0.5, 900)
    assert audit(members, nonmembers, seed=9) == audit(members, nonmembers, seed=9)
    assert audit(members, nonmembers, seed=9).threshold != \
        audit(members, nonmembers, seed=10).threshold


def test_result_serialises_to_json() -> None:
    rng = np.random.default_rng(6)
    payload = audit(rng.normal(size=100), rng.normal(size=100)).to_json()
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert payload["confidence"] == 0.95
    assert {"attack_auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "epsilon_lower_bound",
            "epsilon_claimed", "threshold", "n_members", "n_nonmembers", "passed"} <= set(payload)


def test_attack_roc_curve_runs_from_origin_to_one() -> None:
    fpr, tpr = attack_roc_curve([0.1, 0.2, 0.3], [0.25, 0.4, 0.5])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)


def test_calibrating_by_class_difficulty_exposes_a_leak_hidden_by_hard_classes() -> None:
    rng = np.random.default_rng(7)
    n = 2000
    member_class, nonmember_class = rng.integers(0, 2, n), rng.integers(0, 2, n)
    # class 1 is hard for everybody (loss + 3); training lowers members' loss by 0.5
    members = 3.0 * member_class + rng.normal(0, 0.3, n) - 0.5
    nonmembers = 3.0 * nonmember_class + rng.normal(0, 0.3, n)
    plain = audit(members, nonmembers)
    calibrated = audit(members, nonmembers, member_strata=member_class,
                       nonmember_strata=nonmember_class)
    assert calibrated.calibration == "stratum" and plain.calibration == "none"
    assert calibrated.attack_auc > plain.attack_auc + 0.1
    assert calibrated.epsilon_lower_bound > plain.epsilon_lower_bound


def test_strata_must_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="both"):
        audit(np.zeros(10), np.ones(10), member_strata=np.zeros(10))


@pytest.mark.parametrize(("members", "nonmembers", "kwargs", "message"), [
    ([0.1], [0.2, 0.3], {}, "at least 2"),
    ([0.1, np.nan], [0.2, 0.3], {}, "NaN"),
    ([], [0.2, 0.3], {}, "empty"),
    ([0.1, 0.2], [0.2, 0.3], {"delta": 1.0}, "delta"),
    ([0.1, 0.2], [0.2, 0.3], {"epsilon_claimed": -1.0}, "epsilon_claimed"),
])
def test_malformed_audit_inputs_are_rejected(members: list[float], nonmembers: list[float],
                                             kwargs: dict, message: str) -> None:
    arguments: dict = {"delta": DELTA, "epsilon_claimed": 1.0, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        membership_inference_audit(np.array(members), np.array(nonmembers), **arguments)
