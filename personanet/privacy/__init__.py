"""Privacy accounting: the per-dataset budget ledger, epsilon, and per-example clipping.

Three things live here, each small:

- `Ledger`: every (epsilon, delta) a training run may spend on a dataset,
  stored at ``<artifact root>/<dataset>/budget.json``. A run *reserves* its
  requested budget before its first optimisation step and *settles* it at the
  accountant's final epsilon when it ends. A run that dies (SIGKILL, power cut,
  an exception after the first step) keeps its full reservation counted: the
  ledger never assumes that lost work leaked less than planned. A reservation
  is released (counted as zero) only when the run stopped before its first
  step. Runs compose by basic sequential composition: the epsilons add up, and
  so do the deltas. The budget itself is pinned in the ledger at the first charge
  and changed only by `Ledger.set_budget` (``personanet budget set``); the file is
  sealed with an HMAC under the master key.
- `compute_epsilon`: the privacy loss of DP-SGD with Poisson sampling from its
  three public parameters (noise multiplier, sample rate, steps), with Opacus'
  accountants. `train` records these parameters in ``privacy.json`` so anyone
  can recompute the figure. `calibrate_noise` goes the other way, in bounded
  time whatever the target (PRV only where its grid stays small, RDP beyond).
- `BookkeepingClipper`: per-example gradient clipping for PersonaNet in one
  backward pass (ghost norms plus book-keeping), the fast path `train` uses with
  Opacus' optimizer, sampler and accountant.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.errors import (
    BudgetExhaustedError,
    IntegrityError,
    KeyAccessError,
    OutputError,
    UsageError,
)
from personanet.store.artifacts import utc_now

if TYPE_CHECKING:
    import torch
    from rich.console import Group
    from rich.table import Table

    from personanet.config import Config
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.crypto import MasterKey

logger = logging.getLogger("personanet")

LEDGER_FILE = "budget.json"
#: /2: a pinned budget, its history of changes, and a seal (HMAC); an earlier personanet
#: refuses it rather than ignore the pin. /1 ledgers are read, and upgraded at their next change.
LEDGER_FORMAT = "personanet.budget/2"
LEDGER_FORMATS_READ = ("personanet.budget/1", LEDGER_FORMAT)
ACCOUNTANTS = ("prv", "rdp")
# Sums of floats: a run that fits exactly must not be refused for a rounding error.
_SLACK = 1e-9


# --------------------------------------------------------------------- accountants


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
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    delta_error = delta * _PRV_DELTA_ERROR_SHARE
    steps = sum(n for _, _, n in history)

    def rdp_epsilon(phases: list[tuple[float, float, int]], at: float) -> float:
        total = [0.0] * len(_GRID_ORDERS)
        for sigma, q, n in phases:
            rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=_GRID_ORDERS)
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
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    tolerance = max(0.01, 2e-3 * target_epsilon)

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
        logger.info("noise calibrated with RDP (sigma %.4g): PRV would need %.2g points at "
                    "this little noise (limit %.0e), too slow to calibrate with; the run is "
                    "accounted with RDP", rdp_sigma, points, PRV_CALIBRATION_MAX_POINTS)
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
        logger.info("PRV calibration stopped after %.0f s at sigma %.4g: a little more noise "
                    "than needed for epsilon %g, never less", PRV_CALIBRATION_SECONDS, sigma,
                    target_epsilon)
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


# --------------------------------------------------------------------- ledger


class Ledger:
    """The privacy budget of one dataset and what was spent of it, in
    ``<root>/<dataset>/budget.json``.

    Every mutation reads the file, changes it and rewrites it atomically (temporary
    file, fsync, rename, fsync of the folder) while holding the artifact root's
    writer lock, so concurrent runs can never both take the last of the budget.

    The budget is *pinned* in the ledger at the first charge (from the config then in
    use). A config asking for more than the pin is refused (exit 69) until a key holder
    raises the pin with `set_budget` (``personanet budget set``), which is logged with
    its reason, time and key id; a config asking for less is honoured for its run.

    With a `key`, the ledger is sealed: an HMAC-SHA256 over its canonical JSON, under a
    key derived from the master key for this purpose only. An edited ledger (spent
    lowered, pin raised) is refused (exit 65). Without a key the ledger can be read
    (unauthenticated, for `budget show` without a key) but not changed.
    """

    def __init__(self, store: ArtifactStore, key: MasterKey | None = None) -> None:
        self.store = store
        self.key = key
        self.path = store.dataset_dir / LEDGER_FILE

    # ---------------------------------------------------------------- reading

    def read(self) -> dict[str, Any]:
        """The ledger document; an empty one when no run has reserved anything yet.

        Raises:
            IntegrityError: (65) the file exists but is not a ledger, or its seal does
                not match (edited outside personanet). It is never silently reset: the
                budget already spent would be forgotten.
            KeyAccessError: (77) it is sealed under another master key.
        """
        try:
            raw = self.path.read_text("utf-8")
        except FileNotFoundError:
            return {"format": LEDGER_FORMAT, "dataset": self.store.dataset, "entries": []}
        except OSError as exc:
            raise IntegrityError(f"cannot read budget ledger {self.path}: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if (not isinstance(doc, dict) or doc.get("format") not in LEDGER_FORMATS_READ
                or not isinstance(doc.get("entries"), list)):
            raise IntegrityError(
                f"budget ledger {self.path} is damaged; restore it from a backup (training is "
                "refused while the budget already spent is unknown)"
            )
        if self.key is not None:
            self._verify(doc, self.key)
        return doc

    @property
    def authenticated(self) -> bool:
        """Whether reads are checked against the seal (a key was given)."""
        return self.key is not None

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.read()["entries"])

    def entry(self, run_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e.get("run_id") == run_id), None)

    def totals(self) -> dict[str, float]:
        """Settled and reserved (epsilon, delta); a reservation counts in full."""
        return _totals(self.entries)

    def check(self, *, epsilon: float, delta: float, budget_epsilon: float,
              budget_delta: float) -> None:
        """Would a run of (epsilon, delta) be allowed now? (`reserve` checks again.)

        Raises:
            BudgetExhaustedError: (69) it would not fit, or the config's budget is above
                the pinned one.
        """
        doc = self.read()
        self._check_covers_models(doc)
        limit = effective_budget(doc, dataset=self.store.dataset,
                                 budget_epsilon=budget_epsilon, budget_delta=budget_delta)
        check_budget(doc["entries"], dataset=self.store.dataset, epsilon=epsilon, delta=delta,
                     budget_epsilon=limit[0], budget_delta=limit[1])

    def verify(self) -> None:
        """Check the ledger (seal, and that it records every private model of the store):
        part of ``artifacts verify``. Raises as `read` and `check` do."""
        self._check_covers_models(self.read())

    def _check_covers_models(self, doc: dict[str, Any]) -> None:
        """IntegrityError (65) when a private model of the store is missing from the ledger.

        The seal stops edits, not an older genuine ledger put back (less spent). Every
        private train artifact names its run in its (sealed) manifest, and a run is in the
        ledger before its model exists, so a ledger that lacks one is older than the store.
        """
        known = {entry.get("run_id") for entry in doc["entries"]}
        for artifact in self.store.versions("train"):
            run_id = artifact.figures.get("run_id")
            if artifact.figures.get("private") and run_id and run_id not in known:
                raise IntegrityError(
                    f"budget ledger {self.path} does not record run {run_id} of private model "
                    f"{artifact.version}: an older copy was put back (the budget it spent is "
                    "missing); restore the latest ledger")

    # ---------------------------------------------------------------- writing

    def reserve(self, *, epsilon: float, delta: float, budget_epsilon: float,
                budget_delta: float, run_id: str | None = None, **details: Any
                ) -> dict[str, Any]:
        """Reserve (epsilon, delta) for a run before its first step.

        `budget_epsilon` and `budget_delta` are the config's; the ledger's pinned budget
        wins where it is lower, and the config's pins the budget when none is pinned yet.

        Raises:
            BudgetExhaustedError: the reservation would take the dataset past its
                budget, or the config asks for more than the pinned budget; nothing is
                written.
        """
        with self.store.lock():
            doc = self.read()
            self._check_covers_models(doc)
            limit = effective_budget(doc, dataset=self.store.dataset,
                                     budget_epsilon=budget_epsilon, budget_delta=budget_delta,
                                     log=True)
            check_budget(doc["entries"], dataset=self.store.dataset, epsilon=epsilon,
                         delta=delta, budget_epsilon=limit[0], budget_delta=limit[1])
            if not doc.get("budget"):
                legacy = bool(doc["entries"])
                _pin(doc, epsilon=budget_epsilon, delta=budget_delta, action="pinned",
                     source="config", key_id=self._key_id(),
                     reason=("ledger written before budgets were pinned: pinned at its next "
                             "charge from the config then in use") if legacy
                     else "first charge: pinned from the config")
                logger.info("budget of dataset %r pinned in the ledger at epsilon %g, delta %g "
                            "(from the config%s); only `personanet budget set` changes it",
                            self.store.dataset, budget_epsilon, budget_delta,
                            ", the ledger predates pinning" if legacy else "")
            entry = {
                "run_id": run_id or _run_id(), "status": "reserved", "private": True,
                "epsilon": float(epsilon), "delta": float(delta),
                "epsilon_spent": None, "delta_spent": None,
                "reserved_at": utc_now(), "settled_at": None, "version": None,
                "pid": os.getpid(), **details,
            }
            doc["entries"].append(entry)
            self._write(doc)
            return entry

    def set_budget(self, *, epsilon: float, delta: float | None = None,
                   reason: str | None = None, config_epsilon: float,
                   config_delta: float) -> dict[str, Any]:
        """Change the pinned budget: what ``personanet budget set`` does.

        Lowering is always allowed (the reason is optional, recorded when given);
        raising needs a `reason`. Either way the change is appended to the ledger's
        history with its time and the id of the master key that made it (the ledger's
        seal means only a key holder can change it). Without a pin yet, the change is
        measured against the config's budget, which the next charge would have pinned.

        Args:
            epsilon: the new total epsilon the dataset may spend across all runs.
            delta: the new total delta (default: unchanged).
            reason: why; required to raise.
            config_epsilon, config_delta: the config's budget.

        Returns:
            The history record appended (``action`` "raised", "lowered" or
            "unchanged"; nothing is written when unchanged).

        Raises:
            UsageError: (2) raising without a reason, or a figure out of range.
        """
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise UsageError(f"--epsilon must be a number above 0, got {epsilon:g}")
        if delta is not None and not (math.isfinite(delta) and 0 < delta < 1):
            raise UsageError(f"--delta must be in (0, 1), got {delta:g}")
        reason = (reason or "").strip() or None
        with self.store.lock():
            doc = self.read()
            pinned = doc.get("budget") or {}
            old_eps = float(pinned.get("epsilon", config_epsilon))
            old_delta = float(pinned.get("delta", config_delta))
            new_delta = old_delta if delta is None else float(delta)
            raised = epsilon > old_eps + _SLACK or new_delta > old_delta * (1 + _SLACK)
            lowered = epsilon < old_eps - _SLACK or new_delta < old_delta * (1 - _SLACK)
            action = "raised" if raised else "lowered" if lowered else "unchanged"
            record = {"action": action, "epsilon": float(epsilon), "delta": new_delta,
                      "previous_epsilon": old_eps, "previous_delta": old_delta,
                      "source": "budget set", "reason": reason, "key_id": self._key_id(),
                      "at": utc_now()}
            if action == "unchanged":
                return record
            if raised and reason is None:
                raise UsageError(
                    f"raising the budget of dataset {self.store.dataset!r} (epsilon "
                    f"{old_eps:g} -> {epsilon:g}, delta {old_delta:g} -> {new_delta:g}) needs "
                    "--reason TEXT: the change is logged in the ledger with it")
            _pin(doc, **{k: record[k] for k in ("epsilon", "delta", "action", "source",
                                                 "reason", "key_id")})
            self._write(doc)
            spent = _totals(doc["entries"])
            counted = spent["settled_epsilon"] + spent["reserved_epsilon"]
            if counted > epsilon + _SLACK:
                logger.warning("dataset %r has already spent epsilon %.4g, more than the new "
                               "budget %g: no private run is allowed until it is raised",
                               self.store.dataset, counted, epsilon)
            logger.info("budget of dataset %r %s: epsilon %g -> %g, delta %g -> %g (key %s)",
                        self.store.dataset, action, old_eps, epsilon, old_delta, new_delta,
                        self._key_id())
            return doc["budget_history"][-1]

    def settle(self, run_id: str, *, epsilon: float, delta: float, **details: Any
               ) -> dict[str, Any]:
        """Close a reservation at what the accountant says the run spent (<= reserved)."""
        def change(entry: dict[str, Any]) -> None:
            if entry["status"] != "reserved":
                raise IntegrityError(f"ledger entry {run_id} is {entry['status']}, not reserved")
            # Never settle above the reservation without saying so: it would mean the
            # budget check was done against a smaller figure than was spent.
            if epsilon > entry["epsilon"] + _SLACK:
                logger.warning("run %s spent epsilon %.4f, more than the %.4f reserved",
                               run_id, epsilon, entry["epsilon"])
            entry.update(status="settled", epsilon_spent=float(epsilon),
                         delta_spent=float(delta), settled_at=utc_now(), **details)
        return self._update(run_id, change)

    def release(self, run_id: str, *, reason: str) -> dict[str, Any]:
        """Give a reservation back: only for a run that stopped before its first step."""
        def change(entry: dict[str, Any]) -> None:
            if entry["status"] != "reserved":
                return
            entry.update(status="released", epsilon_spent=0.0, delta_spent=0.0,
                         settled_at=utc_now(), note=reason)
        return self._update(run_id, change)

    def update(self, run_id: str, **details: Any) -> dict[str, Any]:
        """Record details of a run (its progress, the artifact it wrote)."""
        return self._update(run_id, lambda entry: entry.update(details))

    def record_non_private(self, **details: Any) -> dict[str, Any]:
        """A `--no-dp` run: no epsilon is charged, but the ledger keeps an audit line."""
        with self.store.lock():
            doc = self.read()
            entry = {"run_id": details.pop("run_id", None) or _run_id(), "status": "settled",
                     "private": False, "epsilon": None, "delta": None, "epsilon_spent": None,
                     "delta_spent": None, "reserved_at": utc_now(), "settled_at": utc_now(),
                     "note": "trained without differential privacy (--no-dp): no guarantee "
                             "covers this model", **details}
            doc["entries"].append(entry)
            self._write(doc)
            return entry

    def reseal(self, new_key: MasterKey) -> None:
        """Seal the ledger under `new_key` (after checking it under this ledger's key):
        part of ``keys rotate``. A ledger already under `new_key` is left as it is, so an
        interrupted rotation can run again."""
        with self.store.lock():
            if not self.path.exists():
                return
            try:
                raw = json.loads(self.path.read_text("utf-8"))
            except (OSError, ValueError):
                raw = None
            if isinstance(raw, dict) and (raw.get("seal") or {}).get("key_id") == new_key.key_id:
                Ledger(self.store, new_key).read()
                return
            doc = self.read()
            Ledger(self.store, new_key)._write(doc)

    def _update(self, run_id: str, change: Any) -> dict[str, Any]:
        with self.store.lock():
            doc = self.read()
            for entry in doc["entries"]:
                if entry.get("run_id") == run_id:
                    change(entry)
                    self._write(doc)
                    return dict(entry)
        raise IntegrityError(f"budget ledger {self.path} has no run {run_id!r}")

    def _key_id(self) -> str | None:
        return self.key.key_id if self.key is not None else None

    def _verify(self, doc: dict[str, Any], key: MasterKey) -> None:
        seal = doc.get("seal")
        if seal is None:
            # Only a /1 ledger (written before seals) may lack one, and such a ledger
            # never had a pin or a history of changes.
            if doc.get("format") == LEDGER_FORMAT or "budget" in doc or "budget_history" in doc:
                raise IntegrityError(f"budget ledger {self.path} has lost its seal (edited "
                                     "outside personanet); restore it from a backup")
            if not getattr(self, "_warned_unsealed", False):
                self._warned_unsealed = True
                logger.warning("budget ledger %s has no seal (written by an earlier "
                               "personanet): it is accepted as it is and sealed at its next "
                               "change", self.path)
            return
        if not isinstance(seal, dict) or seal.get("key_id") != key.key_id:
            other = seal.get("key_id") if isinstance(seal, dict) else None
            raise KeyAccessError(f"budget ledger {self.path} is sealed under key id {other}, "
                                 f"not the loaded key {key.key_id}: load that key, or finish "
                                 "`personanet keys rotate`")
        expected = _ledger_mac(doc, key)
        if not hmac.compare_digest(str(seal.get("hmac_sha256", "")), expected):
            raise IntegrityError(
                f"budget ledger {self.path} was changed outside personanet (its seal does "
                "not match); restore it from a backup: training is refused while the budget "
                "spent is in doubt")

    def _write(self, doc: dict[str, Any]) -> None:
        if self.key is None:
            raise KeyAccessError("changing the budget ledger needs the master key (set "
                                 "PERSONANET_KEY_FILE): the ledger is sealed with it")
        doc = {k: v for k, v in doc.items() if k != "seal"}
        doc.update(format=LEDGER_FORMAT, dataset=self.store.dataset, updated_at=utc_now())
        doc["seal"] = {"key_id": self.key.key_id, "algorithm": "HMAC-SHA256",
                       "hmac_sha256": _ledger_mac(doc, self.key)}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        tmp = self.path.with_name(f".{LEDGER_FILE}.tmp-{secrets.token_hex(4)}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with open(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write budget ledger {self.path}: {exc.strerror}") from None
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


#: HKDF purpose of the ledger's seal key: unrelated to the keys of data, pseudonyms and
#: manifests derived from the same master key.
LEDGER_SEAL_PURPOSE = "budget-ledger-seal"


def _ledger_mac(doc: dict[str, Any], key: MasterKey) -> str:
    body = {k: v for k, v in doc.items() if k != "seal"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key.derive(LEDGER_SEAL_PURPOSE), canonical.encode("utf-8"),
                    hashlib.sha256).hexdigest()


def _pin(doc: dict[str, Any], *, epsilon: float, delta: float, action: str, source: str,
         reason: str | None, key_id: str | None) -> None:
    """Set the pinned budget and append the change to the ledger's history."""
    now = utc_now()
    previous = doc.get("budget") or {}
    doc["budget"] = {"epsilon": float(epsilon), "delta": float(delta), "set_at": now}
    doc.setdefault("budget_history", []).append({
        "action": action, "epsilon": float(epsilon), "delta": float(delta),
        "previous_epsilon": previous.get("epsilon"), "previous_delta": previous.get("delta"),
        "source": source, "reason": reason, "key_id": key_id, "at": now})


def effective_budget(doc: dict[str, Any], *, dataset: str, budget_epsilon: float,
                     budget_delta: float, log: bool = False) -> tuple[float, float]:
    """The (epsilon, delta) budget in force for a run under a config's `[budget]`.

    The pinned budget when the config agrees with it; the config's where it is lower
    (the stricter figure applies); the config's when nothing is pinned yet.

    Raises:
        BudgetExhaustedError: (69) the config asks for more than the pinned budget.
    """
    pinned = doc.get("budget")
    if not pinned:
        return budget_epsilon, budget_delta
    pin_eps, pin_delta = float(pinned["epsilon"]), float(pinned["delta"])
    for name, asked, pin in (("epsilon", budget_epsilon, pin_eps),
                             ("delta", budget_delta, pin_delta)):
        if asked > pin * (1 + _SLACK):
            raise BudgetExhaustedError(
                f"budget.{name} = {asked:g} in the config is above the {name} budget "
                f"{pin:g} pinned in the ledger of dataset {dataset!r}: lower budget.{name} "
                f"to {pin:g}, or raise the pin with `personanet budget set --{name} {asked:g} "
                "--reason TEXT` (needs the key; logged)")
    if log and (budget_epsilon < pin_eps or budget_delta < pin_delta):
        logger.info("the config's budget (epsilon %g, delta %g) is below the pinned one "
                    "(epsilon %g, delta %g): the stricter figures apply to this run",
                    budget_epsilon, budget_delta, pin_eps, pin_delta)
    return min(budget_epsilon, pin_eps), min(budget_delta, pin_delta)


def _run_id() -> str:
    from personanet.store.artifacts import new_version

    return new_version()


def _counted(entry: dict[str, Any]) -> tuple[float, float]:
    """What an entry counts against the budget: reserved in full until settled."""
    if not entry.get("private", True):
        return 0.0, 0.0
    if entry.get("status") == "reserved":
        return float(entry["epsilon"]), float(entry["delta"])
    if entry.get("status") == "settled":
        return float(entry.get("epsilon_spent") or 0.0), float(entry.get("delta_spent") or 0.0)
    return 0.0, 0.0


def _totals(entries: list[dict[str, Any]]) -> dict[str, float]:
    out = {"settled_epsilon": 0.0, "settled_delta": 0.0,
           "reserved_epsilon": 0.0, "reserved_delta": 0.0}
    for entry in entries:
        eps, delta = _counted(entry)
        kind = "reserved" if entry.get("status") == "reserved" else "settled"
        out[f"{kind}_epsilon"] += eps
        out[f"{kind}_delta"] += delta
    return out


def check_budget(entries: list[dict[str, Any]], *, dataset: str, epsilon: float, delta: float,
                 budget_epsilon: float, budget_delta: float) -> None:
    """BudgetExhaustedError (exit 69) when (epsilon, delta) does not fit what is left."""
    totals = _totals(entries)
    spent_eps = totals["settled_epsilon"] + totals["reserved_epsilon"]
    spent_delta = totals["settled_delta"] + totals["reserved_delta"]
    left_eps = budget_epsilon - spent_eps
    left_delta = budget_delta - spent_delta
    reserved = (f" (incl. {totals['reserved_epsilon']:.4g} reserved by unfinished runs)"
                if totals["reserved_epsilon"] else "")
    if epsilon > left_eps + _SLACK:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent epsilon "
            f"{spent_eps:.4g}{reserved}, requested {epsilon:.4g}, remaining "
            f"{max(left_eps, 0.0):.4g} of {budget_epsilon:.4g}; lower train.epsilon, reuse an "
            "existing model, or (if policy allows) raise budget.epsilon"
        )
    if delta > left_delta + _SLACK * budget_delta:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent delta {spent_delta:.3g}, "
            f"requested {delta:.3g}, remaining {max(left_delta, 0.0):.3g} of {budget_delta:.3g}; "
            "lower train.delta or (if policy allows) raise budget.delta"
        )


def budget_summary(config: Config, store: ArtifactStore, key: MasterKey | None = None
                   ) -> dict[str, Any]:
    """What `personanet budget show` prints: budget, spent, reserved, remaining, entries.

    `budget_*` is the budget in force: the pinned one, or the config's where it is lower
    (the config's while nothing is pinned). `spent_*` are settled runs; `reserved_*` are
    runs that have not settled (running, or killed: those stay counted until resumed to
    the end); `remaining_*` is the budget in force minus both. `budget_history` lists
    every change of the pin. With `key` the ledger's seal is checked
    (``authenticated: true``); without, its figures are shown as read.
    """
    ledger = Ledger(store, key)
    doc = ledger.read()
    entries = list(doc["entries"])
    totals = _totals(entries)
    pinned = doc.get("budget") or None
    config_eps, config_delta = config.budget.epsilon, config.budget.delta
    if pinned:
        budget_eps = min(config_eps, float(pinned["epsilon"]))
        budget_delta = min(config_delta, float(pinned["delta"]))
    else:
        budget_eps, budget_delta = config_eps, config_delta
    counted_eps = totals["settled_epsilon"] + totals["reserved_epsilon"]
    counted_delta = totals["settled_delta"] + totals["reserved_delta"]
    return {
        "dataset": store.dataset,
        "ledger": str(ledger.path),
        "authenticated": ledger.authenticated,
        "budget_epsilon": budget_eps,
        "budget_delta": budget_delta,
        "pinned": bool(pinned),
        "pinned_epsilon": float(pinned["epsilon"]) if pinned else None,
        "pinned_delta": float(pinned["delta"]) if pinned else None,
        "config_epsilon": config_eps,
        "config_delta": config_delta,
        "config_above_pin": bool(pinned) and (config_eps > float(pinned["epsilon"])
                                              or config_delta > float(pinned["delta"])),
        "budget_history": list(doc.get("budget_history") or []),
        "spent_epsilon": totals["settled_epsilon"],
        "spent_delta": totals["settled_delta"],
        "reserved_epsilon": totals["reserved_epsilon"],
        "reserved_delta": totals["reserved_delta"],
        "remaining_epsilon": max(budget_eps - counted_eps, 0.0),
        "remaining_delta": max(budget_delta - counted_delta, 0.0),
        "private_runs": sum(1 for e in entries if e.get("private", True)),
        "non_private_runs": sum(1 for e in entries if not e.get("private", True)),
        "entries": entries,
    }


def render_budget(summary: dict[str, Any]) -> Group:
    """The ledger as rich tables: the pinned budget and its changes, then one row per run
    (totals in the caption)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if summary.get("pinned"):
        head = (f"budget pinned in the ledger: epsilon {summary['pinned_epsilon']:g}, delta "
                f"{summary['pinned_delta']:g}")
        if summary["config_above_pin"]:
            head += (f" (the config asks for epsilon {summary['config_epsilon']:g}, delta "
                     f"{summary['config_delta']:g}: training is refused until it is lowered "
                     "or `personanet budget set` raises the pin)")
        elif (summary["config_epsilon"], summary["config_delta"]) != (
                summary["pinned_epsilon"], summary["pinned_delta"]):
            head += (f"; the config's stricter epsilon {summary['config_epsilon']:g}, delta "
                     f"{summary['config_delta']:g} applies")
    else:
        head = (f"budget not pinned yet: the next private run pins the config's epsilon "
                f"{summary['config_epsilon']:g}, delta {summary['config_delta']:g}")
    if not summary.get("authenticated", True):
        head += "\nnot authenticated: no key loaded, the ledger's seal was not checked"
    parts: list[Any] = [Text(head)]
    if summary.get("budget_history"):
        changes = Table(title="budget changes", title_justify="left")
        for column in ("at", "action", "epsilon", "delta", "source", "key id", "reason"):
            changes.add_column(column, justify="right" if column in ("epsilon", "delta")
                               else "left")
        for change in summary["budget_history"]:
            def moved(name: str, change: dict[str, Any] = change) -> str:
                before = change.get(f"previous_{name}")
                now = f"{change[name]:g}"
                return now if before is None or before == change[name] else f"{before:g} -> {now}"
            changes.add_row(str(change.get("at", "?")), str(change.get("action", "?")),
                            moved("epsilon"), moved("delta"), str(change.get("source") or "-"),
                            str(change.get("key_id") or "-"), str(change.get("reason") or "-"))
        parts.append(changes)
    parts.append(_render_runs(summary))
    return Group(*parts)


def _render_runs(summary: dict[str, Any]) -> Table:
    """One row per run, totals in the caption."""
    from rich.table import Table

    table = Table(title=f"privacy budget: {summary['dataset']}", title_justify="left")
    for column in ("run", "status", "private", "epsilon", "delta", "accountant", "steps",
                   "model version"):
        table.add_column(column, justify="right" if column in ("epsilon", "delta", "steps")
                         else "left")
    for entry in summary["entries"]:
        private = entry.get("private", True)
        status = entry.get("status", "?")
        if not private:
            eps_text, delta_text = "none (not DP)", "-"
        elif status == "reserved":
            eps_text = f"{entry['epsilon']:.4g} reserved"
            delta_text = f"{entry['delta']:.2g}"
        else:
            eps_text = f"{entry.get('epsilon_spent') or 0.0:.4g}"
            delta_text = f"{entry.get('delta_spent') or 0.0:.2g}"
        if status == "reserved":
            status = "unfinished (counted; `train --resume`)"
        steps = entry.get("steps")
        planned = entry.get("steps_planned")
        steps_text = f"{steps or 0}/{planned}" if planned else str(steps or "-")
        table.add_row(str(entry.get("run_id", "?")), status, "yes" if private else "NO",
                      eps_text, delta_text, str(entry.get("accountant") or "-"), steps_text,
                      str(entry.get("version") or "-"))
    table.caption = (
        f"epsilon: spent {summary['spent_epsilon']:.4g} + reserved "
        f"{summary['reserved_epsilon']:.4g}, remaining {summary['remaining_epsilon']:.4g} of "
        f"{summary['budget_epsilon']:.4g}   delta: spent {summary['spent_delta']:.3g} + reserved "
        f"{summary['reserved_delta']:.3g}, remaining {summary['remaining_delta']:.3g} of "
        f"{summary['budget_delta']:.3g}"
    )
    if summary["non_private_runs"]:
        table.caption += (f"\n{summary['non_private_runs']} non-private (--no-dp) run(s): "
                          "those models carry no DP guarantee")
    table.caption_justify = "left"
    return table


# --------------------------------------------------------------------- clipping


class UnsupportedLayerError(ValueError):
    """The network has a layer the book-keeping clipper cannot clip exactly."""


class BookkeepingClipper:
    """Per-example gradient clipping in one backward pass, for PersonaNet's layers.

    DP-SGD needs ``sum_i min(1, C / ||g_i||) g_i`` where ``g_i`` is example i's
    gradient. Opacus' ghost clipping gets the norms ``||g_i||`` without
    materialising ``g_i`` (for a linear layer, ``||g_i||^2 = ||a_i||^2 ||b_i||^2``
    from the layer's input ``a_i`` and output gradient ``b_i``), then runs a
    *second* full backward pass on the reweighted loss to get the clipped sum.
    Book-keeping (Bu et al., "Differentially Private Optimization on Large Model at
    Small Cost", ICML 2023) keeps ``a`` and ``b`` from the single backward pass and
    forms the clipped sum directly, ``W.grad = (c * B)^T A``: the same numbers, one
    backward pass fewer. The output is exactly what Opacus' clipping computes (the
    tests compare both against per-example gradients from Opacus' hooks).

    It needs every trainable layer to be `nn.Linear`, `nn.Embedding` (one index per
    example), `nn.LayerNorm` over the last dimension or `nn.GroupNorm`, used once per
    forward, with ``(batch, features)`` shapes, and no interaction between examples
    (no BatchNorm). `supports()` says whether a network qualifies; anything else goes to
    Opacus' own two-pass ghost clipping.

    Usage: `backward(per_example_losses)` sets ``p.grad`` to the clipped sum, for
    Opacus' `DPOptimizerFastGradientClipping` to noise, scale and account.
    """

    def __init__(self, model: torch.nn.Module, *, max_grad_norm: float) -> None:
        if not self.supports(model):
            raise UnsupportedLayerError("the network has layers book-keeping cannot clip")
        self.max_grad_norm = float(max_grad_norm)
        self._records: list[tuple[Any, Any, Any]] = []
        self._layers = [m for m in model.modules() if _own_parameters(m)]
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from torch import nn

        for module in model.modules():
            params = _own_parameters(module)
            if not params:
                continue
            if type(module) is nn.Linear:
                continue
            if type(module) is nn.Embedding and module.max_norm is None and not module.sparse:
                continue
            if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
                continue
            if type(module) is nn.GroupNorm:
                continue
            return False
        return True

    def _capture(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        import torch

        if module.training and torch.is_grad_enabled():
            self._records.append((module, inputs[0].detach(), output))

    def discard(self) -> None:
        """Forget captured activations (after a forward pass that is not trained on)."""
        self._records = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records = []

    def backward(self, losses: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad`` of every parameter to the sum of clipped per-example gradients.

        Args:
            losses: one loss per example, shape ``(batch,)``, from the last forward pass.

        Returns:
            The per-example gradient norms before clipping (for diagnostics only: they
            are not private).
        """
        import torch
        from torch import nn

        records, self._records = self._records, []
        seen = set()
        for module, _, _ in records:
            if id(module) in seen:
                raise UnsupportedLayerError(f"{type(module).__name__} is used twice in one "
                                            "forward pass (tied weights): cannot clip exactly")
            seen.add(id(module))
        batch = losses.shape[0]
        outputs = [out for _, _, out in records]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        squared = torch.zeros(batch, dtype=losses.dtype, device=losses.device)
        prepared = []
        for index, ((module, activation, _), grad) in enumerate(zip(records, grads,
                                                                  strict=True)):
            if grad is None:  # a layer whose output did not reach the loss
                grad = torch.zeros_like(outputs[index])
            if grad.dim() != 2 or grad.shape[0] != batch:
                raise UnsupportedLayerError(
                    f"{type(module).__name__} output has shape {tuple(grad.shape)}; "
                    "book-keeping needs (batch, features)")
            out_sq = grad.square().sum(1)
            if type(module) is nn.Linear:
                squared += out_sq * activation.square().sum(1)
                if module.bias is not None:
                    squared += out_sq
                extra = activation
            elif type(module) is nn.Embedding:
                if activation.dim() != 1:
                    raise UnsupportedLayerError("book-keeping needs one embedding index per "
                                                "example")
                if module.padding_idx is not None:
                    grad = grad * (activation != module.padding_idx).unsqueeze(1)
                    out_sq = grad.square().sum(1)
                squared += out_sq
                extra = activation
            else:  # LayerNorm over the last dimension, or GroupNorm over (batch, channels)
                if type(module) is nn.LayerNorm:
                    normed = torch.nn.functional.layer_norm(
                        activation, module.normalized_shape, eps=module.eps)
                else:
                    normed = torch.nn.functional.group_norm(activation, module.num_groups,
                                                            eps=module.eps)
                if module.weight is not None:
                    squared += (grad * normed).square().sum(1)
                if module.bias is not None:
                    squared += out_sq
                extra = normed
            prepared.append((module, extra, grad))
        norms = squared.sqrt()
        # The coefficient of Opacus' ghost clipping, so both paths give the same numbers.
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
        for module, extra, grad in prepared:
            weighted = grad * coef
            if type(module) is nn.Linear:
                module.weight.grad = weighted.t() @ extra
                if module.bias is not None:
                    module.bias.grad = weighted.sum(0)
            elif type(module) is nn.Embedding:
                module.weight.grad = torch.zeros_like(module.weight).index_add_(
                    0, extra, weighted.to(module.weight.dtype))
            else:
                if module.weight is not None:
                    module.weight.grad = (weighted * extra).sum(0)
                if module.bias is not None:
                    module.bias.grad = weighted.sum(0)
        return norms.detach()


def _own_parameters(module: Any) -> list[Any]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def ledger_path(store: ArtifactStore) -> Path:
    return store.dataset_dir / LEDGER_FILE
