"""Composition: what a dataset's runs spend together, and whether one more run fits its budget.

Every private PersonaNet run is DP-SGD, and its ledger entry records the three public
parameters that determine its privacy loss: noise multiplier, sample rate and steps.
Those runs are composed *tightly*: their phases are concatenated into one history and
handed to the PRV accountant (Opacus; its upper bound, never below the true value), at
the budget's delta; where PRV's grid would be too large (`PRV_MAX_POINTS`, the guard of
`personanet.privacy.accounting`) or it fails, RDP does it instead. Ten runs at epsilon
0.995 on the bundled sample cost 9.95 by addition, 2.97 composed at delta 1e-4 (2.96
by dp-accounting's PLD).

Exactly what is computed, for a budget (epsilon_B, delta_B):

- entries that are not a DP-SGD run with its parameters (a ledger written before they
  were recorded, another mechanism) compose by addition: (sum epsilon_i, sum delta_i);
- the DP-SGD runs are composed at delta_t = delta_B - that sum of deltas, as one
  mechanism: epsilon_t is the accountant's epsilon of the concatenated history at
  delta_t. The runs' own deltas are not added: each run's (epsilon, delta) is a view of
  the same mechanism at its own delta, and the composition is accounted afresh. Where
  the runs' own figures added up are lower (one run accounted at its own delta: PRV's
  upper bound carries a small margin) and their deltas fit in delta_t, that sum is
  used: basic composition is valid too;
- the dataset then satisfies (epsilon_t + sum epsilon_i, delta_B)-DP, and that epsilon
  is what is checked against epsilon_B, with nothing subtracted.

Which steps count: a reservation (still running, or killed) its full planned steps; a
settled run the steps it took; a released one (stopped before its first step) and a
non-private one nothing. The budget in force is the one pinned in the ledger, or the
config's where that is lower. These rules are pure functions of a ledger document, so
`Ledger` and ``budget show`` apply the same ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from personanet.errors import BudgetExhaustedError
from personanet.privacy.accounting import AccountantError, epsilon_of_history

logger = logging.getLogger("personanet")

#: Sums of floats: a run that fits exactly must not be refused for a rounding error.
SLACK = 1e-9

#: the mechanism a ledger entry is, where it says nothing else: one DP-SGD run
DP_SGD = "dp-sgd"
#: a row-level run charged its per-person bound (group privacy): composed by addition,
#: never as the Gaussian it was derived from
GROUP_PRIVACY = "group-privacy"


@dataclass(frozen=True)
class Composition:
    """What a set of ledger entries spends together, at one delta."""

    #: the composed epsilon at `delta`: the DP-SGD runs composed tightly plus the
    #: epsilons of the other entries; infinite when their deltas leave none for the runs
    epsilon: float
    #: the delta of the guarantee: the budget's
    delta: float
    #: how the DP-SGD runs were composed: "prv", "rdp", "addition" (their own figures
    #: summed were lower), "none" (no DP-SGD run)
    method: str
    #: every entry's own epsilon and delta summed (basic composition), for comparison
    added_epsilon: float
    added_delta: float
    #: the delta spent by the entries composed by addition (the runs get what is left)
    other_delta: float
    #: how many entries were composed tightly, and how many by addition
    dpsgd_runs: int
    other_runs: int


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
        if asked > pin * (1 + SLACK):
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


def counted(entry: dict[str, Any]) -> tuple[float, float]:
    """An entry's own (epsilon, delta): reserved in full until settled."""
    if not entry.get("private", True):
        return 0.0, 0.0
    if entry.get("status") == "reserved":
        return float(entry["epsilon"]), float(entry["delta"])
    if entry.get("status") == "settled":
        return float(entry.get("epsilon_spent") or 0.0), float(entry.get("delta_spent") or 0.0)
    return 0.0, 0.0


def dpsgd_phase(entry: dict[str, Any]) -> tuple[float, float, int] | None:
    """The (noise multiplier, sample rate, steps) an entry counts with, or None when it
    is not a counted DP-SGD run with its parameters (it then composes by addition).

    A reservation counts its full plan (a killed run may have taken every step); a
    settled run the steps it took (its planned ones where an old entry lacks them).
    """
    if not entry.get("private", True) or entry.get("mechanism", DP_SGD) != DP_SGD:
        return None
    status = entry.get("status")
    planned, taken = entry.get("steps_planned"), entry.get("steps")
    if status == "reserved":
        steps = planned
    elif status == "settled":
        steps = taken if taken is not None else planned
    else:
        return None
    try:
        sigma, rate = float(entry["noise_multiplier"]), float(entry["sample_rate"])
        steps = int(steps)
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(sigma) and sigma > 0 and 0 < rate <= 1 and steps >= 0):
        return None
    return sigma, rate, steps


def totals(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Settled and reserved (epsilon, delta) over `entries`, each summed on its own
    (basic composition: what the runs would cost without the tight accountant)."""
    out = {"settled_epsilon": 0.0, "settled_delta": 0.0,
           "reserved_epsilon": 0.0, "reserved_delta": 0.0}
    for entry in entries:
        eps, delta = counted(entry)
        kind = "reserved" if entry.get("status") == "reserved" else "settled"
        out[f"{kind}_epsilon"] += eps
        out[f"{kind}_delta"] += delta
    return out


@dataclass(frozen=True)
class _Tally:
    """`entries` sorted into DP-SGD runs (merged into one history) and the others."""

    history: list[tuple[float, float, int]]
    own_eps: float
    own_delta: float
    other_eps: float
    other_delta: float
    runs: int
    others: int

    def added_bound(self, delta: float) -> float:
        """An upper bound on `compose(...).epsilon` at `delta` with no accountant: the
        sum of the epsilons wherever `compose` would be allowed to use it (it takes the
        lower of that sum and the tight figure), else infinity."""
        if (not any(steps for _, _, steps in self.history)
                or self.own_delta <= (delta - self.other_delta) * (1 + SLACK)):
            return self.own_eps + self.other_eps
        return math.inf


def _tally(entries: list[dict[str, Any]]) -> _Tally:
    phases: dict[tuple[float, float], int] = {}
    own_eps = own_delta = other_eps = other_delta = 0.0
    runs = others = 0
    for entry in entries:
        eps, entry_delta = counted(entry)
        phase = dpsgd_phase(entry)
        if phase is None:
            if eps or entry_delta:
                others += 1
            other_eps += eps
            other_delta += entry_delta
            continue
        runs += 1
        own_eps += eps
        own_delta += entry_delta
        sigma, rate, steps = phase
        # n steps of one (sigma, q) compose exactly as one phase of n steps, whichever
        # run took them: merged, PRV discretises one mechanism instead of one per run.
        phases[(sigma, rate)] = phases.get((sigma, rate), 0) + steps
    history = [(sigma, rate, steps) for (sigma, rate), steps in sorted(phases.items())]
    return _Tally(history, own_eps, own_delta, other_eps, other_delta, runs, others)


def compose(entries: list[dict[str, Any]], *, delta: float) -> Composition:
    """The (epsilon, `delta`) that `entries` spend together (see the module's rules)."""
    tally = _tally(entries)
    history, own_eps, own_delta = tally.history, tally.own_eps, tally.own_delta
    other_eps, other_delta = tally.other_eps, tally.other_delta
    runs, others = tally.runs, tally.others
    added_eps, added_delta = own_eps + other_eps, own_delta + other_delta
    if not any(steps for _, _, steps in history):
        return Composition(epsilon=added_eps, delta=delta, method="none",
                           added_epsilon=added_eps, added_delta=added_delta,
                           other_delta=other_delta, dpsgd_runs=runs, other_runs=others)
    tight_delta = delta - other_delta
    epsilon, method = (_tight_epsilon(history, tight_delta) if tight_delta > 0
                       else (math.inf, "none"))
    if own_delta <= tight_delta * (1 + SLACK) and own_eps < epsilon:
        epsilon, method = own_eps, "addition"
    return Composition(epsilon=epsilon + other_eps, delta=delta, method=method,
                       added_epsilon=added_eps, added_delta=added_delta,
                       other_delta=other_delta, dpsgd_runs=runs, other_runs=others)


def _tight_epsilon(history: list[tuple[float, float, int]], delta: float
                   ) -> tuple[float, str]:
    """Epsilon at `delta` of the concatenated DP-SGD history, by PRV, else RDP.

    PRV refuses (`AccountantError`) before discretising on more than `PRV_MAX_POINTS`
    points, so this takes seconds at most; RDP's bound is closed-form.
    """
    for accountant in ("prv", "rdp"):
        try:
            return epsilon_of_history(accountant=accountant, history=history,
                                      delta=delta), accountant
        except AccountantError as exc:
            logger.info("composing the ledger's runs: %s; trying the next accountant", exc)
    return math.inf, "none"


def next_run_cost(entries: list[dict[str, Any]], *, delta: float, train_epsilon: float
                  ) -> dict[str, Any]:
    """What one more run would add to the composed epsilon at `delta`.

    The config's own plan (noise, sample rate, steps) is known only once train has read
    the rows and calibrated its noise, so the figure is that of a run identical to the
    last DP-SGD run (``basis: "last run"``), beside what addition would charge (its own
    epsilon). Before any such run: at most the config's `train_epsilon` (``basis:
    "config"``), since one run composed at the budget's delta costs no more than that.
    """
    last = next((e for e in reversed(entries) if dpsgd_phase(e) is not None
                 or (e.get("mechanism") == GROUP_PRIVACY and counted(e)[0] > 0)), None)
    if last is None:
        return {"basis": "config", "epsilon": float(train_epsilon),
                "epsilon_by_addition": float(train_epsilon)}
    before = compose(entries, delta=delta).epsilon
    if last.get("mechanism") == GROUP_PRIVACY:
        # A row-level run charged its per-person bound: one more adds that bound again.
        epsilon, run_delta = counted(last)
        again = {"status": "reserved", "private": True, "mechanism": GROUP_PRIVACY,
                 "epsilon": epsilon, "delta": run_delta}
        after = compose([*entries, again], delta=delta).epsilon
        return {"basis": "last run", "like_run": last.get("run_id"),
                "mechanism": GROUP_PRIVACY, "rows_per_unit": last.get("rows_per_unit"),
                "epsilon": after - before, "composed_epsilon": after,
                "epsilon_by_addition": epsilon}
    sigma, rate, taken = dpsgd_phase(last) or (0.0, 0.0, 0)
    steps = int(last.get("steps_planned") or taken)
    again = {"status": "reserved", "private": True, "epsilon": counted(last)[0],
             "delta": float(last["delta"]), "noise_multiplier": sigma, "sample_rate": rate,
             "steps_planned": steps}
    after = compose([*entries, again], delta=delta).epsilon
    return {"basis": "last run", "like_run": last.get("run_id"), "noise_multiplier": sigma,
            "sample_rate": rate, "steps": steps, "epsilon": after - before,
            "composed_epsilon": after, "epsilon_by_addition": again["epsilon"]}


def check_budget(entries: list[dict[str, Any]], *, dataset: str, planned: dict[str, Any],
                 budget_epsilon: float, budget_delta: float, room_only: bool = False) -> None:
    """BudgetExhaustedError (exit 69) when the `planned` entry (as `Ledger.reserve`
    writes it: epsilon, delta and, for DP-SGD, its parameters) does not fit what
    `entries` leave of the budget.

    With `room_only` (a run whose parameters are not known yet) the run's epsilon is
    not composed: only whether any epsilon is left at all, and its delta, are checked.
    That fail-fast never refuses what the full check would accept, since composing one
    more run never lowers epsilon.

    The tight accountant is skipped when the epsilons summed already fit: `compose`
    never reports more than that sum, so the decision is the same (and a refusal, or a
    sum above the budget, is always composed tightly).
    """
    if _fits_by_addition(entries, planned=planned, budget_epsilon=budget_epsilon,
                         budget_delta=budget_delta, room_only=room_only):
        return
    before = compose(entries, delta=budget_delta)
    after = before if room_only else compose([*entries, planned], delta=budget_delta)
    reserved = totals(entries)["reserved_epsilon"]
    if before.method in ("prv", "rdp"):
        spent = (f"{before.epsilon:.4g} composed by {before.method} "
                 f"({before.added_epsilon:.4g} by addition"
                 + (f", incl. {reserved:.4g} reserved by unfinished runs)" if reserved else ")"))
        added = after.epsilon - before.epsilon
        requested = "" if room_only else f"this run would add {added:.4g}, "
    else:
        spent = f"{before.epsilon:.4g}" + (f" (incl. {reserved:.4g} reserved by unfinished runs)"
                                           if reserved else "")
        requested = "" if room_only else f"requested {float(planned['epsilon']):.4g}, "
    full = room_only and before.epsilon >= budget_epsilon - SLACK
    if full or after.epsilon > budget_epsilon + SLACK:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent epsilon {spent}, "
            f"{requested}remaining "
            f"{max(budget_epsilon - before.epsilon, 0.0):.4g} of {budget_epsilon:.4g}; lower "
            "train.epsilon, reuse an existing model, or (if policy allows) raise "
            "budget.epsilon")
    # Entries composed by addition spend their deltas; the DP-SGD runs are accounted at
    # what is left of the budget's delta, and none may promise a delta above it.
    delta = float(planned["delta"])
    left_delta = budget_delta - before.other_delta
    if delta > left_delta + SLACK * budget_delta:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent delta "
            f"{before.other_delta:.3g}, requested {delta:.3g}, remaining "
            f"{max(left_delta, 0.0):.3g} of {budget_delta:.3g}; lower train.delta or (if "
            "policy allows) raise budget.delta")


def _fits_by_addition(entries: list[dict[str, Any]], *, planned: dict[str, Any],
                      budget_epsilon: float, budget_delta: float, room_only: bool) -> bool:
    """True when `check_budget` would accept `planned` whatever the tight accountant
    says: the summed epsilons fit (with `compose`'s own condition for using that sum)
    and so does the run's delta. Anything else (NaN included) takes the full check."""
    tally = _tally(entries)
    if room_only:
        fits = tally.added_bound(budget_delta) < budget_epsilon - SLACK
    else:
        fits = (_tally([*entries, planned]).added_bound(budget_delta)
                <= budget_epsilon + SLACK)
    left_delta = budget_delta - tally.other_delta
    return fits and float(planned["delta"]) <= left_delta + SLACK * budget_delta
