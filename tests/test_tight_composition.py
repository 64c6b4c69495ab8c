"""The ledger composes a dataset's DP-SGD runs tightly, and never below the truth.

Every private run is DP-SGD with recorded (noise multiplier, sample rate, steps); the
ledger composes all of them as one history (PRV, RDP as the fallback) at the budget's
delta, instead of adding their epsilons. Cross-checked against Google's dp_accounting
(PLD and RDP), as tests/test_accounting.py does for one run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from personanet.config import Config
from personanet.errors import BudgetExhaustedError
from personanet.privacy import composition
from personanet.privacy.accounting import AccountantError, compute_epsilon
from personanet.privacy.composition import compose
from personanet.privacy.ledger import Ledger, budget_summary
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey, write_key_file

from .conftest import ledger_config, write_config

ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
RELATIVE = 0.05

#: the bundled sample's plan at train.epsilon 1, delta 1e-5: 32,561 people in batches of
#: 1024 (sample rate 1/32), 10 epochs (320 steps), the noise PRV calibrates for it
SAMPLE = (2.3155110698502224, 1 / 32, 320)
RUN_DELTA = 1e-5
KEY = MasterKey.generate()


def reference(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """dp_accounting's epsilon of the concatenated phases."""
    accountant = (pld.PLDAccountant(neighboring_relation=ADD_OR_REMOVE) if kind == "pld"
                  else rdp.RdpAccountant(neighboring_relation=ADD_OR_REMOVE))
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


def _config(tmp_path: Path, *, epsilon: float = 10.0, delta: float = 1e-4) -> Config:
    return ledger_config(tmp_path, epsilon=epsilon, delta=delta)


def _plan(sigma: float, q: float, steps: int) -> dict:
    """What train records for a DP-SGD run, with the epsilon it reserves (its own)."""
    return {"epsilon": compute_epsilon(accountant="prv", noise_multiplier=sigma,
                                       sample_rate=q, steps=steps, delta=RUN_DELTA),
            "delta": RUN_DELTA, "accountant": "prv", "noise_multiplier": sigma,
            "sample_rate": q, "steps_planned": steps, "steps": 0}


def _run(ledger: Ledger, phase: tuple[float, float, int] = SAMPLE, *,
         budget: tuple[float, float] = (10.0, 1e-4), settle: bool = True) -> dict:
    """One run as train charges it: reserved with its plan, settled at its own figure."""
    plan = _plan(*phase)
    entry = ledger.reserve(budget_epsilon=budget[0], budget_delta=budget[1], **plan)
    if settle:
        ledger.settle(entry["run_id"], epsilon=plan["epsilon"], delta=RUN_DELTA,
                      steps=phase[2])
    return entry


def _ledger(tmp_path: Path, name: str = "people") -> Ledger:
    return Ledger(ArtifactStore(tmp_path / "artifacts", name), KEY)


# ------------------------------------------------------------------ against dp_accounting

MIXED = [SAMPLE] * 5 + [(1.1, 0.01, 1000)] * 3 + [(4.0, 0.05, 200)] * 2


@pytest.mark.parametrize("history", [[SAMPLE] * 10, MIXED, [(1.0, 0.02, 500)] * 3],
                         ids=["ten-sample-runs", "mixed-runs", "three-noisier-runs"])
@pytest.mark.parametrize("delta", [1e-4, 1e-5])
def test_composed_epsilon_is_within_5_percent_of_pld_and_never_below_it(
        history: list[tuple[float, float, int]], delta: float) -> None:
    entries = [{"status": "settled", "private": True, "epsilon_spent": _plan(s, q, n)["epsilon"],
                "delta_spent": RUN_DELTA, "noise_multiplier": s, "sample_rate": q,
                "steps": n} for s, q, n in history]
    ours = compose(entries, delta=delta)
    theirs = reference("pld", history, delta)
    assert ours.method == "prv"
    assert theirs <= ours.epsilon <= (1 + RELATIVE) * theirs, (ours.epsilon, theirs)
    # the tight figure is never above RDP's either, which is looser but also a valid bound
    assert ours.epsilon <= reference("rdp", history, delta)


def test_rdp_composes_when_prv_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    real = composition.epsilon_of_history

    def prv_fails(*, accountant: str, **kwargs):
        if accountant == "prv":
            raise AccountantError("prv accountant failed")
        return real(accountant=accountant, **kwargs)

    monkeypatch.setattr(composition, "epsilon_of_history", prv_fails)
    entries = [{"status": "reserved", "private": True, "epsilon": 1.0, "delta": RUN_DELTA,
                "noise_multiplier": s, "sample_rate": q, "steps_planned": n}
               for s, q, n in MIXED]
    ours = compose(entries, delta=1e-4)
    theirs = reference("rdp", MIXED, 1e-4)
    assert ours.method == "rdp"
    assert abs(ours.epsilon - theirs) <= RELATIVE * theirs
    assert ours.epsilon >= reference("pld", MIXED, 1e-4)


def test_composition_of_a_huge_history_takes_bounded_time() -> None:
    # little noise over a million steps: PRV's grid would take minutes and gigabytes;
    # its guard refuses it and RDP answers
    entries = [{"status": "settled", "private": True, "epsilon_spent": 50.0,
                "delta_spent": RUN_DELTA, "noise_multiplier": 0.6 + i / 1000,
                "sample_rate": 0.1, "steps": 100_000} for i in range(10)]
    started = time.monotonic()
    ours = compose(entries, delta=1e-4)
    assert time.monotonic() - started < 30
    assert ours.method in ("rdp", "addition") and ours.epsilon > 0


# ------------------------------------------------------------------ the figure


def test_ten_sample_runs_cost_about_3_not_10(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    for _ in range(10):
        _run(ledger)
    summary = budget_summary(_config(tmp_path), ledger.store)
    # by addition: ten times 0.995; composed at the budget's delta 1e-4: about 2.97
    # (dp_accounting's PLD: 2.96)
    assert summary["added_epsilon"] == pytest.approx(9.95, abs=0.01)
    assert summary["composition_method"] == "prv"
    pld_figure = reference("pld", [SAMPLE] * 10, 1e-4)
    assert pld_figure <= summary["composed_epsilon"] <= (1 + RELATIVE) * pld_figure
    assert summary["composed_epsilon"] == pytest.approx(2.97, abs=0.03)
    assert summary["remaining_epsilon"] == pytest.approx(10 - summary["composed_epsilon"])


# ------------------------------------------------------------------ the budget check


def test_a_run_that_fits_only_composed_is_accepted_and_one_that_does_not_is_refused(
        tmp_path: Path) -> None:
    budget = (3.2, 1e-4)
    ledger = _ledger(tmp_path)
    for _ in range(10):  # by addition the fourth would already be refused (3.98 > 3.2)
        _run(ledger, budget=budget)
    assert compose(ledger.entries, delta=1e-4).epsilon < budget[0]
    ledger.check(epsilon=1.0, delta=RUN_DELTA, budget_epsilon=budget[0],
                 budget_delta=budget[1])  # room is left: the fail-fast lets a run through
    # an eleventh run with far less noise composes past 3.2
    before = len(ledger.entries)
    with pytest.raises(BudgetExhaustedError, match="composed by prv") as refused:
        _run(ledger, phase=(1.2, 1 / 32, 320), budget=budget)
    assert refused.value.exit_code == 69
    assert len(ledger.entries) == before  # nothing written
    with pytest.raises(BudgetExhaustedError) as refused_check:
        ledger.check(budget_epsilon=budget[0], budget_delta=budget[1],
                     **_plan(1.2, 1 / 32, 320))
    assert refused_check.value.exit_code == 69


def test_check_without_the_plan_refuses_only_when_nothing_is_left(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    for _ in range(3):
        _run(ledger, budget=(1.6, 1e-4))
    composed = compose(ledger.entries, delta=1e-4).epsilon
    ledger.check(epsilon=1.0, delta=RUN_DELTA, budget_epsilon=1.6, budget_delta=1e-4)
    with pytest.raises(BudgetExhaustedError, match="remaining 0 of"):
        ledger.check(epsilon=1.0, delta=RUN_DELTA, budget_epsilon=composed,
                     budget_delta=1e-4)


def test_entries_without_dp_sgd_parameters_still_add_up(tmp_path: Path) -> None:
    # a ledger written before the parameters were recorded: basic composition, as before
    ledger = _ledger(tmp_path)
    for _ in range(2):
        entry = ledger.reserve(epsilon=1.0, delta=RUN_DELTA, budget_epsilon=3.0,
                               budget_delta=1e-4, accountant="prv")
        ledger.settle(entry["run_id"], epsilon=0.99, delta=RUN_DELTA)
    _run(ledger, budget=(3.0, 1e-4))
    composed = compose(ledger.entries, delta=1e-4)
    alone = compute_epsilon(accountant="prv", noise_multiplier=SAMPLE[0],
                            sample_rate=SAMPLE[1], steps=SAMPLE[2], delta=1e-4 - 2e-5)
    assert composed.other_runs == 2 and composed.dpsgd_runs == 1
    assert composed.epsilon == pytest.approx(2 * 0.99 + alone)
    assert composed.other_delta == pytest.approx(2e-5)


def test_a_killed_run_counts_its_full_plan(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    for _ in range(9):
        _run(ledger)
    killed = _run(ledger, settle=False)
    ledger.update(killed["run_id"], steps=3)  # it died after 3 of its 320 steps
    entries = ledger.entries
    assert entries[-1]["status"] == "reserved"
    full = [{**e, "status": "settled", "steps": SAMPLE[2]} for e in entries]
    assert compose(entries, delta=1e-4).epsilon == pytest.approx(
        compose(full, delta=1e-4).epsilon)
    summary = budget_summary(_config(tmp_path), ledger.store)
    assert summary["reserved_epsilon"] == pytest.approx(entries[-1]["epsilon"])
    assert summary["composed_epsilon"] == pytest.approx(compose(full, delta=1e-4).epsilon)


def test_settled_run_counts_the_steps_it_took(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    entry = ledger.reserve(budget_epsilon=10.0, budget_delta=1e-4, **_plan(*SAMPLE))
    ledger.settle(entry["run_id"], epsilon=0.5, delta=RUN_DELTA, steps=100)
    assert compose(ledger.entries, delta=1e-4).epsilon == pytest.approx(min(
        0.5, compute_epsilon(accountant="prv", noise_multiplier=SAMPLE[0],
                             sample_rate=SAMPLE[1], steps=100, delta=1e-4)))


# ------------------------------------------------------------------ budget show


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MasterKey:
    key = MasterKey.generate()
    path = tmp_path / "master.key"
    write_key_file(path, key)
    monkeypatch.delenv("PERSONANET_KEY", raising=False)
    monkeypatch.setenv("PERSONANET_KEY_FILE", str(path))
    return key


def test_budget_show_prints_composed_added_and_the_next_run(cli, key_file: MasterKey,
                                                           tmp_path: Path) -> None:
    config = write_config(tmp_path / "persona.toml", tmp_path / "none.csv")
    ledger = Ledger(ArtifactStore(tmp_path / "artifacts", "persona"), key_file)
    shown = cli("--json", "--config", config, "budget", "show")
    assert shown.code == 0, shown.stderr
    assert shown.json()["next_run"] == {"basis": "config", "epsilon": 1.0,
                                        "epsilon_by_addition": 1.0}
    runs = [_run(ledger) for _ in range(10)]

    figures = cli("--json", "--config", config, "budget", "show").json()
    assert figures["composition_method"] == "prv"
    assert figures["added_epsilon"] == pytest.approx(9.95, abs=0.01)
    assert figures["composed_epsilon"] == pytest.approx(2.97, abs=0.03)
    nxt = figures["next_run"]
    assert nxt["basis"] == "last run" and nxt["like_run"] == runs[-1]["run_id"]
    eleven = reference("pld", [SAMPLE] * 11, 1e-4)
    assert eleven <= nxt["composed_epsilon"] <= (1 + RELATIVE) * eleven
    assert 0 < nxt["epsilon"] < 0.3 < nxt["epsilon_by_addition"]

    text = cli("--config", config, "budget", "show")
    assert text.code == 0, text.stderr
    flat = " ".join(text.stdout.split())
    assert (f"spent {figures['composed_epsilon']:.4g} (composed by PRV, at delta 0.0001"
            in flat)
    assert f"by addition {figures['added_epsilon']:.4g}" in flat
    assert f"would add epsilon {nxt['epsilon']:.4g}" in flat
    assert json.loads(json.dumps(figures))  # plain JSON, nothing infinite
