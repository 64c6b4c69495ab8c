"""Columns the config does not name are not stored, and collect says so: once in the
log and in --json (`columns_dropped`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .conftest import sample_lines, write_config


def test_columns_the_config_does_not_name_are_logged_once_and_in_json(
        cli, key_env, tmp_path: Path) -> None:
    frame = pl.read_csv(sample_lines(60).encode(), infer_schema=False)
    frame = frame.with_columns(pl.col("email").alias("work_email"),
                               pl.lit("blue").alias("favourite_colour"))
    source = tmp_path / "export.csv"
    frame.write_csv(source)
    config = write_config(tmp_path / "persona.toml", source)
    result = cli("--json", "--config", config, "collect")
    assert result.code == 0, result.stderr
    assert result.json()["columns_dropped"] == ["work_email", "favourite_colour"]
    notes = [line for line in result.stderr.splitlines() if "not in the config" in line]
    assert len(notes) == 1
    assert "work_email" in notes[0] and "favourite_colour" in notes[0]
    # The names of the columns, never their values, reach the log.
    assert frame["email"][0] not in result.stderr
