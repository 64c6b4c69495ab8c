"""Cheap DP fixed costs: a calibration is remembered exactly, for the process."""

from __future__ import annotations

import logging

import pytest

from personanet.privacy.accounting import calibrate_noise, compute_epsilon

from .calibration_helpers import count_searches, fresh_calibration_caches  # noqa: F401

PLAN = dict(accountant="prv", target_epsilon=1.0, delta=1e-5, sample_rate=0.08, steps=124)


def test_the_same_plan_gets_the_same_noise_without_a_second_search(monkeypatch) -> None:
    calls = count_searches(monkeypatch)
    first = calibrate_noise(**PLAN)
    assert calibrate_noise(**PLAN) == first
    assert len(calls) == 1
    # Any other number of the plan is another search, and its answer is its own.
    other = calibrate_noise(**{**PLAN, "steps": 125})
    assert len(calls) == 2 and other[0] > first[0]
    assert compute_epsilon(accountant=first[1], noise_multiplier=first[0], sample_rate=0.08,
                           steps=124, delta=1e-5) <= 1.0


def test_a_remembered_calibration_says_what_the_search_said(monkeypatch, caplog) -> None:
    plan = {**PLAN, "target_epsilon": 1000.0}  # calibrated with RDP, and it says so
    calls = count_searches(monkeypatch)
    with caplog.at_level(logging.INFO, logger="personanet"):
        calibrate_noise(**plan)
        said = [r.getMessage() for r in caplog.records]
        caplog.clear()
        assert calibrate_noise(**plan)[1] == "rdp"
    assert len(calls) == 1
    assert any("calibrated with RDP" in m for m in said)
    assert [r.getMessage() for r in caplog.records] == said


def test_a_failed_calibration_is_not_remembered(monkeypatch) -> None:
    calls = count_searches(monkeypatch)
    plan = {**PLAN, "target_epsilon": 1e-9}
    for _ in range(2):
        with pytest.raises(ValueError, match="too low"):
            calibrate_noise(**plan)
    assert len(calls) == 2


def test_two_private_runs_of_one_plan_get_one_noise(cli, key_env, tmp_path, small_csv,
                                                    monkeypatch) -> None:
    import json
    from pathlib import Path

    from .conftest import write_config

    config = write_config(tmp_path / "persona.toml", small_csv,
                          overrides="[train]\nepochs = 1\nbatch_size = 64\n")
    for stage in ("collect", "clean"):
        assert cli("--config", config, stage).code == 0
    calls = count_searches(monkeypatch)
    noises = []
    for _ in range(2):
        trained = cli("--json", "--config", config, "train", "--device", "cpu", "--force")
        assert trained.code == 0, trained.stderr
        privacy = Path(trained.json()["path"]) / "privacy.json"  # cwd is tmp_path
        noises.append(json.loads(privacy.read_text())["noise_multiplier"])
    assert len(calls) == 1 and noises[0] == noises[1]
