"""PersonaNet's epsilon, cross-checked against an independent accountant (Google's dp_accounting).

`personanet.privacy.accounting.compute_epsilon` (Opacus' PRV and RDP accountants) must agree
with dp_accounting's RDP accountant and PLD accountant, each composing a
PoissonSampledDpEvent(GaussianDpEvent(sigma), q) `steps` times under add-or-remove-one
neighbouring (Opacus' relation), and it must never claim less privacy loss than
the tighter of the two references. A real (tiny) training run's privacy.json is
recomputed the same way from its own noise multiplier, sample rate and steps.

Tolerance: 5 % of the reference. PRV is compared with an extra 0.0125 in absolute
terms: Opacus returns PRV's *upper* bound, the estimate plus its eps_error (0.01 by
default), which only shows at epsilons below ~0.2.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from personanet.privacy.accounting import compute_epsilon

from .conftest import write_config

RELATIVE = 0.05
# opacus.accountants.PRVAccountant.get_epsilon(eps_error=0.01) returns the estimate plus
# eps_error, plus a little of its mesh: up to 0.0104 above the PLD value on this grid.
PRV_UPPER_BOUND_MARGIN = 0.0125
ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

SIGMAS = (0.6, 1.0, 2.0, 5.0)
RATES = (0.001, 0.01, 0.05)
STEPS = (100, 1000, 10_000)
DELTAS = (1e-5, 1e-6)
# Cells whose epsilon is above 20 at both deltas: outside any budget anyone sets, where
# dp_accounting's RDP drops the low orders that fail to converge (sigma 0.6, q 0.05), and
# by far the slowest for the PRV accountant (15 s a cell).
PRUNED = {(0.6, 0.01, 10_000), (0.6, 0.05, 1000), (0.6, 0.05, 10_000), (1.0, 0.05, 10_000)}
GRID = [cell for cell in itertools.product(SIGMAS, RATES, STEPS) if cell not in PRUNED]


def cell_id(cell: tuple[float, float, int]) -> str:
    sigma, q, steps = cell
    return f"sigma={sigma}-q={q}-steps={steps}"


def grid() -> list:
    return [pytest.param(cell, id=cell_id(cell)) for cell in GRID]


def dpsgd_event(sigma: float, q: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def reference(kind: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """dp_accounting's epsilon for phases of (noise multiplier, sample rate, steps)."""
    return _reference(kind, history)[delta]


@functools.cache
def _reference(kind: str, history: tuple[tuple[float, float, int], ...]) -> dict[float, float]:
    if kind == "rdp":
        accountant = rdp.RdpAccountant(neighboring_relation=ADD_OR_REMOVE)
    else:
        # The default discretisation (1e-4): a coarser grid is pessimistic by up to 60 %
        # at the smallest epsilons of the grid.
        accountant = pld.PLDAccountant(neighboring_relation=ADD_OR_REMOVE)
    for sigma, q, steps in history:
        accountant.compose(dpsgd_event(sigma, q), steps)
    return {delta: float(accountant.get_epsilon(delta))
            for delta in sorted({*DELTAS, 1e-5, 1e-6, 1e-7})}


def personanet(accountant: str, cell: tuple[float, float, int], delta: float) -> float:
    sigma, q, steps = cell
    return compute_epsilon(accountant=accountant, noise_multiplier=sigma, sample_rate=q,
                           steps=steps, delta=delta)


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("cell", grid())
def test_prv_epsilon_matches_dp_accounting_pld(cell: tuple[float, float, int]) -> None:
    for delta in DELTAS:
        ours = personanet("prv", cell, delta)
        theirs = reference("pld", (cell,), delta)
        assert abs(ours - theirs) <= RELATIVE * theirs + PRV_UPPER_BOUND_MARGIN, (delta, ours,
                                                                                   theirs)


@pytest.mark.parametrize("cell", grid())
def test_rdp_epsilon_matches_dp_accounting_rdp(cell: tuple[float, float, int]) -> None:
    for delta in DELTAS:
        ours = personanet("rdp", cell, delta)
        theirs = reference("rdp", (cell,), delta)
        assert abs(ours - theirs) <= RELATIVE * theirs, (delta, ours, theirs)


@pytest.mark.parametrize("cell", grid())
def test_personanet_never_reports_less_than_the_tighter_reference(cell: tuple[float, float, int]
                                                                  ) -> None:
    # The direction that matters for privacy: an epsilon below the truth is a false promise.
    for delta, accountant in itertools.product(DELTAS, ("prv", "rdp")):
        tighter = min(reference("rdp", (cell,), delta), reference("pld", (cell,), delta))
        assert personanet(accountant, cell, delta) >= (1 - RELATIVE) * tighter, (delta,
                                                                                 accountant)


# ----------------------------------------------------------------------------- a real run


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_train_artifact_epsilon_matches_dp_accounting_recomputed(cli, key_env, tmp_path: Path,
                                                                 small_csv: Path,
                                                                 accountant: str) -> None:
    config = write_config(tmp_path / "persona.toml", small_csv, overrides=(
        f'[train]\nepochs = 1\nbatch_size = 64\naccountant = "{accountant}"\n'))
    for stage in ("collect", "clean"):
        assert cli("--config", config, stage).code == 0
    trained = cli("--json", "--config", config, "train", "--device", "cpu")
    assert trained.code == 0, trained.stderr
    figures = trained.json()
    privacy = json.loads((Path(figures["path"]) / "privacy.json").read_text())

    assert privacy["private"] is True and privacy["accountant"] == accountant
    sigma, q, steps = privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"]
    delta, epsilon = privacy["delta"], privacy["epsilon"]
    assert steps > 0 and 0 < q < 1 and sigma > 0
    history = tuple((float(s), float(r), int(n)) for s, r, n in privacy["accountant_history"])
    assert sum(n for _, _, n in history) == steps
    assert {(s, r) for s, r, _ in history} == {(sigma, q)}

    kind = "pld" if accountant == "prv" else "rdp"
    theirs = reference(kind, history, delta)
    margin = PRV_UPPER_BOUND_MARGIN if accountant == "prv" else 0.0
    assert abs(epsilon - theirs) <= RELATIVE * theirs + margin, (epsilon, theirs)
    tighter = min(reference("rdp", history, delta), reference("pld", history, delta))
    assert epsilon >= (1 - RELATIVE) * tighter
    assert epsilon <= privacy["target_epsilon"] + 1e-9, "noise was calibrated to the target"

    # One figure everywhere: the run's output, its privacy.json and the budget ledger.
    assert figures["epsilon"] == epsilon
    ledger = json.loads((tmp_path / "artifacts" / "persona" / "budget.json").read_text())
    (entry,) = ledger["entries"]
    assert entry["status"] == "settled" and entry["epsilon_spent"] == epsilon
