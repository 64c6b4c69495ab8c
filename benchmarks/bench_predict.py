"""Throughput and memory of `predict` on a large synthetic file, in streamed batches.

Usage: python benchmarks/bench_predict.py [--rows N] [--dir DIR] [--seed S]

Trains a small model once (1 epoch on the bundled sample, into a temporary store),
generates a synthetic persona CSV of N rows (default 1,000,000; the generator of
bench_clean.py, defects included), then, each in a fresh child process, side by side:

* read: polars streaming the same CSV in the same batches (the floor: I/O and parsing);
* predict N/4: `predict` on the first quarter of the file;
* predict N: `predict` on the whole file.

Printed: rows per second, the ratio predict / read (how much scoring costs on top of
reading), and peak RSS of N against N/4: memory that stays flat while the input grows
4x is what streaming promises (a ratio near 1.0). The synthetic CSV is plaintext in a
temporary folder removed at the end and holds no real person.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clean import generate, peak_rss_mib  # noqa: E402

CONFIG = ROOT / "configs" / "persona.toml"


def train_model(root: Path, key_b64: str) -> None:
    from personanet.config import load_config
    from personanet.stages.clean import clean
    from personanet.stages.collect import collect
    from personanet.stages.train import train
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    config = load_config(CONFIG)
    store = ArtifactStore(root, config.dataset.name)
    key = MasterKey.from_base64(key_b64)
    collect(config, store, key)
    clean(config, store, key)
    train(config, store, key, no_dp=True)


def child(args: argparse.Namespace) -> int:
    import polars as pl

    start = time.perf_counter()
    rows = 0
    if args.phase == "read":
        for batch in pl.scan_csv(args.csv, infer_schema=False).collect_batches(
                chunk_size=8192):
            rows += batch.height
    else:
        from personanet.config import load_config
        from personanet.stages.predict import predict
        from personanet.store.artifacts import ArtifactStore
        from personanet.store.keys import MasterKey

        config = load_config(CONFIG)
        store = ArtifactStore(args.root, config.dataset.name)
        result = predict(config, store, MasterKey.from_base64(os.environ["BENCH_KEY"]),
                         source=str(args.csv), force=True)
        rows = result.figures["rows_in"]
        assert rows == result.figures["rows_scored"] + result.figures["rows_rejected"]
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mib": peak_rss_mib()}))
    return 0


def run_child(phase: str, csv: Path, root: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--csv", str(csv),
                           "--root", str(root)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--phase", choices=("read", "predict"), help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)

    from personanet.store.keys import MasterKey

    work = Path(tempfile.mkdtemp(prefix="bench-predict-", dir=args.dir))
    try:
        key = MasterKey.generate().to_base64()
        env = {**os.environ, "BENCH_KEY": key}
        root = work / "artifacts"
        print(f"training a 1-epoch model and generating {args.rows:,} rows ...", flush=True)
        train_model(root, key)
        full = work / "persona_big.csv"
        generate(full, args.rows, args.seed)
        quarter = work / "persona_quarter.csv"
        with open(full, "rb") as src, open(quarter, "wb") as dst:
            for i, line in enumerate(src):
                if i > args.rows // 4:
                    break
                dst.write(line)
        read = run_child("read", full, root, env)
        small = run_child("predict", quarter, root, env)
        big = run_child("predict", full, root, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'phase':<22}{'rows':>12}{'seconds':>10}{'rows/s':>12}{'peak RSS MiB':>14}")
    for name, r in (("read (polars)", read), ("predict N/4", small), ("predict N", big)):
        print(f"{name:<22}{r['rows']:>12,}{r['seconds']:>10.2f}"
              f"{r['rows'] / r['seconds']:>12,.0f}{r['peak_rss_mib']:>14.0f}")
    print(f"\npredict / read time on N rows: {big['seconds'] / read['seconds']:.2f}x")
    print(f"peak RSS, N / (N/4) rows:      {big['peak_rss_mib'] / small['peak_rss_mib']:.2f}x "
          "(flat memory: near 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
