"""Composition: what a dataset's runs add up to, and whether one more run fits its budget.

Runs compose by basic sequential composition: their epsilons add up, and so do their
deltas. A reservation (a run that has not settled: still running, or killed) counts in
full; a settled run counts what its accountant said it spent; a released one (stopped
before its first step) and a non-private one count nothing. The budget in force is the
one pinned in the ledger, or the config's where that is lower. These rules are pure
functions of a ledger document, so `Ledger` and ``budget show`` apply the same ones.
"""

from __future__ import annotations

import logging
from typing import Any

from personanet.errors import BudgetExhaustedError

logger = logging.getLogger("personanet")

#: Sums of floats: a run that fits exactly must not be refused for a rounding error.
SLACK = 1e-9


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
    """What an entry counts against the budget: reserved in full until settled."""
    if not entry.get("private", True):
        return 0.0, 0.0
    if entry.get("status") == "reserved":
        return float(entry["epsilon"]), float(entry["delta"])
    if entry.get("status") == "settled":
        return float(entry.get("epsilon_spent") or 0.0), float(entry.get("delta_spent") or 0.0)
    return 0.0, 0.0


def totals(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Settled and reserved (epsilon, delta) over `entries`, each summed on its own."""
    out = {"settled_epsilon": 0.0, "settled_delta": 0.0,
           "reserved_epsilon": 0.0, "reserved_delta": 0.0}
    for entry in entries:
        eps, delta = counted(entry)
        kind = "reserved" if entry.get("status") == "reserved" else "settled"
        out[f"{kind}_epsilon"] += eps
        out[f"{kind}_delta"] += delta
    return out


def check_budget(entries: list[dict[str, Any]], *, dataset: str, epsilon: float, delta: float,
                 budget_epsilon: float, budget_delta: float) -> None:
    """BudgetExhaustedError (exit 69) when (epsilon, delta) does not fit what is left."""
    spent = totals(entries)
    spent_eps = spent["settled_epsilon"] + spent["reserved_epsilon"]
    spent_delta = spent["settled_delta"] + spent["reserved_delta"]
    left_eps = budget_epsilon - spent_eps
    left_delta = budget_delta - spent_delta
    reserved = (f" (incl. {spent['reserved_epsilon']:.4g} reserved by unfinished runs)"
                if spent["reserved_epsilon"] else "")
    if epsilon > left_eps + SLACK:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent epsilon "
            f"{spent_eps:.4g}{reserved}, requested {epsilon:.4g}, remaining "
            f"{max(left_eps, 0.0):.4g} of {budget_epsilon:.4g}; lower train.epsilon, reuse an "
            "existing model, or (if policy allows) raise budget.epsilon"
        )
    if delta > left_delta + SLACK * budget_delta:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent delta {spent_delta:.3g}, "
            f"requested {delta:.3g}, remaining {max(left_delta, 0.0):.3g} of {budget_delta:.3g}; "
            "lower train.delta or (if policy allows) raise budget.delta"
        )

