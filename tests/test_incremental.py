"""Incremental collection for cron: a dataset that grows day by day, collected as a chain.

The scenario of issue 15: day 1 collect + run; day 2 new rows arrive; `collect
--incremental` then `run` trains on both days, reuses nothing stale, and charges the
budget once for the new training run. The same for files (a new export each day).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import sqlite3
from pathlib import Path

import polars as pl
import pytest

from personanet.stages.files import WATERMARK
from personanet.store.artifacts import ArtifactStore
from tests.conftest import all_bytes_under, sample_lines, write_config
from tests.db_fixtures import database_config, sample_frame, scratch_pg_uri, write_pg, write_sqlite


def _lines(result) -> dict[str, dict]:
    """Each stage's --json result by stage name (`run` prints them under "stages")."""
    assert result.code == 0, result.stderr
    out = result.json()
    return {o["stage"]: o for o in out.get("stages", [out])}


def _ledger_entries(root: Path) -> list[dict]:
    path = root / "persona" / "budget.json"
    return json.loads(path.read_text())["entries"] if path.is_file() else []


def _days(small_csv: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Day 1: 300 people. Day 2: 100 new people and 20 of day 1's again (changed later)."""
    rows = sample_frame(small_csv)
    day1 = rows[:300]
    again = rows[:20].with_columns(pl.col("collected_at").str.replace("^20..", "2026"))
    day2 = pl.concat([rows[300:], again]).drop("id", "updated_at")
    day2 = day2.with_columns(pl.int_range(301, 301 + day2.height, dtype=pl.Int64).alias("id"),
                             (pl.lit("2026-11-02T") + pl.int_range(0, day2.height)
                              .cast(pl.String).str.zfill(5)).alias("updated_at"))
    return day1, day2.select(day1.columns)


def test_cron_day_two_trains_on_both_days_and_charges_once(cli, key_env, tmp_path: Path,
                                                           small_csv: Path) -> None:
    db, root = tmp_path / "people.db", tmp_path / "a"
    day1, day2 = _days(small_csv)
    write_sqlite(db, day1)
    config = database_config(tmp_path / "db.toml", {
        "sqlite": "people.db", "table": "people", "watermark": "updated_at"})

    def command(*args: str):
        return cli("--json", "--config", config, "--artifacts", root, *args)

    # Day 1
    first = _lines(command("collect", "--incremental"))["collect"]
    assert first["rows"] == 300 and first["parent"] is None
    run1 = _lines(command("run"))
    assert run1["collect"]["reused"] is True and run1["clean"]["rows_in"] == 300
    assert len(_ledger_entries(root)) == 1

    # Day 2: new rows arrive; cron collects what is new, then runs
    write_sqlite(db, day2)
    increment = _lines(command("collect", "--incremental"))["collect"]
    assert increment["reused"] is False and increment["rows"] == day2.height
    assert increment["parent"] == first["version"]
    run2 = _lines(command("run"))
    assert run2["collect"]["reused"] is True
    assert run2["collect"]["version"] == increment["version"]
    clean2 = run2["clean"]
    assert clean2["reused"] is False and clean2["version"] != run1["clean"]["version"]
    assert clean2["rows_in"] == 300 + day2.height
    assert clean2["duplicates_by_key"] == 20  # day 1's people again: deduped across the chain
    assert run2["train"]["reused"] is False
    assert run2["train"]["version"] != run1["train"]["version"]
    assert len(_ledger_entries(root)) == 2  # one charge for the one new training run

    store = ArtifactStore(root, "persona")
    clean_inputs = [i["version"] for i in store.get("clean", clean2["version"]).manifest["inputs"]]
    assert clean_inputs == [first["version"], increment["version"]]

    # Later the same day: nothing new, nothing recomputed, nothing charged
    run3 = _lines(command("run"))
    assert all(result["reused"] for result in run3.values())
    assert len(_ledger_entries(root)) == 2

    # The watermark is a value of a record: encrypted, never in a manifest
    assert WATERMARK in {o["name"] for o in store.get("collect").manifest["outputs"]}
    assert day2["updated_at"].max().encode() not in all_bytes_under(root)


def test_nothing_new_reuses_the_head(cli, key_env, tmp_path: Path, small_csv: Path) -> None:
    write_sqlite(tmp_path / "people.db", sample_frame(small_csv))
    config = database_config(tmp_path / "db.toml", {
        "sqlite": "people.db", "table": "people", "watermark": "id"})
    args = ("--json", "--config", config, "--artifacts", tmp_path / "a", "collect",
            "--incremental")
    first = cli(*args).json()
    again = cli(*args).json()
    assert again["reused"] is True and again["version"] == first["version"]


def test_rows_arriving_later_at_the_watermark_value_are_collected_once(
        cli, key_env, tmp_path: Path, small_csv: Path) -> None:
    """A watermark with ties (one second of updated_at, a transaction committed late):
    rows that arrive after a collection with the very value it reached are collected by
    the next one, and rows already held at that value are not collected twice."""
    db, root = tmp_path / "people.db", tmp_path / "a"
    day1, day2 = _days(small_csv)
    top = day1["updated_at"].max()
    ties = pl.int_range(pl.len()) >= day1.height - 5  # day 1 ends with 5 rows at `top`
    day1 = day1.with_columns(pl.when(ties).then(pl.lit(top)).otherwise(pl.col("updated_at"))
                             .alias("updated_at"))
    write_sqlite(db, day1)
    config = database_config(tmp_path / "db.toml", {
        "sqlite": "people.db", "table": "people", "watermark": "updated_at"})
    args = ("--json", "--config", config, "--artifacts", root, "collect", "--incremental")
    first = cli(*args).json()
    assert first["rows"] == 300

    # Later: two rows with day 1's last value, one past it
    late = day2.head(3).with_columns(pl.Series("updated_at", [top, top, "2099-01-01T00000"]))
    write_sqlite(db, late)
    second = cli(*args).json()
    assert second["reused"] is False and second["rows"] == 3  # not 1 (missed), not 8 (twice)
    third = cli(*args).json()
    assert third["reused"] is True and third["version"] == second["version"]

    # One more at the new top value; the one held there is not read twice
    write_sqlite(db, day2.slice(3, 1).with_columns(pl.lit("2099-01-01T00000").alias("updated_at")))
    fourth = cli(*args).json()
    assert fourth["rows"] == 1
    cleaned = _lines(cli("--json", "--config", config, "--artifacts", root, "clean"))["clean"]
    assert cleaned["rows_in"] == 304 and cleaned["duplicates_exact"] == 0


def test_full_reads_everything_again(cli, key_env, tmp_path: Path, small_csv: Path) -> None:
    db = tmp_path / "people.db"
    day1, day2 = _days(small_csv)
    write_sqlite(db, day1)
    config = database_config(tmp_path / "db.toml", {
        "sqlite": "people.db", "table": "people", "watermark": "id"})
    base = ("--json", "--config", config, "--artifacts", tmp_path / "a", "collect")
    cli(*base, "--incremental")
    write_sqlite(db, day2)
    full = cli(*base, "--full").json()
    assert full["rows"] == 300 + day2.height and full["parent"] is None


def test_new_export_files_are_collected_as_an_increment(cli, key_env, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    lines = sample_lines(200).splitlines(keepends=True)
    (exports / "day1.csv").write_text("".join(lines[:121]))
    config = write_config(tmp_path / "c.toml", exports / "*.csv")
    root = tmp_path / "a"

    def command(*args: str):
        return cli("--json", "--config", config, "--artifacts", root, *args)

    first = command("collect", "--incremental").json()
    assert first.get("rows") == 120, first
    # day 2: a new export, which repeats 10 of day 1's records exactly
    (exports / "day2.csv").write_text(lines[0] + "".join(lines[121:]) + "".join(lines[1:11]))
    increment = command("collect", "--incremental").json()
    assert increment["rows"] == 90 and increment["parent"] == first["version"]
    assert [s["path"] for s in increment["sources"]] == [str((exports / "day2.csv").resolve())]
    assert command("collect").json()["version"] == increment["version"]  # continues the chain
    # gc keeps what the newest collection is built on: its parent
    assert cli("--config", config, "--artifacts", root, "artifacts", "gc", "--keep", "1",
               "--yes").code == 0
    clean = command("clean").json()  # the config's chain: both days, deduped across them
    assert clean["rows_in"] == 210 and clean["duplicates_exact"] == 10
    # day 1's export is archived: the chain keeps its rows and stays the config's chain
    (exports / "day1.csv").rename(tmp_path / "day1.csv")
    assert command("collect", "--incremental").json()["reused"] is True
    assert command("clean").json()["version"] == clean["version"]


def test_postgresql_timestamp_watermark(cli, key_env, tmp_path: Path, small_csv: Path,
                                        monkeypatch) -> None:
    uri = scratch_pg_uri()
    table = f"people_{secrets.token_hex(4)}"
    day1, day2 = _days(small_csv)

    def stamped(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.with_columns(pl.col("updated_at").str.to_datetime(
            "%Y-%m-%dT%H:%M:%S", strict=False).fill_null(dt.datetime(2026, 11, 2))
            .dt.replace_time_zone("UTC")
            + pl.duration(seconds=pl.col("id")))

    write_pg(uri, stamped(day1), table)
    monkeypatch.setenv("PERSONA_DB", uri)
    config = database_config(tmp_path / "db.toml", {
        "uri_env": "PERSONA_DB", "table": table, "watermark": "updated_at"})
    args = ("--json", "--config", config, "--artifacts", tmp_path / "a", "collect",
            "--incremental")
    assert cli(*args).json()["rows"] == 300
    write_pg(uri, stamped(day2), table)
    increment = cli(*args).json()
    assert increment["rows"] == day2.height and increment["parent"] is not None
    assert cli(*args).json()["reused"] is True


@pytest.fixture(autouse=True)
def _no_stray_db(tmp_path: Path):
    yield
    for path in tmp_path.glob("*.db"):
        sqlite3.connect(path).close()
