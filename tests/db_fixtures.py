"""Databases for the tests: a scratch PostgreSQL server, tables of real sample rows, configs.

PostgreSQL: `make test` (and `.ci/run`) start a throwaway cluster with scripts/pg-scratch
and export PERSONANET_TEST_PG_URI; a test run without it (`pytest tests/test_database.py`)
starts its own once per process and stops it at exit. When PostgreSQL cannot start, the
PostgreSQL tests fail with the script's message: they never skip.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from tests.conftest import CONFIG, ROOT, _dump_toml

PG_ENV = "PERSONANET_TEST_PG_URI"


@functools.cache
def scratch_pg_uri() -> str:
    """The scratch server's URI (user:password inside: a test secret, never printed)."""
    if os.environ.get(PG_ENV):
        return os.environ[PG_ENV]
    folder = tempfile.mkdtemp(prefix="pg-scratch-")
    script = ROOT / "scripts" / "pg-scratch"
    started = subprocess.run([str(script), "start", folder], capture_output=True, text=True,
                             check=False, timeout=120)
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL tests need a server and none could start: "
                    f"{started.stderr.strip()[-500:]}", pytrace=False)

    def stop() -> None:
        subprocess.run([str(script), "stop", folder], capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)

    atexit.register(stop)
    return started.stdout.strip().splitlines()[-1]


def pg_connect(uri: str):  # -> adbc connection
    import adbc_driver_postgresql.dbapi as driver

    return driver.connect(uri)


def sample_frame(csv: Path, *, first_id: int = 1, day: str = "2026-11-01"):
    """The CSV's records as text columns, plus an integer `id` and an `updated_at`."""
    import polars as pl

    frame = pl.read_csv(csv, infer_schema=False)
    return frame.with_columns(
        pl.int_range(first_id, first_id + frame.height, dtype=pl.Int64).alias("id"),
        pl.lit(f"{day}T00:00:00").alias("updated_at"),
    ).with_columns(
        # each row a moment of its day, so the watermark is strictly increasing
        (pl.lit(day + "T") + (pl.col("id") % 86400).cast(pl.String).str.zfill(5)
         ).alias("updated_at"))


def write_sqlite(path: Path, frame, table: str = "people") -> None:
    """Append `frame` to `table` in a SQLite file (created with TEXT columns, id INTEGER)."""
    columns = frame.columns
    with sqlite3.connect(path) as conn:
        spec = ", ".join(f'"{c}" {"INTEGER" if c == "id" else "TEXT"}' for c in columns)
        conn.execute(f'CREATE TABLE IF NOT EXISTS {table} ({spec})')
        marks = ", ".join("?" for _ in columns)
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", frame.rows())
    conn.close()


def write_pg(uri: str, frame, table: str) -> None:
    """Append `frame` to a PostgreSQL table (created on first use), through ADBC ingest."""
    with pg_connect(uri) as conn, conn.cursor() as cur:
        cur.adbc_ingest(table, frame.to_arrow(), mode="create_append")
        conn.commit()


def database_config(path: Path, database: dict[str, object], *, overrides: str = "") -> Path:
    """configs/persona.toml reading [dataset.database] instead of files: small, fast, no
    gates (a few hundred rows cannot pass the sample's accuracy gate), no predict."""
    base = tomllib.loads(CONFIG.read_text())
    base["dataset"].pop("source", None)
    base.pop("predict", None)
    base["evaluate"] = {"bootstrap": 0, "audit": False}
    base["clean"].pop("split_column")  # the split by a hash of the person: both days mixed
    base["train"].update({"epochs": 1, "batch_size": 64})
    base["columns"]["id"] = {"role": "ignore", "required": False}
    base["columns"]["updated_at"] = {"role": "ignore", "required": False}
    for section, values in (tomllib.loads(overrides) if overrides else {}).items():
        base.setdefault(section, {}).update(values)
    text = _dump_toml(base)
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in database.items())
    path.write_text(text + f"\n[dataset.database]\n{table}\n")
    return path
