"""What the cnn says of the feature columns it does not read: a plain notice for the
sensitive ones (evaluate's groups), a warning for any other (likely a mistake)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from personanet.config import load_config
from personanet.models import image_encoding
from personanet.models.image_encoding import ImageEncoder

FORMS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "forms.toml"


def _messages(caplog: pytest.LogCaptureFixture, overrides: list[str]) -> list[tuple[int, str]]:
    image_encoding._warn_unused.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="personanet"):
        ImageEncoder.from_config(load_config(FORMS_CONFIG, overrides))
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_sensitive_columns_beside_an_image_are_a_notice_not_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    said = _messages(caplog, [])
    assert [level for level, _ in said] == [logging.INFO]
    assert "age, gender" in said[0][1] and "per group" in said[0][1]


def test_another_unread_feature_is_a_warning_naming_it(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    said = _messages(caplog, ["columns.gender.sensitive=false"])
    warnings = [message for level, message in said if level == logging.WARNING]
    assert len(warnings) == 1 and "(s) gender are" in warnings[0]
    assert 'role = "ignore"' in warnings[0]
