"""Throughput and memory of `collect` + `clean` against polars reading a CSV and writing Parquet.

Usage: python benchmarks/bench_clean.py [--rows N] [--repeat R] [--dir DIR] [--seed S]

Generates a synthetic persona CSV of N rows (default 1,000,000) with the columns of
data/persona.csv.gz: census values resampled from the bundled sample, fresh synthetic
names, unique emails and collection times, and injected defects (exact and by-email
duplicates, blanks, outliers, garbage numbers and dates, unknown categories, missing
labels). Then, R times, interleaved, each in a fresh child process:

* bare: ``pl.read_csv(csv)`` (type inference on) and ``write_parquet`` to a file;
* personanet: ``collect`` (read as text, encrypt to Parquet) then ``clean`` (decrypt,
  every rule of configs/persona.toml, pseudonymize, split, encrypt three tables),
  into a fresh artifact store with a fresh key.

Each personanet run follows its bare run immediately, and the figure to quote is
the median of these per-pair ratios (target: at most 3x): on a shared machine
whose speed drifts, a pair sees the same conditions, while best-of-each may
compare a fast minute with a slow one. Best times are printed too. Peak memory is
each child's peak RSS (``ru_maxrss``, interpreter and libraries included). The synthetic CSV and
the bare Parquet are plaintext on disk, in a temporary folder removed at the end;
they hold no real person (personanet itself never writes plaintext).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "persona.csv.gz"
CONFIG = ROOT / "configs" / "persona.toml"
TARGET_RATIO = 3.0

GIVEN = ["Ana", "José", "Zoë", "Łukasz", "Siobhán", "Anne-Marie", "David", "Mohammed", "Chen",
         "Fatima", "Olga", "Kwame", "Ingrid", "Tomás", "Aiko", "Lars", "Priya", "Émile", "Nikolai",
         "Grace", "Mei", "Björn", "Oluwaseun", "Dmitri", "Camille", "Hiroshi", "Amara", "Sean"]
FAMILY = ["Silva", "Nguyễn", "Müller", "O'Brien", "Smith-Jones", "Ivanov", "Park", "Wei", "Khan",
          "Petrova", "Mensah", "Berg", "García", "Tanaka", "Eriksson", "Sharma", "Dubois",
          "Volkov", "Kowalski", "Okafor", "Rossi", "Novák", "Jensen", "Haddad", "Moreau", "Kim"]


def peak_rss_mib() -> float:
    """This process's peak resident memory.

    Linux's ru_maxrss carries the parent's peak over fork and exec, so a child started
    by a parent that built a big frame would report the parent's figure; VmHWM belongs
    to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def generate(path: Path, rows: int, seed: int) -> dict[str, int]:
    """Write the synthetic CSV; returns how many of each defect were injected."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    census = pl.read_csv(SAMPLE, infer_schema=False).drop("name", "email", "collected_at")
    base = rows - rows // 50 - rows // 100  # room for 2% exact and 1% by-email duplicates
    frame = census[rng.integers(0, census.height, base)]
    given = np.array(GIVEN)[rng.integers(0, len(GIVEN), base)]
    family = np.array(FAMILY)[rng.integers(0, len(FAMILY), base)]
    ids = rng.permutation(base) + 1_000_000
    domains = np.array(["example.com", "example.org", "example.net"])[rng.integers(0, 3, base)]
    seconds = rng.integers(0, 2 * 365 * 86_400, base) + 1_704_067_200  # from 2024-01-01
    frame = frame.with_columns(
        pl.Series("name", np.char.add(np.char.add(given, " "), family)),
        pl.Series("_g", given), pl.Series("_f", family), pl.Series("_id", ids),
        pl.Series("_d", domains),
        pl.from_epoch(pl.Series("collected_at", seconds), time_unit="s")
        .dt.replace_time_zone("UTC").dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
    ).with_columns(
        pl.concat_str(
            pl.col("_g").str.to_lowercase().str.replace_all("[^a-z]", ""), pl.lit("."),
            pl.col("_f").str.to_lowercase().str.replace_all("[^a-z]", ""), pl.lit("."),
            pl.col("_id").cast(pl.String), pl.lit("@"), pl.col("_d"),
        ).alias("email")
    ).drop("_g", "_f", "_id", "_d")
    frame = frame.select(pl.read_csv(SAMPLE, n_rows=0).columns)

    injected: dict[str, int] = {}

    def corrupt(frame: pl.DataFrame, column: str, share: float, values: list[str],
                label: str) -> pl.DataFrame:
        hit = rng.random(frame.height) < share
        injected[label] = injected.get(label, 0) + int(hit.sum())
        choice = np.array(values)[rng.integers(0, len(values), frame.height)]
        return frame.with_columns(
            pl.when(pl.Series(hit)).then(pl.Series(choice)).otherwise(pl.col(column)).alias(column)
        )

    for column in ("age", "workclass", "occupation", "hours_per_week", "native_country"):
        frame = corrupt(frame, column, 0.03, [""], "blank values")
    frame = corrupt(frame, "age", 0.005, ["150", "-3", "999"], "outliers")
    frame = corrupt(frame, "hours_per_week", 0.005, ["500", "0"], "outliers")
    frame = corrupt(frame, "capital_gain", 0.002, ["10000000"], "outliers")
    frame = corrupt(frame, "age", 0.003, ["n/a", "abc", "NaN"], "garbage numbers")
    frame = corrupt(frame, "collected_at", 0.002, ["31/02/2025", "yesterday"], "bad dates")
    frame = corrupt(frame, "workclass", 0.002, ["Space-Pirate", "?"], "unknown categories")
    frame = corrupt(frame, "income", 0.001, [""], "missing labels")
    frame = corrupt(frame, "split", 0.0005, ["holdout"], "unknown split values")

    # Same person again, later, with a changed age: a duplicate by email.
    again = frame[rng.integers(0, frame.height, rows // 100)].with_columns(
        pl.lit("2025-12-31T23:59:59Z").alias("collected_at"),
        (pl.col("age").cast(pl.Int64, strict=False) + 1).cast(pl.String).alias("age"),
    )
    exact = frame[rng.integers(0, frame.height, rows - base - again.height)]
    injected["duplicates by email"] = again.height
    injected["exact duplicates"] = exact.height
    frame = pl.concat([frame, again, exact])
    frame = frame[rng.permutation(frame.height)]
    frame.write_csv(path)
    return injected


def bare(csv: Path, out: Path) -> dict[str, float]:
    import polars as pl

    start = time.perf_counter()
    pl.read_csv(csv).write_parquet(out)
    return {"seconds": time.perf_counter() - start}


def personanet(csv: Path, root: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import polars  # noqa: F401  (imported before the clock starts, as in `bare`)

    from personanet.config import load_config
    from personanet.stages.clean import clean
    from personanet.stages.collect import collect
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    config = load_config(CONFIG)
    store = ArtifactStore(root, config.dataset.name)
    key = MasterKey.generate()
    start = time.perf_counter()
    collected = collect(config, store, key, sources=[str(csv)])
    middle = time.perf_counter()
    # --sources is not the config's chain: clean the version just collected.
    result = clean(config, store, key, input_version=collected.version)
    end = time.perf_counter()
    return {"seconds": end - start, "collect_seconds": middle - start,
            "clean_seconds": end - middle, "figures": result.figures}


def child(args: argparse.Namespace) -> int:
    if args.phase == "bare":
        out = bare(args.csv, args.out)
    else:
        out = personanet(args.csv, args.out)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))
    return 0


def run_child(phase: str, csv: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--csv", str(csv), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="bare/personanet pairs")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--dir", type=Path, default=None, help="where the temp files go")
    parser.add_argument("--phase", choices=("bare", "personanet"), help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return child(args)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-clean-") as tmp:
        folder = Path(tmp)
        csv = folder / "persona_synthetic.csv"
        started = time.perf_counter()
        injected = generate(csv, args.rows, args.seed)
        print(f"generated {args.rows:,} rows ({csv.stat().st_size / 2**20:.0f} MiB CSV) in "
              f"{time.perf_counter() - started:.1f}s; injected: "
              + ", ".join(f"{k} {v:,}" for k, v in injected.items()))
        runs: dict[str, list[dict]] = {"bare": [], "personanet": []}
        for i in range(args.repeat):
            runs["bare"].append(run_child("bare", csv, folder / f"bare-{i}.parquet"))
            runs["personanet"].append(run_child("personanet", csv, folder / f"store-{i}"))
            print(f"  pair {i + 1}: bare {runs['bare'][-1]['seconds']:.2f} s, personanet "
                  f"{runs['personanet'][-1]['seconds']:.2f} s, ratio "
                  f"{runs['personanet'][-1]['seconds'] / runs['bare'][-1]['seconds']:.2f}x")
    best_bare = min(runs["bare"], key=lambda r: r["seconds"])
    best = min(runs["personanet"], key=lambda r: r["seconds"])
    ratio = statistics.median(p["seconds"] / b["seconds"]
                              for b, p in zip(runs["bare"], runs["personanet"], strict=True))
    figures = best["figures"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}")
    print(f"best bare read_csv + write_parquet : {best_bare['seconds']:6.2f} s   "
          f"peak RSS {max(r['peak_rss_mib'] for r in runs['bare']):7.0f} MiB")
    print(f"best personanet collect + clean    : {best['seconds']:6.2f} s   "
          f"peak RSS {max(r['peak_rss_mib'] for r in runs['personanet']):7.0f} MiB   "
          f"(collect {best['collect_seconds']:.2f} s, clean {best['clean_seconds']:.2f} s)")
    print(f"ratio (median of pairs): {ratio:.2f}x (target <= {TARGET_RATIO:g}x)")
    print("clean report: " + json.dumps({k: v for k, v in figures.items() if k != "columns"}))
    accounted = (figures["rows_train"] + figures["rows_test"] + figures["duplicates_removed"]
                 + figures["rows_quarantined"] + figures["rows_dropped_by_bounding"])
    if accounted != figures["rows_in"]:
        print(f"rows not accounted for: {figures['rows_in']} in, {accounted} out")
        return 1
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
