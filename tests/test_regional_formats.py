"""Exports written the regional way: dates such as "31/12/2025 14:05" and numbers such as
"1.234,5". Each column may say how its text is written (`formats`, `decimal`,
`thousands`); a column most of whose values do not parse is a loud warning, not a quiet
imputation row after row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from personanet.cleaning.rows import prepare_rows
from personanet.config import parse_config
from personanet.errors import ConfigError
from tests.conftest import sample_lines, write_config

UTC = dt.UTC


def _config(**columns: dict):
    return parse_config({
        "dataset": {"name": "tiny", "target": "income", "privacy_unit": "email"},
        "columns": {"email": {"role": "identifier"},
                    "income": {"role": "target", "categories": ["<=50K", ">50K"]},
                    **columns}})


def test_numbers_with_a_decimal_comma_and_thousands_separators() -> None:
    records = pl.DataFrame({"email": ["a@x", "b@x", "c@x", "d@x"],
                            "gain": ["1.234,5", "39,25", "7", "1,2,3"],
                            "income": ["<=50K"] * 4})
    gain = {"type": "numeric", "bounds": [0, 99999], "impute": "none",
            "decimal": ",", "thousands": "."}
    out = prepare_rows(records, _config(gain=gain), b"k" * 32, require_target=True)
    assert out.frame["gain"].to_list() == [1234.5, 39.25, 7.0, None]
    assert out.counters["gain"].invalid == 1
    plain = prepare_rows(records, _config(gain={**gain, "decimal": ".", "thousands": ""}),
                         b"k" * 32, require_target=True)
    assert plain.frame["gain"].to_list() == [None, None, 7.0, None]


def test_datetimes_in_the_columns_own_formats_are_utc_unless_they_say_otherwise() -> None:
    records = pl.DataFrame({"email": ["a@x", "b@x", "c@x", "d@x"],
                            "seen": ["31/12/2025 14:05", "01/02/2025", "2025-03-04",
                                     "31/12/2025 14:05 +0200"],
                            "income": ["<=50K"] * 4})
    seen = {"type": "datetime", "bounds": ["2000-01-01", "2030-01-01"], "impute": "none",
            "formats": ["%d/%m/%Y %H:%M %z", "%d/%m/%Y %H:%M", "%d/%m/%Y"]}
    out = prepare_rows(records, _config(seen=seen), b"k" * 32, require_target=True)
    assert out.frame["seen"].to_list() == [
        dt.datetime(2025, 12, 31, 14, 5, tzinfo=UTC), dt.datetime(2025, 2, 1, tzinfo=UTC),
        None,  # ISO is not among this column's formats
        dt.datetime(2025, 12, 31, 12, 5, tzinfo=UTC)]


def _export(path: Path, rows: int, rewrite: Callable[[dict[str, str]], None]) -> Path:
    """The sample's first `rows` records, each rewritten in place by `rewrite`, as a CSV."""
    header, *lines = sample_lines(rows).splitlines()
    names = header.split(",")
    out = [header]
    for line in lines:
        row = dict(zip(names, line.split(","), strict=True))
        rewrite(row)
        out.append(",".join(row[n] for n in names))
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.parametrize(("column", "message"), [
    ({"type": "numeric", "bounds": [0, 1], "decimal": ",", "thousands": ","},
     r"decimal and thousands cannot both be ','"),
    ({"categories": ["a"], "decimal": ","}, r"decimal / thousands only apply to numeric"),
    ({"type": "numeric", "bounds": [0, 1], "formats": ["%Y"]},
     r"formats only applies to datetime"),
    ({"type": "datetime", "bounds": ["2000-01-01", "2030-01-01"], "formats": []},
     r"formats is empty"),
    ({"type": "datetime", "bounds": ["2000-01-01", "2030-01-01"], "formats": ["dd/mm/yyyy"]},
     r"'dd/mm/yyyy' is not a strptime format"),
])
def test_formats_that_cannot_be_meant_are_refused(column: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"columns\.x.*" + message):
        _config(x=column)


def test_a_column_that_mostly_does_not_parse_is_a_warning_naming_the_fix(
        cli, key_env, tmp_path: Path) -> None:
    def day_first(row: dict[str, str]) -> None:  # the same instants, written day first
        moment = dt.datetime.fromisoformat(row["collected_at"].replace("Z", "+00:00"))
        row["collected_at"] = moment.strftime("%d/%m/%Y %H:%M:%S")

    source = _export(tmp_path / "export.csv", 40, day_first)
    config = write_config(tmp_path / "c.toml", source)
    assert cli("--config", config, "collect").code == 0
    result = cli("--config", config, "clean")
    assert result.code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "columns.collected_at: 40 of the 40 kept rows hold a value that did not parse " \
           "as a datetime" in text
    assert "columns.collected_at.formats" in text
    assert "/2025" not in result.stderr  # counts only, never a value

    fixed = write_config(tmp_path / "fixed.toml", source, overrides=(
        "[columns.collected_at]\ntype = \"datetime\"\nformats = [\"%d/%m/%Y %H:%M:%S\"]\n"))
    result = cli("--json", "--config", fixed, "clean")
    assert result.code == 0, result.stderr
    assert "did not parse" not in result.stderr
    assert result.json()["columns"]["collected_at"]["invalid"] == 0


def test_an_export_spelling_its_categories_its_own_way_is_a_warning(
        cli, key_env, tmp_path: Path) -> None:
    """UCI's adult.test labels (">50K.") quarantine every row, and "M"/"F" for sex would
    make the column "__other__" throughout: both are said, with the key that fixes them."""
    first = True

    def adult_test(row: dict[str, str]) -> None:
        nonlocal first
        row["sex"] = row["sex"][0]  # "Male" -> "M"
        row["income"] += "" if first else "."  # the first row keeps its label: one kept
        first = False

    source = _export(tmp_path / "adult_test.csv", 30, adult_test)
    config = write_config(tmp_path / "c.toml", source)
    assert cli("--config", config, "collect").code == 0
    result = cli("--config", config, "clean")
    assert result.code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "columns.income: 29 of the 30 rows were quarantined for this column" in text
    assert "columns.income.aliases" in text
    assert "columns.sex: 1 of the 1 kept rows hold a value outside its categories" in text

    fixed = write_config(tmp_path / "fixed.toml", source, overrides=(
        "[columns.income]\naliases = { \">50K.\" = \">50K\", \"<=50K.\" = \"<=50K\" }\n"
        "[columns.sex]\naliases = { \"M\" = \"Male\", \"F\" = \"Female\" }\n"))
    result = cli("--json", "--config", fixed, "clean")
    assert result.code == 0, result.stderr
    assert "columns." not in result.stderr
    assert result.json()["rows_quarantined"] == 0
