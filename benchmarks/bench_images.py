"""Benchmark: image records through collect and clean, against a bare read-and-decode loop.

The bundled forms sample (data/forms: a manifest and 5,000 28x28 PNGs) is

* bare: every PNG read from disk and decoded with Pillow into uint8 pixels, the
  manifest read with polars, the pixels and the manifest written as one zstd Parquet
  (plaintext, in memory): the least any pipeline must do;
* personanet: `collect` then `clean` in this process (a fresh artifact root each time):
  the same reads and decodes, plus the fingerprint over every image (sha256), the
  encryption, path checks, every validation, pseudonyms, dedupe and the split.

Pairs run back to back (bare, then personanet), `--pairs` times; the figure is the median
of the per-pair ratios, because only side-by-side measurements mean anything on a shared
machine. One thread for polars' pool is not forced; run it on a quiet machine.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_images.py --pairs 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "forms.toml"
MANIFEST = ROOT / "data" / "forms" / "manifest.csv"


def bare() -> float:
    import numpy as np
    import polars as pl
    from PIL import Image

    start = time.perf_counter()
    manifest = pl.read_csv(MANIFEST, infer_schema=False)
    folder = MANIFEST.parent
    pixels = [np.asarray(Image.open(io.BytesIO((folder / p).read_bytes()))).tobytes()
              for p in manifest["image"]]
    table = manifest.with_columns(pl.Series("image", pixels, dtype=pl.Binary))
    table.write_parquet(io.BytesIO(), compression="zstd")
    return time.perf_counter() - start


def personanet() -> tuple[float, float]:
    from personanet.config import load_config
    from personanet.sources import images
    from personanet.stages.clean import clean
    from personanet.stages.collect import collect
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    images._DIGESTS.clear()  # each run hashes its images, as a fresh process does
    config = load_config(CONFIG)
    key = MasterKey.generate()
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(Path(root), config.dataset.name)
        start = time.perf_counter()
        collect(config, store, key)
        middle = time.perf_counter()
        result = clean(config, store, key)
        end = time.perf_counter()
    assert result.figures["rows_train"] + result.figures["rows_test"] == 5000
    return middle - start, end - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    import logging

    logging.getLogger("personanet").setLevel(logging.WARNING)
    bare()  # warm the page cache and the imports for both
    ratios = []
    print("| pair | bare read+decode+write | collect | clean | ratio |")
    print("|---|---|---|---|---|")
    for pair in range(1, args.pairs + 1):
        base = bare()
        collected, cleaned = personanet()
        ratios.append((collected + cleaned) / base)
        print(f"| {pair} | {base:.2f} s | {collected:.2f} s | {cleaned:.2f} s | "
              f"{ratios[-1]:.2f}x |")
    print(f"median ratio (collect + clean) / bare: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
