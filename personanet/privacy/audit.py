"""A membership-inference audit: how much does the trained model give away about who was in it?

The attacker sees one person's record and the model's loss on it, and guesses
"member" (the person was in the training data) when the loss is low: a model
fits the people it was trained on better than people it never saw (Yeom et
al. 2018). We run that attack on the training members and on held-out
non-members and report:

- ``attack_auc``: the chance a random member has lower loss than a random
  non-member; 0.5 is a coin flip.
- ``tpr_at_1pct_fpr`` / ``tpr_at_01pct_fpr``: the share of members the
  attacker identifies while wrongly accusing at most 1% / 0.1% of
  non-members. An attack that is confidently right about a few people harms
  them even when its AUC is near 0.5 (Carlini et al. 2022, "Membership
  Inference Attacks From First Principles").
- ``epsilon_lower_bound``: an empirical lower bound on the model's privacy
  loss epsilon (Jagielski et al. 2020, "Auditing Differentially Private
  Machine Learning: How Private is Private SGD?").

What the lower bound means. If training is (epsilon, delta)-DP, every
membership test -- any attack, at any threshold -- must satisfy

    TPR <= e^epsilon * FPR + delta        and        TNR <= e^epsilon * FNR + delta,

so an attack that achieves a given (TPR, FPR) proves
``epsilon >= ln((TPR - delta) / FPR)`` and ``epsilon >= ln((1 - FPR - delta) / FNR)``.
We do not know the true rates, only counts on finitely many people, so we
plug in the pessimistic ends of Clopper-Pearson intervals (the lower bound of
TPR/TNR, the upper bound of FPR/FNR). Both bounds rest on the same two
one-sided intervals (the FPR upper bound and the FNR upper bound), each at
``1 - (1 - confidence) / 2``, so with probability at least ``confidence``
both hold at once and the larger of the two bounds is valid; this is the
two-sided interval Jagielski et al. use. The threshold is chosen on one random
half of the people (the one that maximises the bound there) and the bound is
computed on the other half only, so picking the best threshold does not
inflate it. Members and non-members are subsampled to equal size first, so
the game is the standard one with a prior of 1/2.

Why it is a *lower* bound. It measures one particular, weak attack (a loss
threshold, on natural data, against the final model only). The true epsilon
of the training run is at least this, and usually far more than any such
attack demonstrates; DP-SGD's accounting is a worst case over all datasets
and attackers. So:

- ``epsilon_lower_bound > epsilon_claimed`` is evidence (at the stated
  confidence) that the claim is false: a bug in the noise, the sampling, the
  accounting, or data that leaked around the training loop. The audit fails.
- ``epsilon_lower_bound <= epsilon_claimed`` proves nothing about the claim;
  it only fails to refute it. ``passed`` is True in that sense, never "the
  model is private".
- For a non-private model there is no claim (``passed`` is None); the bound
  then says how much privacy it demonstrably lacks.

What the bound assumes. Members and non-members must be exchangeable: people
assigned to train or test by a coin that ignores their data (the pseudonym
hash split of docs/cleaning.md, "Split", or a fixed split that was itself drawn at random). If
the two sides differ in distribution (a split by date or by source), the
attack also detects that shift, and the bound -- and a failed audit -- may reflect the split
rather than the model. The losses must come from the final model in eval mode
(no dropout), computed identically on both sides. Finally, the
Clopper-Pearson intervals treat people as independent trials, as Jagielski et
al. do across training runs; within one training run the guesses are
dependent. Steinke, Nasr & Jagielski 2023 ("Privacy Auditing with One (1)
Training Run") prove a one-run bound of this kind valid when membership is
an independent coin per person; their bound is the rigorous version of this
estimate.

Per-example calibration. Strong attacks calibrate each person's loss by how
hard that person is anyway (Watson et al. 2022; Carlini et al.'s LiRA), which
needs reference models trained without the person: extra training, which this
audit does not do. The cheap and sound part of that idea is available, and
offered through ``member_strata`` / ``nonmember_strata``: calibrate by a
per-stratum difficulty (typically the true class, since a rare class has high
loss whether seen or not): each loss minus the median loss of the
non-members of its stratum, estimated on the threshold-selection half only,
so the bound on the other half stays valid. Pick one attack before looking at
the results: reporting the larger of two bounds would need a further
multiple-testing correction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from personanet.reporting.metrics import roc_auc_score, roc_curve

#: FPR targets of the low-FPR report
LOW_FPRS = (0.01, 0.001)


@dataclass(frozen=True)
class AuditResult:
    """The audit's findings; see the module docstring for what each figure means for privacy."""

    #: AUC of the loss-threshold attack over all members and non-members (0.5: no signal)
    attack_auc: float
    #: share of members identified at <= 1% false accusations (step ROC, no interpolation)
    tpr_at_1pct_fpr: float
    #: same at <= 0.1%; coarse when there are fewer than ~1000 non-members
    tpr_at_01pct_fpr: float
    #: epsilon the attack proves at `confidence` (0 when it proves nothing)
    epsilon_lower_bound: float
    #: epsilon the training run claims; None for a non-private model
    epsilon_claimed: float | None
    #: delta used in the bound (the claim's delta)
    delta: float
    #: loss threshold chosen on the selection half: "member" iff loss <= threshold
    #: (in calibrated units, loss minus its stratum's offset, when calibration is "stratum")
    threshold: float
    #: members and non-members given to the audit
    n_members: int
    n_nonmembers: int
    #: per side, after subsampling the larger side to the smaller
    n_balanced: int
    #: per side, in the half the bound is computed on
    n_evaluated: int
    #: one-sided Clopper-Pearson bounds on that half at the chosen threshold
    tpr_lower: float
    fpr_upper: float
    #: which inequality gave the bound: "tpr/fpr" or "tnr/fnr" (None when it is 0)
    bound_form: str | None
    #: lower bound <= claim; None without a claim. True refutes nothing, it does not certify
    passed: bool | None
    confidence: float = 0.95
    #: "none", or "stratum" when losses were calibrated by per-stratum difficulty
    calibration: str = "none"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite thresholds become None)."""
        out = asdict(self)
        if not math.isfinite(out["threshold"]):
            out["threshold"] = None
        return out


def membership_inference_audit(member_losses: ArrayLike, nonmember_losses: ArrayLike, *,
                               delta: float, epsilon_claimed: float | None, seed: int,
                               confidence: float = 0.95,
                               member_strata: ArrayLike | None = None,
                               nonmember_strata: ArrayLike | None = None) -> AuditResult:
    """Run the loss-threshold attack on members vs non-members and bound epsilon from below.

    ``member_losses``: per-example losses of people in the training data;
    ``nonmember_losses``: of held-out people (never trained on). ``delta`` and
    ``epsilon_claimed`` are the training run's claim (``epsilon_claimed=None``
    for a non-private model). Everything random (subsampling, the split into
    halves) is deterministic from ``seed``. With ``member_strata`` and
    ``nonmember_strata`` (one label per example, e.g. the true class) the
    losses are first calibrated by per-stratum difficulty (module docstring).
    """
    members = _losses(member_losses, "member_losses")
    nonmembers = _losses(nonmember_losses, "nonmember_losses")
    if not 0 <= delta < 1:
        raise ValueError("delta must be in [0, 1)")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    if epsilon_claimed is not None and not epsilon_claimed >= 0:
        raise ValueError("epsilon_claimed must be >= 0 or None")
    n_balanced = min(len(members), len(nonmembers))
    if n_balanced < 2:
        raise ValueError("the audit needs at least 2 members and 2 non-members")

    rng = np.random.default_rng(seed)
    member_rows = _balanced_halves(len(members), n_balanced, rng)
    nonmember_rows = _balanced_halves(len(nonmembers), n_balanced, rng)

    calibration = "none"
    if member_strata is not None or nonmember_strata is not None:
        if member_strata is None or nonmember_strata is None:
            raise ValueError("pass both member_strata and nonmember_strata, or neither")
        members, nonmembers = _calibrate_by_stratum(
            members, nonmembers, np.asarray(member_strata), np.asarray(nonmember_strata),
            reference=nonmember_rows[0])
        calibration = "stratum"

    labels = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    scores = -np.r_[members, nonmembers]
    auc = roc_auc_score(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)

    threshold = _select_threshold(members[member_rows[0]], nonmembers[nonmember_rows[0]],
                                  delta=delta, confidence=confidence)
    held_members = members[member_rows[1]]
    held_nonmembers = nonmembers[nonmember_rows[1]]
    true_positives = int(np.sum(held_members <= threshold))
    false_positives = int(np.sum(held_nonmembers <= threshold))
    per_bound = _per_bound_confidence(confidence)
    bound, form = _epsilon_bound(np.array([true_positives]), len(held_members),
                                 np.array([false_positives]), len(held_nonmembers),
                                 delta=delta, per_bound=per_bound)
    lower_bound = max(0.0, float(bound[0]))

    return AuditResult(
        attack_auc=float(auc) if auc is not None else 0.5,
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, LOW_FPRS[0]),
        tpr_at_01pct_fpr=tpr_at_fpr(fpr, tpr, LOW_FPRS[1]),
        epsilon_lower_bound=lower_bound,
        epsilon_claimed=None if epsilon_claimed is None else float(epsilon_claimed),
        delta=float(delta),
        threshold=float(threshold),
        n_members=len(members),
        n_nonmembers=len(nonmembers),
        n_balanced=n_balanced,
        n_evaluated=len(held_members),
        tpr_lower=clopper_pearson_lower(true_positives, len(held_members), per_bound),
        fpr_upper=clopper_pearson_upper(false_positives, len(held_nonmembers), per_bound),
        bound_form=str(form[0]) if lower_bound > 0 else None,
        passed=None if epsilon_claimed is None else lower_bound <= epsilon_claimed,
        confidence=confidence,
        calibration=calibration,
    )


def attack_roc_curve(member_losses: ArrayLike, nonmember_losses: ArrayLike
                     ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(FPR, TPR) of the loss-threshold attack over all data, for the log-log attack plot."""
    members = _losses(member_losses, "member_losses")
    nonmembers = _losses(nonmember_losses, "nonmember_losses")
    labels = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    fpr, tpr, _ = roc_curve(labels, -np.r_[members, nonmembers])
    return fpr, tpr


def per_person(losses: ArrayLike, units: ArrayLike, strata: ArrayLike | None = None
               ) -> tuple[NDArray[np.float64], NDArray[Any] | None]:
    """The audit's scores when a person may have several rows: one per person.

    A member is a person, all of their rows (the unit person-level DP protects), so the
    attacker scores each person by the mean loss over their rows, and the bound is then
    per person, comparable to a per-person epsilon. Returns the mean losses (ordered by
    unit) and each person's stratum: the one most of their rows have (ties: the
    smallest), or None without `strata`.
    """
    values = _losses(losses, "losses")
    ids, inverse = np.unique(np.asarray(units), return_inverse=True)
    if len(inverse) != len(values):
        raise ValueError("one unit per loss")
    means = np.bincount(inverse, weights=values) / np.bincount(inverse)
    if strata is None:
        return means, None
    labels, label_index = np.unique(np.asarray(strata), return_inverse=True)
    table = np.zeros((len(ids), len(labels)))
    np.add.at(table, (inverse, label_index), 1)
    return means, labels[table.argmax(1)]


def tpr_at_fpr(fpr: ArrayLike, tpr: ArrayLike, target_fpr: float) -> float:
    """The best TPR among ROC points whose FPR does not exceed ``target_fpr``.

    Conservative: the ROC is read as a step function. Linear interpolation
    towards the next point would also be achievable (by a randomised
    threshold) and would be at least this; we report the lower value.
    """
    f = np.asarray(fpr, dtype=np.float64)
    t = np.asarray(tpr, dtype=np.float64)
    allowed = f <= target_fpr + 1e-12
    return float(t[allowed].max()) if allowed.any() else 0.0


def clopper_pearson_lower(successes: int, trials: int, confidence: float) -> float:
    """One-sided exact lower bound on a binomial proportion: P(p >= bound) >= confidence."""
    from scipy.stats import beta

    _check_counts(successes, trials)
    if successes == 0:
        return 0.0
    return float(beta.ppf(1 - confidence, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, confidence: float) -> float:
    """One-sided exact upper bound on a binomial proportion: P(p <= bound) >= confidence."""
    from scipy.stats import beta

    _check_counts(successes, trials)
    if successes == trials:
        return 1.0
    return float(beta.ppf(confidence, successes + 1, trials - successes))


def empirical_epsilon(true_positives: int, n_members: int, false_positives: int,
                      n_nonmembers: int, *, delta: float, confidence: float = 0.95) -> float:
    """The epsilon that counts of one fixed membership test prove at ``confidence``; >= 0.

    ``max(ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo)))``,
    each rate bounded one-sided at ``1 - (1 - confidence) / 2`` so both hold
    jointly at ``confidence``; 0 where no numerator is positive. Valid only
    for a threshold chosen without looking at these counts.
    """
    bound, _ = _epsilon_bound(np.array([true_positives]), n_members,
                              np.array([false_positives]), n_nonmembers, delta=delta,
                              per_bound=_per_bound_confidence(confidence))
    return max(0.0, float(bound[0]))


# --- internals --------------------------------------------------------------------------------


def _per_bound_confidence(confidence: float) -> float:
    # Two one-sided bounds (FPR and FNR) must hold at once: Bonferroni over the pair.
    return 1 - (1 - confidence) / 2


def _epsilon_bound(true_positives: NDArray[np.int64], n_members: int,
                   false_positives: NDArray[np.int64], n_nonmembers: int, *, delta: float,
                   per_bound: float) -> tuple[NDArray[np.float64], NDArray[np.str_]]:
    """Unclamped bound (``-inf`` where no numerator is positive) and its form, per threshold."""
    from scipy.stats import beta

    tp = np.asarray(true_positives, dtype=np.float64)
    fp = np.asarray(false_positives, dtype=np.float64)
    tpr_lo = np.where(tp == 0, 0.0, beta.ppf(1 - per_bound, np.maximum(tp, 1), n_members - tp + 1))
    fpr_hi = np.where(fp == n_nonmembers, 1.0,
                      beta.ppf(per_bound, fp + 1, np.maximum(n_nonmembers - fp, 1)))
    fnr_hi = 1.0 - tpr_lo
    with np.errstate(divide="ignore", invalid="ignore"):
        by_tpr = _safe_log_ratio(tpr_lo - delta, fpr_hi)
        by_tnr = _safe_log_ratio(1.0 - fpr_hi - delta, fnr_hi)
    form = np.where(by_tpr >= by_tnr, "tpr/fpr", "tnr/fnr")
    return np.maximum(by_tpr, by_tnr), form


def _safe_log_ratio(numerator: NDArray[np.float64], denominator: NDArray[np.float64]
                    ) -> NDArray[np.float64]:
    # CP upper bounds are > 0 for any count below n, so the denominator is positive
    # whenever the numerator is; a non-positive numerator proves nothing.
    ok = (numerator > 0) & (denominator > 0)
    out = np.full(numerator.shape, -np.inf)
    out[ok] = np.log(numerator[ok] / denominator[ok])
    return out


def _select_threshold(members: NDArray[np.float64], nonmembers: NDArray[np.float64], *,
                      delta: float, confidence: float) -> float:
    """The loss threshold that maximises the bound on this (selection) half.

    Ties, including the case where no threshold proves anything, go to the
    larger attack advantage TPR - FPR.
    """
    candidates = np.unique(np.r_[members, nonmembers])
    tp = np.searchsorted(np.sort(members), candidates, side="right")
    fp = np.searchsorted(np.sort(nonmembers), candidates, side="right")
    bound, _ = _epsilon_bound(tp, len(members), fp, len(nonmembers), delta=delta,
                              per_bound=_per_bound_confidence(confidence))
    advantage = tp / len(members) - fp / len(nonmembers)
    best = np.lexsort((advantage, bound))[-1]
    if best + 1 < len(candidates):
        # Midway to the next observed loss: the same split of this half, with a margin
        # for the unseen half.
        return float((candidates[best] + candidates[best + 1]) / 2)
    return float(candidates[best])


def _balanced_halves(n: int, n_balanced: int, rng: np.random.Generator
                     ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Row indices of a random subsample of size ``n_balanced``, split into two halves."""
    rows = rng.permutation(n)[:n_balanced]
    half = n_balanced // 2
    return rows[:half], rows[half:]


def _calibrate_by_stratum(members: NDArray[np.float64], nonmembers: NDArray[np.float64],
                          member_strata: NDArray[Any], nonmember_strata: NDArray[Any], *,
                          reference: NDArray[np.int64]
                          ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each loss minus the median non-member loss of its stratum, from ``reference`` rows only."""
    if len(member_strata) != len(members) or len(nonmember_strata) != len(nonmembers):
        raise ValueError("strata must have one label per loss")
    ref_losses = nonmembers[reference]
    ref_strata = nonmember_strata[reference]
    fallback = float(np.median(ref_losses))
    offsets = {s: float(np.median(ref_losses[ref_strata == s]))
               for s in np.unique(ref_strata).tolist()}

    def calibrated(losses: NDArray[np.float64], strata: NDArray[Any]) -> NDArray[np.float64]:
        return losses - np.array([offsets.get(s, fallback) for s in strata.tolist()])

    return calibrated(members, member_strata), calibrated(nonmembers, nonmember_strata)


def _losses(values: ArrayLike, name: str) -> NDArray[np.float64]:
    losses = np.asarray(values, dtype=np.float64).ravel()
    if len(losses) == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(losses).any():
        raise ValueError(f"{name} contains NaN")
    return losses


def _check_counts(successes: int, trials: int) -> None:
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
