"""Person-level DP-SGD on the bundled panel: accuracy at the same per-person epsilon.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_person_level.py [--epsilons 1 3]
       [--seeds 3] [--timing-epochs 1]

configs/panel.toml on data/panel.csv.gz (8,000 people, 1 to 20 yearly rows each), on all
6,000 training people and on the first 1,000 of them (``--people``; every test person
kept), real collect -> clean -> train in a temporary store with a fresh key (the subset is
a plaintext CSV of the public panel in a temporary folder), at each per-person epsilon
and seed (train.seed: the initial weights; the noise and sampling come from the
OS), three ways:

* person: ``clean.max_rows_per_unit = 20`` (every row), ``privacy_unit_level =
  "person"``: people sampled, each person's gradient over all their rows clipped;
* one-row: ``max_rows_per_unit = 1`` (each person's newest row): rows are people;
* row (k=20): every row, DP-SGD over rows at train.epsilon = epsilon; its per-person
  epsilon by group privacy (privacy.json's unit_level) is printed beside it: it is
  NOT the same guarantee, shown for what "row-level on all rows" really costs.

All three are scored on the same rows: every row of the test people (the test split of
the k = 20 clean), accuracy of the >50K label. Then the two exact per-person clipping
paths, timed side by side on the same data in one run (one epoch each, person level):
book-keeping per person (ghost Gram / per-person materialisation, one backward pass)
against Opacus' hooks with per-person sums of per-row gradients; the ratio is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "panel.toml"
sys.path.insert(0, str(ROOT))


def _config(overrides: list[str]):
    from personanet.config import load_config

    return load_config(CONFIG, overrides=overrides)


def _accuracy(artifact_path: Path, test_frame) -> float:
    import numpy as np

    from personanet.models import load_model, predict_frame

    model, encoder = load_model(artifact_path)
    target = encoder.transform(test_frame).target
    labelled = target >= 0
    proba = predict_frame(model, encoder, test_frame)
    return float((proba[labelled].argmax(1) == target[labelled]).mean()) if labelled.any() \
        else float(np.nan)


def _source(tmp: Path, people: int | None) -> list[str]:
    """Overrides pointing dataset.source at the first `people` training people of the panel
    (every test person kept), or nothing for the whole panel."""
    if people is None:
        return []
    import polars as pl

    panel = pl.read_csv(ROOT / "data" / "panel.csv.gz", infer_schema=False)
    chosen = panel.filter(pl.col("split") == "train")["email"].unique(maintain_order=True)
    subset = panel.filter((pl.col("split") == "test")
                          | pl.col("email").is_in(chosen[:people].implode()))
    path = tmp / f"panel_{people}.csv"
    subset.write_csv(path)
    return [f'dataset.source="{path}"']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--people", type=int, nargs="+", default=[0, 1000],
                        help="training people (0: all 6,000 of the panel)")
    parser.add_argument("--timing-epochs", type=int, default=1)
    args = parser.parse_args()

    import torch

    from personanet.stages.clean import clean
    from personanet.stages.collect import collect
    from personanet.stages.files import TEST_TABLE
    from personanet.stages.train import train
    from personanet.store import tables
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    torch.set_num_threads(1)
    key = MasterKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        def store_for(config):
            return ArtifactStore(Path(tmp) / "store", config.dataset.name)

        budget = ["budget.epsilon=100000", "budget.delta=0.5"]
        ways = {
            "person": ["clean.max_rows_per_unit=20", 'train.privacy_unit_level="person"'],
            "one-row": ["clean.max_rows_per_unit=1"],
            "row (k=20)": ["clean.max_rows_per_unit=20", 'train.privacy_unit_level="row"'],
        }
        test_frame = None
        results: dict[tuple[int, str, float], list[tuple[float, float | None]]] = {}
        for people in args.people:
            source = _source(Path(tmp), people or None)
            for epsilon in args.epsilons:
                for seed in range(args.seeds):
                    for way, overrides in ways.items():
                        config = _config(budget + source + overrides + [
                            f"train.epsilon={epsilon}", f"train.seed={seed}"])
                        store = store_for(config)
                        collect(config, store, key)
                        cleaned = clean(config, store, key)
                        if test_frame is None and way == "person":
                            # every row of every test person: the same rows for all
                            test_frame = tables.read_artifact_table(
                                store.get("clean", cleaned.version), TEST_TABLE, key)
                        began = time.perf_counter()
                        trained = train(config, store, key, force=True)
                        seconds = time.perf_counter() - began
                        level = trained.figures.get("unit_level") or {}
                        accuracy = _accuracy(trained.path, test_frame)
                        results.setdefault((people, way, epsilon), []).append(
                            (accuracy, level.get("person_epsilon")))
                        print(f"  people {people or 'all'} epsilon {epsilon:g} seed {seed} "
                              f"{way:<11} accuracy {accuracy:.4f}  ({seconds:.0f} s)",
                              flush=True)

        print("\ntraining people | epsilon | way | accuracy mean (min-max) over seeds | "
              "per-person epsilon guaranteed")
        for (people, way, epsilon), runs in results.items():
            accs = [a for a, _ in runs]
            person = [p for _, p in runs if p is not None]
            guaranteed = (f"{max(person):.4g} (group privacy)" if person
                          else f"{epsilon:g}" if way != "row (k=20)" else "none")
            print(f"{people or 6000} | {epsilon:g} | {way} | {statistics.mean(accs):.4f} "
                  f"({min(accs):.4f}-{max(accs):.4f}) | {guaranteed}")

        # The two exact per-person clipping paths, side by side.
        print("\nclipping path (person level, k = 20, all people) | seconds a training epoch")
        timing = {}
        for mode in ("ghost", "hooks"):
            config = _config(budget + ways["person"] + [
                f"train.epochs={args.timing_epochs}", f'train.grad_sample_mode="{mode}"'])
            store = store_for(config)
            collect(config, store, key)
            clean(config, store, key)
            trained = train(config, store, key, force=True)
            timing[trained.figures["grad_sample_mode"]] = (
                trained.figures["train_seconds"] / args.timing_epochs)
        for mode, seconds in timing.items():
            print(f"{mode} | {seconds:.2f}")
        modes = list(timing)
        print(f"ratio {modes[1]} / {modes[0]}: {timing[modes[1]] / timing[modes[0]]:.2f}")


if __name__ == "__main__":
    main()
