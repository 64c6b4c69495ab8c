"""Helpers of the calibration tests: fresh in-process caches, and a count of searches."""

from __future__ import annotations

import pytest

from personanet.privacy import accounting


@pytest.fixture(autouse=True)
def fresh_calibration_caches():
    """Each test starts and ends without remembered calibrations or epsilons."""
    accounting._CALIBRATIONS.clear()
    accounting._epsilon.cache_clear()
    yield
    accounting._CALIBRATIONS.clear()


def count_searches(monkeypatch) -> list[dict]:
    """The arguments of every noise search run from now on (the real search still runs)."""
    calls: list[dict] = []
    real = accounting._calibrate

    def counted(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(accounting, "_calibrate", counted)
    return calls
