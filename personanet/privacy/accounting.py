"""Accounting: the epsilon of DP-SGD from its public parameters, and the noise for a target.

`compute_epsilon` gives the privacy loss of DP-SGD with Poisson sampling from its three
public parameters (noise multiplier, sample rate, steps), with Opacus' accountants;
`epsilon_of_history` does the same for a run made of several phases. `train` records these
parameters in ``privacy.json`` so anyone can recompute the figure. `calibrate_noise` goes
the other way, in bounded time whatever the target: PRV only where its discretisation grid
stays small (`prv_grid_points`), RDP beyond.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from personanet.privacy import calibration_table

logger = logging.getLogger("personanet")

#: what ``train.accountant`` may name: PRV (tight, numerical) or RDP (looser, closed-form)
ACCOUNTANTS = ("prv", "rdp")


class AccountantError(RuntimeError):
    """An accountant could not compute epsilon (PRV's known numerical failures)."""


@contextlib.contextmanager
def _quiet_numpy() -> Iterator[None]:
    # PRV's discretisation emits overflow/invalid warnings on its way to an answer or a
    # failure; the result is checked below, so the noise only hides real messages.
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        # PRV sizes its domain with an RDP bound; the advice to widen RDP's orders concerns
        # that internal step (and, for "rdp" itself, a bound that is valid, if looser).
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) "
                                                  "alpha")
        yield


def epsilon_of_history(*, accountant: str, history: list[tuple[float, float, int]],
                       delta: float) -> float:
    """Epsilon at `delta` of a sequence of (noise_multiplier, sample_rate, steps) phases.

    Raises:
        AccountantError: the accountant failed or returned something that is not a
            finite, non-negative number.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    phases = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not phases:
        return 0.0
    return _epsilon(accountant, phases, float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon(accountant: str, history: tuple[tuple[float, float, int], ...],
             delta: float) -> float:
    # Cached: a run asks for the same figure when it plans, as it ends and in its report,
    # and PRV takes tens of milliseconds per answer.
    from opacus.accountants import create_accountant

    if accountant == "prv":
        points = prv_grid_points(history, delta)
        if points > PRV_MAX_POINTS:  # a guard against hours of work, not an estimate
            raise AccountantError(f"prv accountant would discretise on {points:.2g} points "
                                  f"(limit {PRV_MAX_POINTS:.0e}): too little noise for it")
    engine = create_accountant(mechanism=accountant)
    engine.history = list(history)
    try:
        with _quiet_numpy():
            epsilon = float(engine.get_epsilon(delta=delta, **_accountant_options(accountant)))
    except (ArithmeticError, RuntimeError, ValueError) as exc:
        raise AccountantError(f"{accountant} accountant failed: {exc}") from exc
    if not math.isfinite(epsilon) or epsilon < 0:
        raise AccountantError(f"{accountant} accountant returned epsilon = {epsilon}")
    return epsilon


def _accountant_options(accountant: str) -> dict[str, Any]:
    """RDP over more orders than Opacus' default (which stops at 63).

    At high noise and low sample rates the best order is above 63, and the default
    overstates epsilon 1.6-5x: still a valid bound, but it over-charges the budget.
    The minimum over more orders is still a valid bound, only tighter.
    """
    if accountant != "rdp":
        return {}
    from opacus.accountants import RDPAccountant

    return {"alphas": list(RDPAccountant.DEFAULT_ALPHAS) + [128, 256, 512, 1024]}


def rdp_bound(*, history: list[tuple[float, float, int]], delta: float) -> float:
    """RDP's epsilon of `history` (the same figure as ``epsilon_of_history("rdp", ...)``),
    in well under a millisecond once a phase's noise and rate have been seen.

    Renyi DP composes by addition, so one step's divergence per order is computed once
    per (noise, rate) and multiplied by the step count, exactly as Opacus does. A valid
    bound, looser than PRV's figure: what a run shows as its progress between epochs,
    where an exact PRV evaluation per epoch would cost tens of milliseconds (0.2 s at 1M
    rows) and the run's final figure is its accountant's anyway.
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    phases = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not phases:
        return 0.0
    orders = _accountant_options("rdp")["alphas"]
    with _quiet_numpy():
        rdp = sum(_rdp_per_step(s, q) * n for s, q, n in phases)
        epsilon = float(get_privacy_spent(orders=orders, rdp=rdp, delta=float(delta))[0])
    if not math.isfinite(epsilon) or epsilon < 0:
        raise AccountantError(f"rdp accountant returned epsilon = {epsilon}")
    return epsilon


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sigma: float, sample_rate: float) -> Any:
    from opacus.accountants.analysis.rdp import compute_rdp

    with _quiet_numpy():
        return compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1,
                           orders=_accountant_options("rdp")["alphas"])


def compute_epsilon(*, accountant: str, noise_multiplier: float, sample_rate: float,
                    steps: int, delta: float) -> float:
    """Epsilon of `steps` DP-SGD steps with Poisson sampling, by an Opacus accountant.

    Args:
        accountant: "prv" (numerical composition of privacy random variables, tight;
            Opacus returns its upper bound) or "rdp" (Renyi DP, looser, robust).
        noise_multiplier: Gaussian noise standard deviation divided by the clipping
            norm; more noise, less privacy loss per step.
        sample_rate: the probability that one person's example is in a batch
            (Poisson sampling); smaller rates amplify privacy.
        steps: optimisation steps taken (each one a noisy gradient release).
        delta: the probability with which the epsilon bound may fail.
    """
    return epsilon_of_history(accountant=accountant,
                              history=[(noise_multiplier, sample_rate, steps)], delta=delta)


def noise_for_epsilon(*, accountant: str, target_epsilon: float, delta: float,
                      sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to a tolerance) whose epsilon is <= target.

    For "prv" see `calibrate_noise`, which may have to answer with RDP instead; this
    function refuses (AccountantError) rather than change the accountant behind the
    caller's back.
    """
    sigma, used = calibrate_noise(accountant=accountant, target_epsilon=target_epsilon,
                                  delta=delta, sample_rate=sample_rate, steps=steps)
    if used != accountant:
        raise AccountantError(f"{accountant} accountant cannot calibrate this run in bounded "
                              "time; use rdp")
    return sigma


#: The most points Opacus' PRV accountant may discretise the privacy loss on. Its grid
#: grows with epsilon and steps (domain ~ epsilon, mesh ~ 1/sqrt(steps)); measured on 2 CPU
#: cores (q = 0.08, 124 steps): 1.1e6 points 1.3 s, 2.8e6 2.2 s, 5.8e6 4.2 s, 2.6e7 47 s
#: and an infinite epsilon, and `train.epsilon = 1000` asked for ever smaller noise, so
#: ever larger grids (10+ minutes, 2 GB). Every PRV evaluation is refused past 4e6 points
#: (`AccountantError`, so callers fall back to RDP): a few seconds at most, while the
#: accounting tests' grid (up to 1.6e6 points at sigma 2, q 0.05, 10,000 steps) still fits.
PRV_MAX_POINTS = 4_000_000
#: Calibration evaluates PRV a few times, so it uses PRV only where one evaluation takes
#: about a second at most (1e6 points); beyond, RDP calibrates and accounts the run. On the
#: bundled sample at epsilon 1 the grid has 6e4 points; at q = 0.08 and 124 steps the limit
#: falls near epsilon 100.
PRV_CALIBRATION_MAX_POINTS = 1_000_000
#: Wall-clock bound on PRV's refinement of the noise: after it, the best noise found so
#: far is used (valid under PRV, at most a little more noise than needed).
PRV_CALIBRATION_SECONDS = 5.0
# Opacus' PRV defaults, which `_epsilon` uses too.
_PRV_EPS_ERROR = 0.01
_PRV_DELTA_ERROR_SHARE = 1e-3


def prv_grid_points(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """At least how many points Opacus' PRV accountant would discretise `history` on.

    Opacus' formula (`PRVAccountant._get_domain`): a domain [-L, L] with L an RDP epsilon
    plus 3 (`compute_safe_domain_size`), and a mesh of ``eps_error / sqrt(steps *
    log(12 / delta_error) / 2)``. L is taken here over a subset of Opacus' orders
    (`_GRID_ORDERS`): a minimum over fewer orders is never smaller, so the count is never
    underestimated, and the subset takes milliseconds where Opacus' 90 fractional orders
    take up to a second at little noise.
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    delta_error = delta * _PRV_DELTA_ERROR_SHARE
    steps = sum(n for _, _, n in history)

    def rdp_epsilon(phases: list[tuple[float, float, int]], at: float) -> float:
        total = [0.0] * len(_GRID_ORDERS)
        for sigma, q, n in phases:
            rdp = _grid_rdp_per_step(float(sigma), float(q)) * n  # = compute_rdp(steps=n)
            total = [a + b for a, b in zip(total, rdp, strict=True)]
        return float(get_privacy_spent(orders=_GRID_ORDERS, rdp=total, delta=at)[0])

    with _quiet_numpy():
        half_width = rdp_epsilon(list(history), delta_error / 4)
        for sigma, q, _ in history:
            half_width = max(half_width, rdp_epsilon([(sigma, q, 1)],
                                                     delta_error / (8 * steps)))
    half_width = max(half_width, _PRV_EPS_ERROR) + 3
    mesh = _PRV_EPS_ERROR / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


@functools.lru_cache(maxsize=64)
def _grid_rdp_per_step(sigma: float, sample_rate: float) -> Any:
    # One step's RDP on the grid orders, shared by a history's two bounds (all steps,
    # one step) and by every prefix of a run.
    from opacus.accountants.analysis.rdp import compute_rdp

    with _quiet_numpy():
        return compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=_GRID_ORDERS)


#: A subset of Opacus' default RDP orders (1 + x / 10 for x in 1..99, then 12..63): the
#: integers, fast to compute, and the orders below 2, where the optimum lies at little noise.
_GRID_ORDERS = [1 + x / 10 for x in range(1, 10)] + [float(a) for a in
                                                     [*range(2, 11), *range(12, 64)]]


def _next_sigma(aim: float, *, high: tuple[float, float], low: tuple[float, float]) -> float:
    """The next noise to try between a `low` one (epsilon above the target) and a `high`
    one (at or below it), each with its epsilon.

    Epsilon falls roughly as a power of the noise, so a secant in log-log space lands
    near `aim` in two or three PRV evaluations where bisection takes ten or more (each
    up to seconds). Without a low point yet, epsilon ~ 1/sigma is assumed; without a
    finite epsilon at the low point, the geometric middle. The step is kept 5% inside
    the bracket, so the bracket always shrinks.
    """
    (s_high, e_high), (s_low, e_low) = high, low
    if s_low <= 0:
        guess = s_high * e_high / aim
        return max(guess, s_high / 4)
    if not math.isfinite(e_low) or e_high <= 0:
        return math.sqrt(s_low * s_high)
    slope = (math.log(e_low) - math.log(e_high)) / (math.log(s_low) - math.log(s_high))
    guess = math.exp(math.log(s_high) + (math.log(aim) - math.log(e_high)) / slope)
    margin = 0.05 * (s_high - s_low)
    return min(max(guess, s_low + margin), s_high - margin)


def calibrate_noise(*, accountant: str, target_epsilon: float, delta: float,
                    sample_rate: float, steps: int) -> tuple[float, str]:
    """`_calibrate`, remembered for the process: the same inputs give the same noise.

    The search stops on a clock (`PRV_CALIBRATION_SECONDS`), so two searches for one plan
    could differ in the last digits; the first answer is kept and given again (with the
    notes it logged), which makes a run's noise a function of its public parameters
    alone, and a second `train` of the same plan in one process skip the search (0.4 s
    at 32k rows, 0.7-1.5 s at 1M, measured with Opacus imported). Failures are not kept.
    Only public numbers are held: the plan and its noise. Inside
    `calibration_table.calibration_table` (as `train` runs), answers are also kept on
    disk for later processes, and one read back is re-checked (`_still_right`) before
    it is used.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    plan = (accountant, float(target_epsilon), float(delta), float(sample_rate), int(steps))
    found = _CALIBRATIONS.pop(plan, None)
    if found is None:
        found = calibration_table.recall(plan)
        if found is not None and not _still_right(plan, found):
            found = None
    if found is None:
        notes: list[str] = []
        sigma, used = _calibrate(accountant=accountant, target_epsilon=float(target_epsilon),
                                 delta=float(delta), sample_rate=float(sample_rate),
                                 steps=int(steps), notes=notes)
        found = (sigma, used, tuple(notes))
        calibration_table.remember(plan, found)
    _CALIBRATIONS[plan] = found  # last used goes to the end: the oldest goes first
    while len(_CALIBRATIONS) > _CALIBRATIONS_KEPT:
        del _CALIBRATIONS[next(iter(_CALIBRATIONS))]
    for note in found[2]:
        logger.info("%s", note)
    return found[0], found[1]


_CALIBRATIONS: dict[tuple[str, float, float, float, int], tuple[float, str, tuple[str, ...]]] = {}
_CALIBRATIONS_KEPT = 64


def _still_right(plan: tuple[str, float, float, float, int],
                 found: tuple[float, str, tuple[str, ...]]) -> bool:
    """Whether a noise from the on-disk table is one the search could have returned,
    checked with one evaluation (the search takes a dozen): its epsilon is at most the
    target and, unless the search said it stopped on the clock, within the search's
    tolerance of it (so a larger noise than needed is refused too); an RDP answer to a
    PRV plan only where PRV would still be too slow to calibrate with."""
    accountant, target, delta, sample_rate, steps = plan
    sigma, used, notes = found
    if not (math.isfinite(sigma) and 0 < sigma <= _MAX_SIGMA) or used not in ACCOUNTANTS:
        return False
    if used != accountant and (used, accountant) != ("rdp", "prv"):
        return False
    history = ((sigma, sample_rate, steps),)
    if used != accountant and prv_grid_points(history, delta) <= PRV_CALIBRATION_MAX_POINTS:
        return False
    try:
        epsilon = epsilon_of_history(accountant=used, history=list(history), delta=delta)
    except AccountantError:
        return False
    stopped = any("stopped after" in note for note in notes)
    return epsilon <= target and (stopped or target - epsilon <= _tolerance(target))


def _tolerance(target_epsilon: float) -> float:
    """How far below the target the search may stop (in epsilon)."""
    return max(0.01, 2e-3 * target_epsilon)


def _calibrate(*, accountant: str, target_epsilon: float, delta: float,
               sample_rate: float, steps: int, notes: list[str]) -> tuple[float, str]:
    """The noise multiplier that makes `steps` DP-SGD steps reach `target_epsilon`, and
    the accountant that certified it (in bounded time, whatever the target).

    RDP calibrates first: its bound is closed-form, fast at any noise, and never below
    the true epsilon, so its noise is always a valid answer. With ``accountant="prv"``
    the noise is then refined with PRV (tighter: less noise for the same epsilon), by a
    bracketing search below RDP's noise (`_next_sigma`), where

    - a noise whose PRV grid would exceed `PRV_CALIBRATION_MAX_POINTS` (or where PRV
      fails) counts as too little noise, and PRV is not asked (asking it is what kept
      ``epsilon = 1000`` running for 10+ minutes);
    - if RDP's noise itself is past that limit, RDP calibrates and accounts the run;
    - after `PRV_CALIBRATION_SECONDS` the best noise so far is kept.

    Every noise the search keeps has been checked by the accountant it returns, so
    the answer's epsilon is at most the target whichever way it ends.

    Raises:
        ValueError: Opacus' "The privacy budget is too low." (no noise reaches it).
        AccountantError: PRV failed numerically (the caller may fall back to RDP).
    """
    tolerance = _tolerance(target_epsilon)

    def epsilon(kind: str, sigma: float) -> float:
        history = ((sigma, sample_rate, steps),)
        if kind == "prv" and prv_grid_points(history, delta) > PRV_CALIBRATION_MAX_POINTS:
            raise AccountantError("too slow to evaluate during calibration")
        return epsilon_of_history(accountant=kind, history=list(history), delta=delta)

    # RDP: from a noise that reaches the target (doubling up to Opacus' limit), then down.
    high = 1.0
    while (eps_high := epsilon("rdp", high)) > target_epsilon:
        high *= 2
        if high > _MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")  # Opacus' words, for callers
    rdp_sigma, _ = _search_down(lambda sigma: epsilon("rdp", sigma), target_epsilon,
                                tolerance, high=(high, eps_high), seconds=math.inf)
    if accountant == "rdp":
        return rdp_sigma, "rdp"
    points = prv_grid_points(((rdp_sigma, sample_rate, steps),), delta)
    if points > PRV_CALIBRATION_MAX_POINTS:
        notes.append(f"noise calibrated with RDP (sigma {rdp_sigma:.4g}): PRV would need "
                     f"{points:.2g} points at this little noise (limit "
                     f"{PRV_CALIBRATION_MAX_POINTS:.0e}), too slow to calibrate with; the run "
                     "is accounted with RDP")
        return rdp_sigma, "rdp"

    high, eps_high = rdp_sigma, epsilon("prv", rdp_sigma)
    for _ in range(100):  # PRV's upper bound may exceed RDP's by its eps_error
        if eps_high <= target_epsilon:
            break
        high *= 1.01
        eps_high = epsilon("prv", high)
    else:
        return rdp_sigma, "rdp"
    sigma, stopped = _search_down(lambda sigma: epsilon("prv", sigma), target_epsilon,
                                  tolerance, high=(high, eps_high),
                                  seconds=PRV_CALIBRATION_SECONDS)
    if stopped:
        notes.append(f"PRV calibration stopped after {PRV_CALIBRATION_SECONDS:.0f} s at sigma "
                     f"{sigma:.4g}: a little more noise than needed for epsilon "
                     f"{target_epsilon:g}, never less")
    return sigma, "prv"


#: Opacus' largest noise multiplier before it calls a budget "too low" (accountants.utils).
_MAX_SIGMA = 1e6


def _search_down(epsilon: Callable[[float], float], target: float, tolerance: float, *,
                 high: tuple[float, float], seconds: float) -> tuple[float, bool]:
    """The least noise (to `tolerance` in epsilon) at or below `high` whose epsilon is at
    most `target`, and whether the time ran out first (the answer is then the best noise
    found so far: valid, a little more than needed).

    A noise whose epsilon cannot be computed (`AccountantError`) counts as too little.
    """
    (s_high, e_high), (s_low, e_low) = high, (0.0, math.inf)
    aim = target - tolerance / 2
    started = time.monotonic()
    slowest = 0.0
    while target - e_high > tolerance and s_high - s_low > 1e-6 * s_high:
        if time.monotonic() - started + slowest > seconds:
            return s_high, True
        sigma = _next_sigma(aim, high=(s_high, e_high), low=(s_low, e_low))
        began = time.monotonic()
        try:
            eps = epsilon(sigma)
        except AccountantError:
            eps = math.inf
        slowest = max(slowest, time.monotonic() - began)
        if eps <= target:
            s_high, e_high = sigma, eps
        else:
            s_low, e_low = sigma, eps
    return s_high, False
