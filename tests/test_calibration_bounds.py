"""Pathological privacy parameters fail fast: bounded noise calibration, checked ranges.

`train.epsilon = 1000` used to run 10+ minutes at 100 % CPU and 2 GB inside Opacus' PRV
calibration (ever smaller noise, ever larger PRV grids), so the RDP fallback never
triggered. Now PRV is only evaluated on grids of bounded size (RDP calibrates and
accounts beyond), epsilon above 100 needs `train.allow_large_epsilon = true`, and a
delta of at least 1/rows is refused at train time (exit 78). The time bounds asserted
here are hang guards with a wide margin (CI is noisy), not speed tests.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from personanet.config import load_config
from personanet.errors import ConfigError
from personanet.privacy.accounting import (
    PRV_MAX_POINTS,
    AccountantError,
    calibrate_noise,
    compute_epsilon,
    prv_grid_points,
)

from .conftest import write_config

HANG_GUARD_SECONDS = 60


def _ready(cli, config: Path) -> None:
    for stage in ("collect", "clean"):
        result = cli("--config", config, stage)
        assert result.code == 0, result.stderr


def test_epsilon_1000_trains_within_the_hang_guard(cli, key_env, tmp_path: Path,
                                                    small_csv: Path) -> None:
    config = write_config(tmp_path / "persona.toml", small_csv, overrides=(
        "[train]\nepochs = 1\nbatch_size = 64\nepsilon = 1000.0\nallow_large_epsilon = true\n"
        "[budget]\nepsilon = 5000.0\n"))
    _ready(cli, config)
    started = time.perf_counter()
    trained = cli("--json", "--config", config, "train", "--device", "cpu")
    seconds = time.perf_counter() - started
    assert seconds < HANG_GUARD_SECONDS, f"train at epsilon 1000 took {seconds:.0f} s"
    assert trained.code == 0, trained.stderr
    privacy = json.loads((Path(trained.json()["path"]) / "privacy.json").read_text())
    # PRV cannot evaluate noise this small in bounded time: RDP calibrated and accounted.
    assert privacy["accountant"] == "rdp"
    assert privacy["epsilon"] <= 1000.0 + 1e-9
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(
        accountant="rdp", noise_multiplier=privacy["noise_multiplier"],
        sample_rate=privacy["sample_rate"], steps=privacy["steps"], delta=privacy["delta"]))
    assert "calibrated with RDP" in trained.stderr


def test_prv_refuses_a_grid_it_cannot_evaluate_in_bounded_time() -> None:
    # sigma 0.05 at q = 0.08 over 124 steps: a PRV grid of ~1.7e8 points (hours, GBs).
    cell = dict(noise_multiplier=0.05, sample_rate=0.08, steps=124, delta=1e-5)
    assert prv_grid_points(((0.05, 0.08, 124),), 1e-5) > PRV_MAX_POINTS
    started = time.perf_counter()
    with pytest.raises(AccountantError, match="points"):
        compute_epsilon(accountant="prv", **cell)
    assert time.perf_counter() - started < HANG_GUARD_SECONDS
    assert compute_epsilon(accountant="rdp", **cell) > 1000  # the fallback still answers


@pytest.mark.parametrize("target", [1.0, 1000.0])
def test_calibration_reaches_the_target_from_below_in_bounded_time(target: float) -> None:
    started = time.perf_counter()
    sigma, accountant = calibrate_noise(accountant="prv", target_epsilon=target, delta=1e-5,
                                        sample_rate=0.08, steps=124)
    assert time.perf_counter() - started < HANG_GUARD_SECONDS
    assert accountant == ("prv" if target == 1.0 else "rdp")
    reached = compute_epsilon(accountant=accountant, noise_multiplier=sigma, sample_rate=0.08,
                              steps=124, delta=1e-5)
    assert target * 0.99 <= reached <= target


def test_epsilon_above_100_needs_the_allow_key(cli, key_env, tmp_path: Path,
                                               small_csv: Path) -> None:
    path = write_config(tmp_path / "persona.toml", small_csv,
                        overrides="[train]\nepsilon = 150.0\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.exit_code == 78
    assert "train.epsilon = 150" in str(refused.value)
    assert "train.allow_large_epsilon = true" in str(refused.value)
    shown = cli("--config", path, "budget", "show")
    assert shown.code == 78 and "allow_large_epsilon" in shown.stderr

    allowed = write_config(tmp_path / "allowed.toml", small_csv, overrides=(
        "[train]\nepsilon = 150.0\nallow_large_epsilon = true\n"))
    assert load_config(allowed).train.epsilon == 150.0
    at_limit = write_config(tmp_path / "limit.toml", small_csv,
                            overrides="[train]\nepsilon = 100.0\n")
    assert load_config(at_limit).train.epsilon == 100.0


def test_delta_of_at_least_one_over_rows_is_refused_at_train_time(cli, key_env, tmp_path: Path,
                                                                  small_csv: Path) -> None:
    config = write_config(tmp_path / "persona.toml", small_csv, overrides=(
        "[train]\nepochs = 1\nbatch_size = 64\ndelta = 0.01\n[budget]\ndelta = 0.5\n"))
    _ready(cli, config)
    refused = cli("--config", config, "train", "--device", "cpu")
    assert refused.code == 78, refused.stderr
    (message,) = [line for line in refused.stderr.splitlines() if "error:" in line]
    found = re.search(r"train\.delta = 0\.01 is not below 1/rows = \S+ for the (\d+) training "
                      r"rows", message)
    assert found, message
    rows = int(found.group(1))
    assert 100 <= rows <= 300  # the 300 train-split people of small_csv, after cleaning
    assert not (tmp_path / "artifacts" / "persona" / "budget.json").exists(), "nothing spent"

    # Just below 1/rows is allowed (a weak delta, but the rule is the rule).
    below = write_config(tmp_path / "below.toml", small_csv, overrides=(
        f"[train]\nepochs = 1\nbatch_size = 64\ndelta = {0.9 / rows!r}\n[budget]\ndelta = 0.5\n"))
    trained = cli("--config", below, "train", "--device", "cpu")
    assert trained.code == 0, trained.stderr
