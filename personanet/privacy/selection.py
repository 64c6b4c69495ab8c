"""Private selection: what a hyperparameter search costs, by repeat-and-select.

Choosing the best of several DP training runs on the same people leaks through the
choice: the best of K runs at epsilon each costs about K times epsilon when K is fixed.
Papernot and Steinke (2022, "Hyperparameter Tuning with Renyi Differential Privacy",
arXiv:2110.03620) showed that when K is *random* (Poisson, or truncated negative
binomial) and only the best run's output is released, the whole search costs little
more than one run. Google's dp-accounting implements their bound as
`RepeatAndSelectDpEvent`, composed by its RDP accountant; this module states a search
as that event and calibrates its noise, so the figure the ledger is charged is
exactly dp-accounting's for the recorded parameters.

The search, precisely (docs/training.md, "Tuning", has the argument in full):

- one *reference* trial: Poisson-sampled Gaussian DP-SGD at (`noise_multiplier`,
  `sample_rate`, `steps`); its noise is the least (bisection) at which
  ``RepeatAndSelectDpEvent(reference, mean, shape)`` reaches the target epsilon;
- every real trial draws its own settings, hence its own sample rate and steps, and
  gets the least noise whose RDP is at most the reference's at *every* order of
  `ORDERS` (`trial_noise`): the bound, computed from the reference's curve at those
  orders, then covers it (RDP is jointly quasi-convex, so a trial whose settings are
  drawn at random is covered too);
- a trial's validation score is a count over validation people, disjoint from its
  training people, with Gaussian noise of `score_noise_multiplier` per person: one
  person changes either the training part or the validation part, never both, so a
  trial's RDP is the larger of the two mechanisms' (parallel composition), and that
  noise is the least whose Gaussian RDP stays under the reference's at every order:
  the score adds nothing to the cost;
- or (`plan_search(composed_score_noise=z)`) a trial's score counts the people it
  trained on, with noise z: the Gaussian then composes with the training, and every
  trial, the reference included, is charged ``DP-SGD + Gaussian(z)``; each trial pays
  for the score, but no person is held out of training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: how the number of trials is drawn: Poisson (may draw 0 trials), or truncated
#: negative binomial (at least one; shape 0 is the logarithmic distribution, 1 geometric)
DISTRIBUTIONS = ("poisson", "truncated_negative_binomial")

#: RDP orders of the search's accounting: dp-accounting's defaults up to 63. The best
#: order of a search at epsilon 0.5-10 lies between 8 and 40; the orders above 63 only
#: made the per-trial condition (`trial_noise`) stricter for small batches.
MAX_ORDER = 64

#: noise multipliers the calibration may try (beyond: "epsilon too small")
_SIGMA_RANGE = (1e-2, 1e4)


def orders() -> list[float]:
    """The RDP orders the search is accounted at (dp-accounting's defaults up to 63)."""
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    return [float(order) for order in DEFAULT_RDP_ORDERS if order < MAX_ORDER]


@dataclass(frozen=True)
class Trials:
    """The distribution of the number of trials K.

    `mean` is E[K]; `shape` is the truncated negative binomial's eta (0: logarithmic,
    1: geometric), infinite for Poisson, as `RepeatAndSelectDpEvent` takes it.
    """

    distribution: str
    mean: float
    shape: float

    @classmethod
    def of(cls, distribution: str, *, mean: float, shape: float = 0.0) -> Trials:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown trials distribution {distribution!r}")
        return cls(distribution, float(mean),
                   math.inf if distribution == "poisson" else float(shape))

    def gamma(self) -> float:
        """The truncated negative binomial's gamma for `mean` (dp-accounting's mapping)."""
        from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

        return float(_gamma_truncated_negative_binomial(self.shape, self.mean))

    def draw(self, rng: random.Random) -> int:
        """One K, by inverting the distribution's CDF with `rng` (never a public seed:
        the bound holds for a K the adversary does not know)."""
        u = rng.random()
        if self.distribution == "poisson":
            k, p = 0, math.exp(-self.mean)
            cdf = p
            while u > cdf and k < 10_000:
                k += 1
                p *= self.mean / k
                cdf += p
            return k
        gamma, eta = self.gamma(), self.shape
        # P[K = k] = (1 - gamma)^k prod_{l<k} (l + eta) / (l + 1) / norm, k >= 1
        norm = -math.log(gamma) if eta == 0 else gamma ** -eta - 1
        k, cdf = 0, 0.0
        log_term = 0.0  # log of prod_{l<k} (l + eta)/(l + 1), with (1-gamma)^k
        while k < 100_000:
            k += 1
            if eta == 0:
                term = (1 - gamma) ** k / k
            else:
                log_term += math.log(1 - gamma) + math.log(k - 1 + eta) - math.log(k)
                term = math.exp(log_term)
            cdf += term / norm
            if u <= cdf:
                return k
        return k

    def to_json(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "mean": self.mean,
                "shape": None if math.isinf(self.shape) else self.shape}


# --------------------------------------------------------------------- events


def trial_event(*, noise_multiplier: float, sample_rate: float, steps: int,
                score_noise: float | None = None) -> Any:
    """dp-accounting's event of one DP-SGD trial: `steps` Poisson-sampled Gaussians, then,
    with `score_noise`, its score counted on the same people (a Gaussian of that noise
    multiplier, composed after the training: sequential composition)."""
    import dp_accounting

    sgd = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps))
    if score_noise is None:
        return sgd
    return dp_accounting.ComposedDpEvent([sgd, dp_accounting.GaussianDpEvent(score_noise)])


def search_event(*, noise_multiplier: float, sample_rate: float, steps: int,
                 trials: Trials, score_noise: float | None = None) -> Any:
    """The whole search: the reference trial repeated K ~ `trials` times, the best kept."""
    from dp_accounting.dp_event import RepeatAndSelectDpEvent

    return RepeatAndSelectDpEvent(
        trial_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                    score_noise=score_noise),
        trials.mean, trials.shape)


def search_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int,
                   trials: Trials, delta: float, score_noise: float | None = None) -> float:
    """Epsilon at `delta` of the search, by dp-accounting's RDP accountant at `orders()`."""
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders())
    with _quiet_absl():
        accountant.compose(search_event(noise_multiplier=noise_multiplier,
                                        sample_rate=sample_rate, steps=steps, trials=trials,
                                        score_noise=score_noise))
        return float(accountant.get_epsilon(delta))


def trial_rdp(*, noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    """One trial's RDP at each of `orders()`."""
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders())
    with _quiet_absl():
        accountant.compose(trial_event(noise_multiplier=noise_multiplier,
                                       sample_rate=sample_rate, steps=steps))
    return accountant.rdp


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs (absl) when a fractional order does not converge at little
    noise; it then counts that order as infinite, which only makes a bound looser or a
    trial noisier, never the reverse. Calibration tries such noises on its way."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SearchPlan:
    """The charge of a search and the reference trial that defines it.

    Attributes:
        epsilon: what the search costs at `delta` (dp-accounting's figure for
            `RepeatAndSelectDpEvent` of the reference trial): the ledger's charge.
        target_epsilon: ``tune.epsilon``; `epsilon` is at most this.
        noise_multiplier, sample_rate, steps: the reference trial.
        score_noise_multiplier: the score count's Gaussian noise, in persons.
        score_composed: the score counts the trial's own training people, its Gaussian
            composed into each trial's cost (`validation_fraction = 0`); otherwise it
            counts validation people and is covered for free (parallel composition).
    """

    epsilon: float
    delta: float
    target_epsilon: float
    trials: Trials
    noise_multiplier: float
    sample_rate: float
    steps: int
    score_noise_multiplier: float
    score_composed: bool = False

    def reference_rdp(self) -> np.ndarray:
        return trial_rdp(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                         steps=self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"mechanism": "repeat-and-select", "epsilon": self.epsilon,
                "delta": self.delta, "target_epsilon": self.target_epsilon,
                "trials": self.trials.to_json(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps,
                "score_noise_multiplier": self.score_noise_multiplier,
                "score": ("composed: counted on each trial's training people"
                          if self.score_composed else "parallel: counted on validation people"),
                "accountant": "dp-accounting rdp", "max_order": MAX_ORDER}


def plan_search(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                trials: Trials, composed_score_noise: float | None = None) -> SearchPlan:
    """The least reference noise (to 1e-4 relative) at which the search costs at most
    `target_epsilon`, and the score noise it covers.

    Args:
        composed_score_noise: None: each trial is scored on validation people, with the
            noise the reference covers (`score_noise`). A number: each trial is scored
            on its own training people with this noise multiplier, and that Gaussian is
            composed into every trial's cost (the reference's included).

    Raises:
        ValueError: no noise within reach makes the search cost so little.
    """
    def cost(sigma: float) -> float:
        return search_epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                              trials=trials, delta=delta, score_noise=composed_score_noise)

    low, high = _SIGMA_RANGE
    if cost(high) > target_epsilon:
        raise ValueError(f"no noise makes the search cost epsilon {target_epsilon:g}")
    if cost(low) <= target_epsilon:
        high = low
    while high / low > 1 + 1e-4:
        middle = math.sqrt(low * high)
        if cost(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    if composed_score_noise is None:
        reference = trial_rdp(noise_multiplier=high, sample_rate=sample_rate, steps=steps)
        z, composed = score_noise(reference), False
    else:
        z, composed = float(composed_score_noise), True
    return SearchPlan(epsilon=cost(high), delta=delta, target_epsilon=target_epsilon,
                      trials=trials, noise_multiplier=high, sample_rate=sample_rate,
                      steps=int(steps), score_noise_multiplier=z, score_composed=composed)


def trial_noise(plan: SearchPlan, *, sample_rate: float, steps: int) -> float:
    """The least noise (to 1e-4 relative, rounded up) for a trial of (`sample_rate`,
    `steps`) whose RDP is at most the reference's at every order: the search's bound
    then holds for it. The reference's own settings get the reference's noise. A score
    composed into each trial (`SearchPlan.score_composed`) is the same Gaussian in every
    trial, so dominating the DP-SGD part dominates the whole trial."""
    if abs(sample_rate - plan.sample_rate) <= 1e-12 and int(steps) == plan.steps:
        return plan.noise_multiplier
    reference = plan.reference_rdp()

    def covered(sigma: float) -> bool:
        rdp = trial_rdp(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return bool((rdp <= reference).all())

    low, high = plan.noise_multiplier, plan.noise_multiplier
    while not covered(high):
        low, high = high, high * 2
        if high > _SIGMA_RANGE[1]:
            raise ValueError("no noise covers this trial")
    while covered(low) and low > _SIGMA_RANGE[0]:
        high, low = low, low / 2
    while high / low > 1 + 1e-4:
        middle = math.sqrt(low * high)
        if covered(middle):
            high = middle
        else:
            low = middle
    return high


def score_noise(reference: np.ndarray) -> float:
    """The least Gaussian noise multiplier z whose RDP, order / (2 z^2), is at most the
    reference trial's at every order: the validation count is then covered by the
    trial's bound (parallel composition, see the module's docstring)."""
    ratios = [order / (2 * float(rdp)) for order, rdp in zip(orders(), reference, strict=True)
              if rdp > 0]
    return math.sqrt(max(ratios)) * (1 + 1e-9) if ratios else math.inf


def noisy_count(count: float, *, noise_multiplier: float, sensitivity: float,
                rng: random.Random) -> float:
    """`count` plus Gaussian noise of standard deviation `noise_multiplier * sensitivity`
    drawn from `rng` (the operating system's, so the noise cannot be replayed)."""
    return count + rng.gauss(0.0, noise_multiplier * sensitivity)
