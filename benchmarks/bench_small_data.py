"""Small data at the defaults: "auto" settings against the old fixed ones, at epsilon 1.

Usage: python benchmarks/bench_small_data.py [--quick] [--seeds N] [--sizes 500,1000,...]
                                             [--search] [--json PATH]

For 500, 1,000, 2,000 and 5,000 training rows drawn from the bundled sample's
training split, the full training split (32,561), and scikit-learn's breast cancer
set (569 people, 30 numeric features, shipped inside the wheel), it trains at
epsilon 1, delta 1e-5 with:

- ``auto``: the new defaults (`personanet.training.defaults`: batch, epochs, learning rate,
  network and numeric bins chosen from the rows and epsilon);
- ``fixed``: the old fixed defaults (batch 1024, 10 epochs, Adam 1e-2, 2x64 tanh,
  16 numeric bins);
- ``hand (issue)``: the hand-tuned setting of issue 10 (SGD 0.1, momentum 0.9,
  batch 128, 30 epochs, one hidden layer of 16, no bins), up to 5,000 rows;

and prints balanced accuracy and accuracy on held-out people (the standard UCI
test split, 16,281 people; a seeded 20% of the breast cancer set) beside the
majority class, averaged over seeds. Each seed draws another subsample and other
initial weights; the DP noise is fresh in every run. ``--search`` adds the hand
search on 1,000 rows that the rule came from (batch, epochs, learning rate,
network, bins).

Every run is the real stage: `train()` on an encrypted clean artifact in a
temporary root (deleted at the end); no plaintext record touches the disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXED = {"batch_size": 1024, "epochs": 10, "learning_rate": 1e-2, "hidden_sizes": [64, 64],
         "numeric_bins": 16, "optimizer": "adam"}
HAND_ISSUE = {"batch_size": 128, "epochs": 30, "learning_rate": 0.1, "hidden_sizes": [16],
              "numeric_bins": 0, "optimizer": "sgd", "momentum": 0.9}
AUTO = {"batch_size": "auto", "epochs": "auto", "learning_rate": "auto",
        "hidden_sizes": "auto", "numeric_bins": "auto", "optimizer": "adam"}
#: the hand search on 1,000 rows (--search); batch 32 is rows / 32
SEARCH = {
    "2x64, 16 bins, batch 64, 30 ep, Adam 1e-2": {**FIXED, "batch_size": 64, "epochs": 30},
    "2x64, 16 bins, batch 32, 10 ep, Adam 1e-2": {**FIXED, "batch_size": 32},
    "2x64, no bins, batch 32, 15 ep, Adam 1e-2": {**FIXED, "batch_size": 32, "epochs": 15,
                                                  "numeric_bins": 0},
    "1x16, 16 bins, batch 32, 15 ep, Adam 3e-2": {**FIXED, "batch_size": 32, "epochs": 15,
                                                  "learning_rate": 3e-2, "hidden_sizes": [16]},
    "1x16, no bins, batch 32, 30 ep, Adam 3e-2": {**FIXED, "batch_size": 32, "epochs": 30,
                                                  "learning_rate": 3e-2, "hidden_sizes": [16],
                                                  "numeric_bins": 0},
    "1x16, no bins, batch 64, 30 ep, Adam 3e-2": {**FIXED, "batch_size": 64, "epochs": 30,
                                                  "learning_rate": 3e-2, "hidden_sizes": [16],
                                                  "numeric_bins": 0},
    "1x32, no bins, batch 32, 15 ep, Adam 3e-2": {**FIXED, "batch_size": 32, "epochs": 15,
                                                  "learning_rate": 3e-2, "hidden_sizes": [32],
                                                  "numeric_bins": 0},
    "1x16, no bins, batch 32, 15 ep, Adam 1e-1": {**FIXED, "batch_size": 32, "epochs": 15,
                                                  "learning_rate": 1e-1, "hidden_sizes": [16],
                                                  "numeric_bins": 0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 1,000 rows, the full sample and breast cancer only")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 6)")
    parser.add_argument("--sizes", default=None,
                        help="training rows of the sample, e.g. 500,1000,full (default: "
                             "500,1000,2000,5000,full; --quick: 1000,full)")
    parser.add_argument("--full-seeds", type=int, default=None,
                        help="seeds for the full sample (default: --seeds)")
    parser.add_argument("--search", action="store_true",
                        help="also the hand search on 1,000 rows the rule came from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    seeds = args.seeds or (2 if args.quick else 6)
    sizes = args.sizes or ("1000,full" if args.quick else "500,1000,2000,5000,full")

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(message)s")
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-small-") as tmp:
        adult = Adult(Path(tmp))
        for size in sizes.split(","):
            n = adult.train.height if size.strip() == "full" else int(size)
            settings = {"auto": AUTO, "fixed": FIXED}
            if n <= 5000:
                settings["hand (issue)"] = HAND_ISSUE
            rows += cells(adult, "sample", n, settings, seeds if n < adult.train.height
                          else args.full_seeds or seeds)
        if args.search:
            rows += cells(adult, "sample", 1000, SEARCH, seeds)
        cancer = BreastCancer(Path(tmp))
        rows += cells(cancer, "breast cancer", cancer.train_rows,
                      {"auto": AUTO, "fixed": FIXED, "hand (issue)": HAND_ISSUE}, seeds)
    print_table(rows)
    print(f"\n{time.perf_counter() - began:.0f} s, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------- data sets


class Source:
    """A data set as an encrypted clean artifact per (rows, seed), in a temporary root."""

    config: Any
    store: Any
    key: Any
    test: Any

    def clean_artifact(self, n: int, seed: int) -> str:
        raise NotImplementedError

    def _write_clean(self, train_frame: Any, test_frame: Any, tag: str) -> str:
        from personanet.store import tables

        with self.store.create("clean", fingerprint=f"bench-{tag}", inputs=[], config={},
                               config_hash=tag) as writer:
            for name, frame in (("train.parquet.enc", train_frame),
                                ("test.parquet.enc", test_frame)):
                tables.write_encrypted_parquet(writer.path(name), frame, self.key)
                writer.add(name, rows=frame.height, encrypted=True, key_id=self.key.key_id)
            return writer.commit().version


class Adult(Source):
    """The bundled sample, collected and cleaned once with configs/persona.toml."""

    def __init__(self, tmp: Path) -> None:
        from personanet.config import load_config
        from personanet.stages.clean import clean
        from personanet.stages.collect import collect
        from personanet.store import tables
        from personanet.store.artifacts import ArtifactStore
        from personanet.store.keys import MasterKey

        config = load_config(ROOT / "configs" / "persona.toml")
        self.config = dataclasses.replace(config, budget=dataclasses.replace(
            config.budget, epsilon=1e9, delta=0.5))
        self.key = MasterKey.generate()
        self.store = ArtifactStore(tmp / "sample", self.config.dataset.name)
        collect(self.config, self.store, self.key)
        full = clean(self.config, self.store, self.key)
        artifact = self.store.get("clean", full.version)
        self.train = tables.read_artifact_table(artifact, "train.parquet.enc", self.key)
        self.test = tables.read_artifact_table(artifact, "test.parquet.enc", self.key)
        self.full_version = full.version
        self._versions: dict[tuple[int, int], str] = {}

    def clean_artifact(self, n: int, seed: int) -> str:
        if n >= self.train.height:
            return self.full_version
        if (n, seed) not in self._versions:
            subsample = self.train.sample(n=n, seed=seed, shuffle=True)
            self._versions[n, seed] = self._write_clean(subsample, self.test, f"{n}-{seed}")
        return self._versions[n, seed]


class BreastCancer(Source):
    """scikit-learn's Wisconsin breast cancer set: 569 people, 30 numeric features.

    The bounds are the published minimum and maximum of each feature (the set's
    description lists them) widened by a quarter: public, not read from a training split.
    """

    TEST_FRACTION = 0.2

    def __init__(self, tmp: Path) -> None:
        import numpy as np
        import polars as pl
        from sklearn.datasets import load_breast_cancer

        from personanet.config import parse_config
        from personanet.stages.base import require_key
        from personanet.store.artifacts import ArtifactStore
        from personanet.store.keys import MasterKey

        data = load_breast_cancer()
        names = [name.replace(" ", "_") for name in data.feature_names]
        columns: dict[str, Any] = {
            "id": {"role": "identifier"},
            "diagnosis": {"role": "target", "categories": list(data.target_names)},
        }
        for name, values in zip(names, data.data.T, strict=True):
            columns[name] = {"type": "numeric",
                             "bounds": [0.0, float(np.ceil(values.max() * 1.25 * 1000) / 1000)]}
        self.config = parse_config({
            "dataset": {"name": "breast_cancer", "target": "diagnosis", "privacy_unit": "id"},
            "columns": columns,
            "budget": {"epsilon": 1e9, "delta": 0.5},
        })
        self.frame = pl.DataFrame({
            "id": [f"patient-{i}" for i in range(len(data.target))],
            **{name: data.data[:, j] for j, name in enumerate(names)},
            "diagnosis": [str(data.target_names[t]) for t in data.target],
        })
        self.key = MasterKey.generate()
        self.store = ArtifactStore(tmp / "breast_cancer", "breast_cancer")
        require_key(self.store, self.key)  # the store seals what it writes under this key
        self.train_rows = self.frame.height - round(self.frame.height * self.TEST_FRACTION)
        self._versions: dict[int, tuple[str, Any]] = {}

    def clean_artifact(self, n: int, seed: int) -> str:
        if seed not in self._versions:
            shuffled = self.frame.sample(fraction=1.0, seed=seed, shuffle=True)
            train, test = shuffled.head(self.train_rows), shuffled.tail(
                self.frame.height - self.train_rows)
            self._versions[seed] = (self._write_clean(train, test, f"bc-{seed}"), test)
        version, self.test = self._versions[seed]
        return version


# --------------------------------------------------------------------- runs


def cells(source: Source, label: str, n: int, settings: dict[str, dict[str, Any]],
          seeds: int) -> list[dict[str, Any]]:
    """One row per setting (and one for the majority class), averaged over seeds."""
    out: list[dict[str, Any]] = []
    majority: list[dict[str, float]] = []
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for seed in range(seeds):
        version = source.clean_artifact(n, seed)
        majority.append(_majority(source))
        for name, changes in settings.items():
            runs[name].append(_train_and_score(source, version, changes, seed))
            last = runs[name][-1]
            print(f"  {label} {n} rows, seed {seed}, {name}: balanced accuracy "
                  f"{last['balanced_accuracy']:.3f} ({last['seconds']:.1f} s)", file=sys.stderr)
    out.append({"data": label, "rows": n, "setting": "majority class", "seeds": seeds,
                "balanced_accuracy": 0.5,
                "accuracy": statistics.fmean(m["accuracy"] for m in majority)})
    for name, results in runs.items():
        first = results[0]
        balanced = [r["balanced_accuracy"] for r in results]
        out.append({
            "data": label, "rows": n, "setting": name, "seeds": seeds,
            "batch_size": first["batch_size"], "epochs": first["epochs"],
            "learning_rate": first["learning_rate"], "optimizer": first["optimizer"],
            "hidden_sizes": first["hidden_sizes"], "numeric_bins": first["numeric_bins"],
            "sample_rate": first["sample_rate"], "steps": first["steps"],
            "epsilon": max(r["epsilon"] for r in results),
            "balanced_accuracy": statistics.fmean(balanced),
            "balanced_accuracy_sd": statistics.pstdev(balanced),
            "accuracy": statistics.fmean(r["accuracy"] for r in results),
            "warnings": len(first["warnings"]),
            "seconds": statistics.fmean(r["seconds"] for r in results),
        })
    return out


def _train_and_score(source: Source, version: str, changes: dict[str, Any], seed: int
                     ) -> dict[str, Any]:
    from personanet.stages.train import train

    config = source.config
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, epsilon=1.0, delta=1e-5, seed=42 + seed, device="cpu", **changes))
    began = time.perf_counter()
    result = train(config, source.store, source.key, input_version=version, force=True)
    seconds = time.perf_counter() - began
    figures = result.figures
    return {**_scores(result.path, source.test), "seconds": seconds,
            "warnings": result.warnings,
            **{k: figures[k] for k in ("batch_size", "epochs", "learning_rate", "optimizer",
                                       "hidden_sizes", "numeric_bins", "sample_rate", "steps",
                                       "epsilon")}}


def _scores(model_path: Path, test: Any) -> dict[str, float]:
    from personanet.models import load_model, predict_frame
    from personanet.reporting.metrics import classification_metrics

    model, encoder = load_model(model_path)
    proba = predict_frame(model, encoder, test)
    metrics = classification_metrics(encoder.transform(test).target, proba,
                                     classes=encoder.target_classes)
    return {"balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"]}


def _majority(source: Source) -> dict[str, float]:
    import numpy as np

    from personanet.models.encoding import Encoder

    target = Encoder.from_config(source.config).transform(source.test).target
    return {"accuracy": float(np.bincount(target).max() / len(target))}


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nepsilon 1, delta 1e-5; held-out balanced accuracy (mean +- sd over seeds) "
          "and accuracy")
    print(f"{'data':14s} {'rows':>6s} {'setting':44s} {'batch':>5s} {'ep':>3s} {'lr':>6s} "
          f"{'net':>9s} {'q':>7s} {'steps':>5s} {'bal. acc.':>14s} {'acc.':>6s} {'warn':>4s}")
    for r in rows:
        if r["setting"] == "majority class":
            print(f"{r['data']:14s} {r['rows']:6d} {'majority class':44s} {'':5s} {'':3s} "
                  f"{'':6s} {'':9s} {'':7s} {'':5s} {0.5:14.3f} {r['accuracy']:6.3f}")
            continue
        net = "x".join(str(h) for h in r["hidden_sizes"]) + f"/{r['numeric_bins']}b"
        lr = f"{r['learning_rate']:g}" + ("s" if r["optimizer"] == "sgd" else "")
        bal = f"{r['balanced_accuracy']:.3f} +- {r['balanced_accuracy_sd']:.3f}"
        print(f"{r['data']:14s} {r['rows']:6d} {r['setting']:44s} {r['batch_size']:5d} "
              f"{r['epochs']:3d} {lr:>6s} {net:>9s} {r['sample_rate']:7.4f} {r['steps']:5d} "
              f"{bal:>14s} {r['accuracy']:6.3f} {r['warnings']:4d}")
    print("(lr: Adam, or SGD with momentum 0.9 when marked s; net: hidden widths / numeric "
          "bins; q: Poisson sampling rate; warn: train's small-data warnings)")


if __name__ == "__main__":
    raise SystemExit(main())
