"""The budget check's fast path: a run whose epsilons summed fit the budget is accepted
without the tight accountant, and every decision is the one the tight check takes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from personanet.errors import BudgetExhaustedError
from personanet.privacy import composition
from personanet.privacy.ledger import Ledger
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey

KEY = MasterKey.generate()
PHASES = [(2.3155110698502224, 1 / 32, 320), (1.2, 1 / 32, 100)]


def _entry(rng: random.Random) -> dict[str, Any]:
    sigma, rate, steps = rng.choice(PHASES)
    status = rng.choice(["reserved", "settled", "settled", "released"])
    delta = rng.choice([1e-5, 4e-5])
    epsilon = rng.uniform(0.2, 1.5)
    entry = {"status": status, "private": rng.random() > 0.1, "epsilon": epsilon,
             "delta": delta, "epsilon_spent": epsilon if status == "settled" else None,
             "delta_spent": delta if status == "settled" else None,
             "noise_multiplier": sigma, "sample_rate": rate, "steps_planned": steps,
             "steps": steps if status == "settled" else 0}
    if rng.random() < 0.15:  # another mechanism, or an old entry without its parameters
        entry["mechanism"] = "laplace"
    return entry


def _decision(entries: list[dict[str, Any]], planned: dict[str, Any], budget: tuple,
              room_only: bool) -> str:
    try:
        composition.check_budget(entries, dataset="people", planned=planned,
                                 budget_epsilon=budget[0], budget_delta=budget[1],
                                 room_only=room_only)
    except BudgetExhaustedError as exc:
        return str(exc)
    return "accepted"


def test_every_decision_is_the_tight_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(14)
    cases = []
    for _ in range(80):
        entries = [_entry(rng) for _ in range(rng.randint(0, 5))]
        planned = {**_entry(rng), "status": "reserved", "private": True}
        added = sum(composition.counted(e)[0] for e in [*entries, planned])
        budget = (added * rng.uniform(0.3, 1.3) + rng.choice([0.0, composition.SLACK]),
                  rng.choice([1e-4, 5e-5, 2e-5]))
        cases.append((entries, planned, budget, rng.random() < 0.25))
    # the runs' deltas (1.2e-4) exceed the budget's, so their sum (1.2) may not be used:
    # composed tightly at 1e-4 they spend more than 1.2, and the run is refused
    sigma, rate, steps = PHASES[0]
    low = {"status": "settled", "epsilon": 0.3, "delta": 4e-5, "epsilon_spent": 0.3,
           "delta_spent": 4e-5, "noise_multiplier": sigma, "sample_rate": rate,
           "steps_planned": steps, "steps": steps}
    planned = {**low, "status": "reserved", "delta": 1e-5, "steps": 0}
    cases += [([low] * 3, planned, (1.2, 1e-4), False),
              ([low] * 3, planned, (0.95, 1e-4), True)]
    fast = [_decision(*case) for case in cases]
    monkeypatch.setattr(composition, "_fits_by_addition", lambda *a, **k: False)
    tight = [_decision(*case) for case in cases]
    assert fast == tight
    # the cases cover acceptances and refusals, by epsilon and by delta
    assert "accepted" in fast and any("epsilon" in d for d in fast)
    assert any("spent delta" in d for d in fast)


def test_a_run_whose_sum_fits_is_charged_without_the_tight_accountant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(ArtifactStore(tmp_path / "artifacts", "people"), KEY)
    sigma, rate, steps = PHASES[0]
    plan = {"epsilon": 0.995, "delta": 1e-5, "noise_multiplier": sigma, "sample_rate": rate,
            "steps_planned": steps, "steps": 0}
    for _ in range(3):
        entry = ledger.reserve(budget_epsilon=10.0, budget_delta=1e-4, **plan)
        ledger.settle(entry["run_id"], epsilon=0.995, delta=1e-5, steps=steps)

    def no_accountant(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the tight accountant ran although the sum fits")

    monkeypatch.setattr(composition, "_tight_epsilon", no_accountant)
    ledger.check(budget_epsilon=10.0, budget_delta=1e-4, **plan)  # 3.98 <= 10
    ledger.check(epsilon=0.995, delta=1e-5, budget_epsilon=10.0, budget_delta=1e-4)
    ledger.reserve(budget_epsilon=10.0, budget_delta=1e-4, **plan)
    # past the sum (4.975 > 3), only the tight accountant can say whether it fits
    with pytest.raises(AssertionError, match="tight accountant ran"):
        ledger.check(budget_epsilon=3.0, budget_delta=1e-4, **plan)
    monkeypatch.undo()
    ledger.check(budget_epsilon=3.0, budget_delta=1e-4, **plan)  # composed about 2.3
