"""Reading a database table in streamed batches: ADBC against connectorx, side by side.

Usage: python benchmarks/bench_database.py [--rows N] [--batch-size B] [--repeats R]

Builds a synthetic table of N rows (default 1,000,000: the bundled sample's census
columns repeated, plus a name, an email and an `updated_at`) in a SQLite file, and in
PostgreSQL when PERSONANET_TEST_PG_URI names a server (`scripts/pg-scratch run python
benchmarks/bench_database.py` starts a throwaway one). Each reader then runs in a fresh
child process, R times alternating, and reads `SELECT * FROM persons` as Arrow record
batches of B rows without holding the whole result:

* adbc: the ADBC driver's cursor (`fetch_record_batch`), what `personanet collect` uses;
* connectorx: `read_sql(..., return_type="arrow_stream", batch_size=B)`.

Printed per database and reader: the median rows per second, peak RSS (VmHWM of the
child), and the ratio adbc / connectorx. The synthetic rows are in a temporary folder
(or a scratch table) removed at the end and hold no real person.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clean import peak_rss_mib  # noqa: E402

SAMPLE = ROOT / "data" / "persona.csv.gz"
TABLE = "persons"


def synthetic(rows: int):  # -> pyarrow.Table
    import polars as pl

    sample = pl.read_csv(SAMPLE, infer_schema=False)
    frame = sample[[i % sample.height for i in range(rows)]].with_row_index("id")
    frame = frame.with_columns(
        pl.col("id").cast(pl.Int64),
        (pl.col("email").str.replace("@", pl.col("id").cast(pl.String) + "@")).alias("email"),
        pl.col("age").cast(pl.Int64, strict=False),
        pl.col("hours_per_week").cast(pl.Int64, strict=False),
        pl.col("collected_at").alias("updated_at"),
    ).drop("collected_at")
    return frame.to_arrow()


def load(uri: str, table) -> None:
    """Create (replace) the table through ADBC's bulk ingest."""
    with connect(uri) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cur.adbc_ingest(TABLE, table, mode="create")
        conn.commit()


def connect(uri: str):
    if uri.startswith("postgresql://"):
        import adbc_driver_postgresql.dbapi as driver
    else:
        import adbc_driver_sqlite.dbapi as driver
    return driver.connect(uri.removeprefix("sqlite://"))


def child(reader: str, uri: str, batch_size: int) -> dict[str, float]:
    start = time.perf_counter()
    rows = batches = 0
    if reader == "adbc":
        with connect(uri) as conn, conn.cursor() as cur:
            if not uri.startswith("postgresql://"):
                cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows":
                                                  str(batch_size)})
            cur.execute(f"SELECT * FROM {TABLE}")
            for batch in cur.fetch_record_batch():
                rows += batch.num_rows
                batches += 1
    else:
        import connectorx as cx

        stream = cx.read_sql(uri, f"SELECT * FROM {TABLE}", return_type="arrow_stream",
                             batch_size=batch_size)
        for batch in stream:
            rows += batch.num_rows
            batches += 1
    seconds = time.perf_counter() - start
    return {"rows": rows, "batches": batches, "seconds": seconds, "rss_mib": peak_rss_mib()}


def run_child(reader: str, uri: str, batch_size: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", reader, "--uri-env", "BENCH_URI",
                          "--batch-size", str(batch_size)], capture_output=True, text=True,
                         env={**os.environ, "BENCH_URI": uri}, check=True)
    return json.loads(out.stdout)


def compare(label: str, uri: str, rows: int, batch_size: int, repeats: int) -> None:
    runs: dict[str, list[dict[str, float]]] = {"adbc": [], "connectorx": []}
    for _ in range(repeats):
        for reader in runs:
            result = run_child(reader, uri, batch_size)
            assert result["rows"] == rows, result
            runs[reader].append(result)
    speed = {r: statistics.median(x["rows"] / x["seconds"] for x in v) for r, v in runs.items()}
    rss = {r: max(x["rss_mib"] for x in v) for r, v in runs.items()}
    for reader in runs:
        print(f"{label:10} {reader:10} {speed[reader]:>12,.0f} rows/s  peak RSS "
              f"{rss[reader]:6.0f} MiB  ({runs[reader][0]['batches']:.0f} batches)")
    print(f"{label:10} adbc / connectorx: speed {speed['adbc'] / speed['connectorx']:.2f}x, "
          f"peak RSS {rss['adbc'] / rss['connectorx']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["adbc", "connectorx"])
    parser.add_argument("--uri-env")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, os.environ[args.uri_env], args.batch_size)))
        return 0
    table = synthetic(args.rows)
    print(f"{args.rows:,} rows x {table.num_columns} columns, batches of {args.batch_size:,}, "
          f"median of {args.repeats} runs per reader, each in a fresh process")
    with tempfile.TemporaryDirectory(prefix="bench-db-") as tmp:
        uri = f"sqlite://{Path(tmp) / 'persons.db'}"
        load(uri, table)
        compare("sqlite", uri, args.rows, args.batch_size, args.repeats)
    pg = os.environ.get("PERSONANET_TEST_PG_URI")
    if pg:
        load(pg, table)
        try:
            compare("postgresql", pg, args.rows, args.batch_size, args.repeats)
        finally:
            with connect(pg) as conn, conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
                conn.commit()
    else:
        print("postgresql: skipped (no PERSONANET_TEST_PG_URI; run under scripts/pg-scratch run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
