"""Scale: collect + clean past memory, HMAC pseudonyms, predict's memory, DP's fixed costs.

Usage: python benchmarks/bench_scale.py [--full] [--rows N] [--repeat R] [--dir DIR]
                                        [--skip PART,...]

Each figure comes from fresh child processes run side by side in this one run (peak
RSS is each child's VmHWM: interpreter and libraries included), so ratios are what to
quote; absolute seconds on a shared machine are noise. Parts (names for --skip):

* ``scale``: collect + clean of N and 10 N synthetic rows (bench_clean's generator,
  defects included): time of each, the 10 N / N time ratio (target <= 11x) and peak RSS
  (target under 4 GiB at 10 N). N is cleaned in one pass in memory (records up to
  ``clean_stream.ONE_PASS_BYTES`` decoded) and again in batches, the path 10 N takes:
  the ratio is given against both.
* ``bare``: collect + clean of N rows against polars' bare ``read_csv`` +
  ``write_parquet`` of the same CSV, in pairs; the median of the per-pair ratios
  (target <= 3x).
* ``crypto``: encryption file to file, GB/s (benchmarks/bench_crypto.py, 256 MiB).
* ``predict``: peak RSS of predict on N/4, N and 4 N rows (flat memory: the same).
* ``train``: DP / no-DP ratio of the whole ``train()`` call (reading, encoding,
  calibration, per-epoch accounting, checkpoints, artifact) on the bundled sample's
  32,561 training rows, and, with --full, on 1M synthetic rows; interleaved pairs,
  median of the per-pair ratios (targets <= 1.5x and <= 1.15x).
* Training in 1 vs 2 processes is benchmarks/bench_distributed.py's part.

Default (quick): N = 100,000, so `make bench` stays short; --full: N = 1,000,000
(10M rows for ``scale``, 4M for ``predict``; about 2 GB of CSV under --dir, plus 20-30
minutes on 2 cores). Synthetic CSVs are plaintext in a temporary folder removed at the
end and hold no real person.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clean import CONFIG, generate, peak_rss_mib  # noqa: E402

PARTS = ("scale", "bare", "crypto", "predict", "train")
GENERATE_PART_ROWS = 1_000_000


# ------------------------------------------------------------------ children


def _store(root: Path) -> tuple:
    from personanet.config import load_config
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    config = load_config(CONFIG)
    key = MasterKey.from_base64(os.environ["BENCH_KEY"])
    return config, ArtifactStore(root, config.dataset.name), key


def collect_clean(csv: Path | None, root: Path) -> dict:
    # Libraries are imported before the clock starts, as polars is in `bare`: numpy and
    # the polars-hash plugin are imported lazily by the stages (about 0.1 s).
    import numpy  # noqa: F401
    import polars  # noqa: F401
    import polars_hash  # noqa: F401

    from personanet.stages.clean import clean
    from personanet.stages.collect import collect

    config, store, key = _store(root)
    start = time.perf_counter()
    collected = collect(config, store, key, sources=[str(csv)] if csv else None)
    middle = time.perf_counter()
    cleaned = clean(config, store, key, input_version=collected.version)
    end = time.perf_counter()
    figures = cleaned.figures
    return {"seconds": end - start, "collect_seconds": middle - start,
            "clean_seconds": end - middle, "rows_in": figures["rows_in"],
            "rows_train": figures["rows_train"], "clean_version": cleaned.version}


def bare(csv: Path, out: Path) -> dict:
    import polars as pl

    start = time.perf_counter()
    pl.read_csv(csv).write_parquet(out)
    return {"seconds": time.perf_counter() - start}


def predict_child(csv: Path, root: Path, model: str) -> dict:
    from personanet.stages.predict import predict

    config, store, key = _store(root)
    start = time.perf_counter()
    result = predict(config, store, key, source=str(csv), model_version=model, force=True)
    return {"seconds": time.perf_counter() - start, "rows": result.figures["rows_in"]}


def train_pairs(root: Path, clean_version: str, repeat: int, epochs: int | None,
                delta: float | None = None) -> dict:
    """DP and no-DP `train()` calls, interleaved after a warm-up of each."""
    import torch

    from personanet.stages.train import train

    torch.set_num_threads(1)
    config, store, key = _store(root)
    config = dataclasses.replace(
        config, budget=dataclasses.replace(config.budget, epsilon=1e9, delta=0.5),
        train=dataclasses.replace(config.train, device="cpu",
                                  **({"epochs": epochs} if epochs else {}),
                                  **({"delta": delta} if delta else {})))
    times: dict[str, list[float]] = {"dp": [], "no-dp": []}
    for i in range(repeat + 1):
        for mode in ("no-dp", "dp"):
            began = time.perf_counter()
            model = train(config, store, key, input_version=clean_version, force=True,
                          no_dp=mode == "no-dp").version
            if i:  # the first pair warms imports, allocator and caches
                times[mode].append(time.perf_counter() - began)
    if not repeat:
        return {"model_version": model}
    ratios = [d / n for d, n in zip(times["dp"], times["no-dp"], strict=True)]
    return {"ratio": statistics.median(ratios), "dp_seconds": min(times["dp"]),
            "no_dp_seconds": min(times["no-dp"])}


def train_once(root: Path, clean_version: str, mode: str, epochs: int | None,
               delta: float | None = None) -> dict:
    """One `train()` call, the first of its process and of its dataset: what a first
    `personanet train` pays.

    It runs on a copy of `root` without train artifacts or budget ledger (a ledger of
    earlier runs makes DP's budget check compose them all: a cost of the ledger, not of
    one run). torch and the stage's module are imported before the clock starts (both
    modes need them); everything `train` imports or computes on its way is timed.
    Mode "dp-cold" copies no calibration table (a plan never trained before) and leaves
    its own in `root` for mode "dp"."""
    import shutil

    import torch

    from personanet.privacy.calibration_table import TABLE_NAME
    from personanet.stages.train import train

    torch.set_num_threads(1)
    table = root / TABLE_NAME
    template, root = root, root.with_name(root.name + "-once")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root, ignore=shutil.ignore_patterns(
        "budget.json", "train", "checkpoints", ".personanet.lock",
        *([table.parent.name] if mode == "dp-cold" else [])))
    config, store, key = _store(root)
    config = dataclasses.replace(
        config, budget=dataclasses.replace(config.budget, epsilon=1e9, delta=0.5),
        train=dataclasses.replace(config.train, device="cpu",
                                  **({"epochs": epochs} if epochs else {}),
                                  **({"delta": delta} if delta else {})))
    began = time.perf_counter()
    train(config, store, key, input_version=clean_version, force=True, no_dp=mode == "no-dp")
    seconds = time.perf_counter() - began
    if mode == "dp-cold":
        shutil.rmtree(table.parent, ignore_errors=True)
        shutil.copytree((root / TABLE_NAME).parent, table.parent)
    shutil.rmtree(root)
    return {"seconds": seconds}


def child(args: argparse.Namespace) -> int:
    if args.phase.startswith("train_once:"):
        out = train_once(args.root, args.version, args.phase.split(":", 1)[1], args.epochs,
                         args.delta)
    elif args.phase in ("collect_clean", "collect_clean_batched"):
        if args.phase.endswith("batched"):  # the path of exports past ONE_PASS_BYTES
            from personanet.stages import clean_stream

            clean_stream.ONE_PASS_BYTES = 0
        out = collect_clean(args.csv, args.root)
    elif args.phase == "bare":
        out = bare(args.csv, args.root)
    elif args.phase == "predict":
        out = predict_child(args.csv, args.root, args.version)
    else:
        out = train_pairs(args.root, args.version, args.repeat, args.epochs, args.delta)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))
    return 0


def run_child(phase: str, *, csv: Path | None = None, root: Path, env: dict[str, str],
              extra: list[str] = ()) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--root", str(root), *extra]
    if csv is not None:
        command += ["--csv", str(csv)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ parts


#: where synthetic CSVs are kept between runs (`--data`); None: the run's temp folder
DATA: Path | None = None


def synthetic(path: Path, rows: int, seed: int = 2026) -> Path:
    """`rows` synthetic rows, generated a million at a time (bench_clean's generator);
    with --data, kept there and reused by later runs."""
    if DATA is not None:
        path = DATA / f"synthetic-{rows}-{seed}.csv"
    if path.exists():
        return path
    with open(path, "wb") as out:
        for i, start in enumerate(range(0, rows, GENERATE_PART_ROWS)):
            part = path.with_suffix(f".part{i}")
            generate(part, min(GENERATE_PART_ROWS, rows - start), seed + i)
            with open(part, "rb") as src:
                if i:
                    src.readline()  # one header
                while block := src.read(1 << 24):
                    out.write(block)
            part.unlink()
    return path


def scale_part(folder: Path, rows: int, env: dict[str, str]) -> None:
    csv = synthetic(folder / "n.csv", rows)
    small = run_child("collect_clean", csv=csv, root=folder / "s1", env=env)
    batched = run_child("collect_clean_batched", csv=csv, root=folder / "s1b", env=env)
    big = run_child("collect_clean", csv=synthetic(folder / "n10.csv", 10 * rows),
                    root=folder / "s10", env=env)
    if DATA is None:
        (folder / "n10.csv").unlink()
    print(f"\ncollect + clean        {'rows':>12}{'seconds':>10}{'collect':>10}{'clean':>10}"
          f"{'peak RSS MiB':>14}")
    # Up to clean_stream.ONE_PASS_BYTES of records are cleaned in one pass in memory; past it
    # in batches. "N in batches" forces the path 10 N takes, for a like-for-like ratio.
    for name, r in (("N", small), ("N in batches", batched), ("10 N", big)):
        print(f"  {name:<21}{r['rows_in']:>12,}{r['seconds']:>10.1f}{r['collect_seconds']:>10.1f}"
              f"{r['clean_seconds']:>10.1f}{r['peak_rss_mib']:>14.0f}")
    print(f"  10 N / N time, both in batches: {big['seconds'] / batched['seconds']:.1f}x "
          f"(target <= 11x); against N in one pass: {big['seconds'] / small['seconds']:.1f}x; "
          f"peak RSS at 10 N {big['peak_rss_mib'] / 1024:.2f} GiB (target < 4 GiB)")


def bare_part(folder: Path, rows: int, repeat: int, env: dict[str, str]) -> None:
    csv = synthetic(folder / "n.csv", rows)
    ratios = []
    for i in range(repeat):
        plain = run_child("bare", csv=csv, root=folder / f"bare{i}.parquet", env=env)
        ours = run_child("collect_clean", csv=csv, root=folder / f"b{i}", env=env)
        ratios.append(ours["seconds"] / plain["seconds"])
        print(f"  pair {i + 1}: bare {plain['seconds']:.2f} s, collect + clean "
              f"{ours['seconds']:.2f} s (collect {ours['collect_seconds']:.2f}, clean "
              f"{ours['clean_seconds']:.2f}), ratio {ratios[-1]:.2f}x")
    print(f"collect + clean / bare polars at {rows:,} rows: {statistics.median(ratios):.2f}x "
          "(median of pairs; target <= 3x)")


def crypto_part(folder: Path) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_crypto.py"),
                           "--size-mib", "256", "--repeat", "2", "--dir", str(folder)],
                          capture_output=True, text=True, check=False)
    print("\nencryption (benchmarks/bench_crypto.py, 256 MiB):")
    for line in proc.stdout.splitlines():
        if any(word in line for word in ("encrypt", "decrypt", "plain")):
            print("  " + line.strip())


def predict_part(folder: Path, rows: int, env: dict[str, str]) -> None:
    root = folder / "p"
    cleaned = run_child("collect_clean", csv=None, root=root, env=env)  # the bundled sample
    model = run_child("train", root=root, env=env, extra=[
        "--version", cleaned["clean_version"], "--repeat", "0", "--epochs", "1"])["model_version"]
    print(f"\npredict                {'rows':>12}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    peaks = []
    for n in (rows // 4, rows, 4 * rows):
        csv = synthetic(folder / f"predict{n}.csv", n, seed=7)
        r = run_child("predict", csv=csv, root=root, env=env, extra=["--version", model])
        if DATA is None:
            csv.unlink()
        peaks.append(r["peak_rss_mib"])
        print(f"  {n:<21,}{r['rows']:>12,}{r['seconds']:>10.1f}{r['rows'] / r['seconds']:>12,.0f}"
              f"{r['peak_rss_mib']:>14.0f}")
    print(f"  peak RSS 4 N / (N/4): {peaks[-1] / peaks[0]:.2f}x (flat memory: near 1.0)")


def train_part(folder: Path, full: bool, repeat: int, env: dict[str, str],
               epochs: int | None) -> None:
    print("\nDP / no-DP, whole train() call (median of interleaved pairs):")
    cases = [("sample", None)] + ([("1M synthetic", 1_000_000)] if full else [])
    for name, rows in cases:
        root = folder / f"t-{rows or 0}"
        csv = synthetic(folder / f"train{rows}.csv", rows) if rows else None
        cleaned = run_child("collect_clean", csv=csv, root=root, env=env)
        r = run_child("train", root=root, env=env,
                      extra=["--version", cleaned["clean_version"], "--repeat", str(repeat)]
                      + (["--epochs", str(epochs)] if epochs else [])
                      # delta below 1/rows, as train requires (1e-7 for 650k rows)
                      + (["--delta", "1e-7"] if rows else []))
        target = 1.15 if rows else 1.5
        print(f"  {name:<14} {cleaned['rows_train']:>9,} train rows: DP {r['dp_seconds']:.1f} s, "
              f"no DP {r['no_dp_seconds']:.1f} s, ratio {r['ratio']:.2f}x (target <= {target}x)"
              " [repeated calls in one process]")
        fresh_pairs(root, cleaned["clean_version"], repeat, env, epochs,
                    "1e-7" if rows else None, target)


def fresh_pairs(root: Path, version: str, repeat: int, env: dict[str, str],
                epochs: int | None, delta: str | None, target: float) -> None:
    """Each `train()` the first call of a fresh process (`train_once`), interleaved:
    no DP, DP with no calibration table (a new plan), DP with the table (a plan trained
    before: the usual re-run)."""
    extra = (["--version", version] + (["--epochs", str(epochs)] if epochs else [])
             + (["--delta", delta] if delta else []))
    seconds: dict[str, list[float]] = {"no-dp": [], "dp-cold": [], "dp": []}
    for _ in range(repeat):
        for mode in seconds:
            seconds[mode].append(run_child(f"train_once:{mode}", root=root, env=env,
                                           extra=extra)["seconds"])
    for mode, label in (("dp-cold", "new plan (search)"), ("dp", "plan in the table")):
        ratio = statistics.median(d / n for d, n in zip(seconds[mode], seconds["no-dp"],
                                                        strict=True))
        print(f"  {'':<14} first call of a process, {label:<18}: DP {min(seconds[mode]):.2f} s,"
              f" no DP {min(seconds['no-dp']):.2f} s, ratio {ratio:.2f}x (target <= {target}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="N = 1M (10M, 4M rows)")
    parser.add_argument("--rows", type=int, default=None, help="N (default 100k; 1M --full)")
    parser.add_argument("--repeat", type=int, default=3, help="pairs for the ratios")
    parser.add_argument("--epochs", type=int, default=None, help="train epochs (config's)")
    parser.add_argument("--skip", default="", help=f"parts to skip: {','.join(PARTS)}")
    parser.add_argument("--dir", type=Path, default=None, help="where the temp files go")
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the synthetic CSVs here and reuse them (plaintext!)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--version", help=argparse.SUPPRESS)
    parser.add_argument("--delta", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)

    from personanet.store.keys import MasterKey

    global DATA
    DATA = args.data
    rows = args.rows or (1_000_000 if args.full else 100_000)
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    env = {**os.environ, "BENCH_KEY": MasterKey.generate().to_base64()}
    print(f"bench_scale: N = {rows:,} rows, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as tmp:
        folder = Path(tmp)
        if "scale" not in skip:
            scale_part(folder, rows, env)
        if "bare" not in skip:
            print()
            bare_part(folder, rows, args.repeat, env)
        if "crypto" not in skip:
            crypto_part(folder)
        if "predict" not in skip:
            predict_part(folder, rows, env)
        if "train" not in skip:
            train_part(folder, args.full, args.repeat, env, args.epochs)
    print("\ntraining in 1 vs 2 processes: benchmarks/bench_distributed.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
