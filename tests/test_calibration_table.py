"""DP's fixed costs in a new process: the on-disk calibration table (trusted for speed
only) and progress epsilon between epochs from RDP (the final figure stays PRV's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personanet.privacy import accounting
from personanet.privacy.accounting import (
    calibrate_noise,
    compute_epsilon,
    epsilon_of_history,
    rdp_bound,
)
from personanet.privacy.calibration_table import TABLE_NAME, calibration_table

from .calibration_helpers import count_searches, fresh_calibration_caches  # noqa: F401

PLAN = dict(accountant="prv", target_epsilon=1.0, delta=1e-5, sample_rate=0.08, steps=124)


def _new_process() -> None:
    """What a new process starts with: nothing remembered in memory."""
    accounting._CALIBRATIONS.clear()
    accounting._epsilon.cache_clear()


def _edit(table: Path, **changes) -> None:
    doc = json.loads(table.read_text())
    for entry in doc["calibrations"].values():
        entry.update(changes)
    table.write_text(json.dumps(doc))


def test_a_new_process_takes_the_noise_from_the_table_without_a_search(tmp_path,
                                                                        monkeypatch) -> None:
    table = tmp_path / "calibration.json"
    calls = count_searches(monkeypatch)
    with calibration_table(table):
        first = calibrate_noise(**PLAN)
        _new_process()
        again = calibrate_noise(**PLAN)
    assert again == first and len(calls) == 1
    # Public numbers only: the plan (in the key) and its answer.
    (entry,) = json.loads(table.read_text())["calibrations"].values()
    assert set(entry) == {"sigma", "accountant", "notes"} and entry["sigma"] == first[0]
    # Outside the block the table is not used.
    _new_process()
    calibrate_noise(**PLAN)
    assert len(calls) == 2


@pytest.mark.parametrize("factor", [0.8, 1.5])
def test_an_edited_noise_in_the_table_is_refused_and_searched_again(tmp_path, monkeypatch,
                                                                    factor) -> None:
    # Less noise would overspend epsilon; more noise would waste accuracy: both refused.
    table = tmp_path / "calibration.json"
    with calibration_table(table):
        sigma, used = calibrate_noise(**PLAN)
        _edit(table, sigma=sigma * factor)
        _new_process()
        calls = count_searches(monkeypatch)
        assert calibrate_noise(**PLAN) == (sigma, used)
    assert len(calls) == 1
    assert json.loads(table.read_text())["calibrations"].popitem()[1]["sigma"] == sigma


def test_a_prv_plan_is_not_answered_by_an_edited_rdp_entry(tmp_path, monkeypatch) -> None:
    table = tmp_path / "calibration.json"
    with calibration_table(table):
        sigma, _ = calibrate_noise(**PLAN)
        rdp_sigma, _ = calibrate_noise(**{**PLAN, "accountant": "rdp"})
        _edit(table, sigma=rdp_sigma, accountant="rdp")  # valid, but not what PRV needs
        _new_process()
        calls = count_searches(monkeypatch)
        assert calibrate_noise(**PLAN) == (sigma, "prv")
    assert len(calls) == 1


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "calibrations": []}',
                                     '{"format": 99, "calibrations": {}}', "[]"])
def test_an_unreadable_table_is_a_miss(tmp_path, content) -> None:
    table = tmp_path / "calibration.json"
    table.write_text(content)
    with calibration_table(table):
        sigma, used = calibrate_noise(**PLAN)
    assert compute_epsilon(accountant=used, noise_multiplier=sigma, sample_rate=0.08,
                           steps=124, delta=1e-5) <= 1.0
    assert json.loads(table.read_text())["format"] == 1  # replaced by a good one


def test_a_read_only_table_is_never_written(tmp_path) -> None:
    table = tmp_path / "calibration.json"
    with calibration_table(table, writable=False):
        calibrate_noise(**PLAN)
    assert not table.exists()


def test_progress_bound_is_rdp_exactly_and_above_prv() -> None:
    history = [(1.1, 0.02, 300), (0.9, 0.02, 120)]
    bound = rdp_bound(history=history, delta=1e-5)
    assert bound == epsilon_of_history(accountant="rdp", history=history, delta=1e-5)
    assert bound > epsilon_of_history(accountant="prv", history=history, delta=1e-5)
    assert rdp_bound(history=[], delta=1e-5) == 0.0


def test_train_logs_rdp_bounds_between_epochs_and_prv_at_the_end(
        cli, key_env, tmp_path, small_csv, monkeypatch) -> None:
    from .conftest import write_config

    config = write_config(tmp_path / "persona.toml", small_csv,
                          overrides="[train]\nepochs = 3\nbatch_size = 64\n")
    for stage in ("collect", "clean"):
        assert cli("--config", config, stage).code == 0
    trained = cli("--json", "--config", config, "train", "--device", "cpu")
    assert trained.code == 0, trained.stderr
    run = Path(trained.json()["path"])
    privacy = json.loads((run / "privacy.json").read_text())
    curve = json.loads((run / "manifest.json").read_text())["figures"]["epsilon_curve"]
    sigma, q, steps = privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"]
    per_epoch = steps // 3
    target = privacy["target_epsilon"]
    for epoch, value in enumerate(curve[:-1], start=1):
        history = [(sigma, q, epoch * per_epoch)]
        bound = rdp_bound(history=history, delta=privacy["delta"])
        if bound > target:  # a bound past the target is replaced by the accountant's figure
            bound = epsilon_of_history(accountant="prv", history=history, delta=privacy["delta"])
        assert value == round(bound, 6) and value <= target
    assert privacy["accountant"] == "prv" and curve[-1] == round(privacy["epsilon"], 6)
    assert privacy["epsilon"] == epsilon_of_history(accountant="prv",
                                                    history=[(sigma, q, steps)],
                                                    delta=privacy["delta"])
    said = [line for line in trained.stderr.splitlines() if "epoch " in line]
    assert len(said) == 3
    assert "RDP bound" in said[0] and "RDP bound" not in said[-1]

    # The root now remembers the plan's noise: a new process trains it without a search.
    root = run.parents[2]
    assert (root / TABLE_NAME).is_file()
    _new_process()
    calls = count_searches(monkeypatch)
    again = cli("--json", "--config", config, "train", "--device", "cpu", "--force")
    assert again.code == 0, again.stderr
    assert calls == []
    assert json.loads((Path(again.json()["path"]) / "privacy.json").read_text())[
        "noise_multiplier"] == sigma
