"""DP overhead and accuracy of `personanet train` on the bundled sample.

Usage: python benchmarks/bench_train.py [--repeat R] [--epochs E] [--threads T]
                                        [--modes no-dp,bookkeeping,ghost,hooks]
                                        [--epsilons 0.5,1,3,8] [--accuracy-repeat N]
                                        [--architectures] [--skip-overhead]
                                        [--skip-accuracy] [--set KEY=VALUE ...]
                                        [--json PATH]

Runs the real pipeline (collect -> clean with configs/persona.toml, the standard UCI
Adult split) once, then:

1. DP overhead: the same training (batch 1024, configs/persona.toml otherwise) with
   DP in each per-example clipping mode and without DP (`--no-dp`), side by side in one
   process, interleaved, best of `--repeat`. Two ratios per mode, each against no-DP:
   the training loop alone (the `train_seconds` figure: forward, backward, clipping,
   noise, optimizer steps) and the whole `train()` call (also reading and encoding the
   data, calibrating the noise, per-epoch accounting, checkpoints and the artifact).
   Absolute seconds on a shared machine are noise; the ratios are the figures to quote.
2. Accuracy on the test split at epsilon 0.5, 1, 3, 8 (delta 1e-5) and without DP,
   `--accuracy-repeat` runs each; run i uses train.seed 42 + i (initial weights), and
   the DP noise differs per run anyway.
3. With `--architectures`: accuracy and loop time at epsilon 1 of the variants the
   default was chosen from (one-hot vs embeddings, LayerNorm, widths, activations,
   numeric bins).

Each training run writes a real train artifact in a temporary folder (deleted at the
end) against a large budget, so the ledger never refuses a run here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {
    # name: (--no-dp, train.grad_sample_mode, train.bookkeeping)
    "no-dp": (True, "ghost", True),
    "bookkeeping": (False, "ghost", True),
    "ghost": (False, "ghost", False),
    "hooks": (False, "hooks", False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="override train.epochs for the overhead runs (default: config)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", default="no-dp,bookkeeping,ghost,hooks")
    parser.add_argument("--epsilons", default="0.5,1,3,8")
    parser.add_argument("--accuracy-repeat", type=int, default=3)
    parser.add_argument("--architectures", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a [train] key for every run (JSON value), e.g. "
                             "--set learning_rate=0.01")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")

    from personanet.config import load_config
    from personanet.stages.clean import clean
    from personanet.stages.collect import collect
    from personanet.store import tables
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    base = load_config(ROOT / "configs" / "persona.toml")
    base = dataclasses.replace(base, budget=dataclasses.replace(base.budget, epsilon=1e9,
                                                                 delta=0.5))
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name.strip()] = json.loads(value)
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, **overrides))
    key = MasterKey.generate()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "train_overrides": overrides,
    }
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        store = ArtifactStore(Path(tmp) / "artifacts", base.dataset.name)
        collect(base, store, key)
        clean_result = clean(base, store, key)
        test_frame = tables.read_encrypted_parquet(
            store.get("clean").file("test.parquet.enc"), key)
        print(f"sample: {clean_result.figures.get('rows_train')} train rows, "
              f"{test_frame.height} test rows; torch threads {torch.get_num_threads()}",
              file=sys.stderr)
        if not args.skip_overhead:
            results["overhead"] = overhead(base, store, key, args)
            print_overhead(results["overhead"])
        if not args.skip_accuracy:
            results["accuracy"] = accuracy(base, store, key, test_frame, args)
            print_accuracy(results["accuracy"])
        if args.architectures:
            results["architectures"] = architectures(base, store, key, test_frame, args)
            print_architectures(results["architectures"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _train(config: Any, store: Any, key: Any, mode: str) -> tuple[Any, float]:
    from personanet.stages.train import train

    no_dp, grad_sample_mode, bookkeeping = MODES[mode]
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, grad_sample_mode=grad_sample_mode, bookkeeping=bookkeeping,
        device="cpu"))
    began = time.perf_counter()
    result = train(config, store, key, force=True, no_dp=no_dp)
    return result, time.perf_counter() - began


def overhead(base: Any, store: Any, key: Any, args: argparse.Namespace) -> dict[str, Any]:
    config = base
    if args.epochs:
        config = dataclasses.replace(base, train=dataclasses.replace(base.train,
                                                                     epochs=args.epochs))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "no-dp" not in modes:
        modes.insert(0, "no-dp")
    _train(config, store, key, "no-dp")  # warm-up: imports, allocator, caches
    loop: dict[str, list[float]] = {m: [] for m in modes}
    total: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeat):
        for mode in modes:  # interleaved, so drifts of a shared machine hit every mode
            result, seconds = _train(config, store, key, mode)
            loop[mode].append(result.figures["train_seconds"])
            total[mode].append(seconds)
            print(f"  overhead run {repeat + 1}/{args.repeat} {mode:12s} loop "
                  f"{loop[mode][-1]:7.2f}s  train() {seconds:7.2f}s", file=sys.stderr)
    base_loop, base_total = min(loop["no-dp"]), min(total["no-dp"])
    def paired(times: dict[str, list[float]], mode: str) -> float:
        # Each repeat's ratio against the no-DP run just before it, then the median:
        # steadier than best-of on a machine whose load changes under the benchmark.
        return statistics.median(a / b for a, b in zip(times[mode], times["no-dp"],
                                                          strict=True))

    return {
        "batch_size": config.train.batch_size, "epochs": config.train.epochs,
        "repeat": args.repeat,
        "modes": {m: {"loop_seconds": min(loop[m]), "train_seconds": min(total[m]),
                      "loop_ratio": min(loop[m]) / base_loop,
                      "train_ratio": min(total[m]) / base_total,
                      "loop_ratio_paired_median": paired(loop, m),
                      "train_ratio_paired_median": paired(total, m),
                      "loop_runs": loop[m], "train_runs": total[m]} for m in modes},
    }


def accuracy(base: Any, store: Any, key: Any, test_frame: Any,
             args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    settings: list[tuple[str, float | None]] = [
        (f"epsilon {float(e):g}", float(e)) for e in args.epsilons.split(",") if e.strip()]
    settings.append(("no DP", None))
    out: dict[str, Any] = {}
    for label, epsilon in settings:
        config = base
        if epsilon is not None:
            config = dataclasses.replace(base, train=dataclasses.replace(base.train,
                                                                         epsilon=epsilon))
        scores, epsilons = [], []
        for run in range(args.accuracy_repeat):
            seeded = dataclasses.replace(config, train=dataclasses.replace(
                config.train, seed=config.train.seed + run))
            result, _ = _train(seeded, store, key, "no-dp" if epsilon is None else "bookkeeping")
            scores.append(_test_accuracy(result, test_frame))
            epsilons.append(result.figures["epsilon"])
            print(f"  accuracy {label:12s} {scores[-1]:.4f}", file=sys.stderr)
        out[label] = {"target_epsilon": epsilon, "epsilon_reached": epsilons,
                      "accuracy": scores, "mean": statistics.fmean(scores),
                      "min": min(scores), "max": max(scores),
                      "std": float(np.std(scores))}
    return out


def _test_accuracy(result: Any, test_frame: Any) -> float:
    from personanet.models import load_model, predict_frame

    model, encoder = load_model(result.path)
    target = encoder.transform(test_frame).target
    predicted = predict_frame(model, encoder, test_frame).argmax(axis=1)
    return float((predicted == target).mean())


VARIANTS: dict[str, dict[str, Any]] = {
    "one-hot 2x64 tanh, 16 bins (default)": {},
    "one-hot 2x64 tanh, no bins": {"numeric_bins": 0},
    "embedding 8 + LayerNorm": {"categorical_encoding": "embedding", "norm": "layernorm"},
    "one-hot 1x64 tanh": {"hidden_sizes": [64]},
    "one-hot 2x128 tanh": {"hidden_sizes": [128, 128]},
    "one-hot 2x64 tempered sigmoid": {"activation": "tempered_sigmoid"},
    "one-hot 2x64 relu": {"activation": "relu"},
    "one-hot 2x64 LayerNorm": {"norm": "layernorm"},
    "one-hot 2x64 GroupNorm": {"norm": "groupnorm"},
    "one-hot 2x64 GroupNorm, no bins": {"norm": "groupnorm", "numeric_bins": 0},
    "default, learning_rate 1e-2": {"learning_rate": 1e-2},
    "GroupNorm, learning_rate 1e-2": {"norm": "groupnorm", "learning_rate": 1e-2},
}


def architectures(base: Any, store: Any, key: Any, test_frame: Any,
                  args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, changes in VARIANTS.items():
        scores, loops = [], []
        for run in range(args.accuracy_repeat):
            config = dataclasses.replace(base, train=dataclasses.replace(
                base.train, epsilon=1.0, seed=base.train.seed + run, **changes))
            result, _ = _train(config, store, key, "bookkeeping")
            scores.append(_test_accuracy(result, test_frame))
            loops.append(result.figures["train_seconds"])
            print(f"  variant {label:40s} {scores[-1]:.4f} {loops[-1]:6.2f}s "
                  f"({result.figures['grad_sample_mode']})", file=sys.stderr)
        out[label] = {"accuracy": scores, "mean": statistics.fmean(scores),
                      "min": min(scores), "loop_seconds": min(loops),
                      "grad_sample_mode": result.figures["grad_sample_mode"]}
    return out


def print_architectures(result: dict[str, Any]) -> None:
    print("\nArchitectures at epsilon 1 (test accuracy; loop seconds, best run)")
    print(f"{'variant':40s} {'mean':>7s} {'min':>7s} {'loop s':>7s}  clipping")
    for label, row in result.items():
        print(f"{label:40s} {row['mean']:7.4f} {row['min']:7.4f} {row['loop_seconds']:7.2f}  "
              f"{row['grad_sample_mode']}")


def print_overhead(result: dict[str, Any]) -> None:
    print(f"\nDP overhead, batch {result['batch_size']}, {result['epochs']} epochs, "
          f"{result['repeat']} interleaved runs; ratios against --no-dp: best against best, "
          "and the median of per-run ratios")
    print(f"{'mode':14s} {'loop s':>8s} {'best':>6s} {'median':>7s} {'train() s':>10s} "
          f"{'best':>6s} {'median':>7s}")
    for mode, row in result["modes"].items():
        print(f"{mode:14s} {row['loop_seconds']:8.2f} {row['loop_ratio']:6.2f} "
              f"{row['loop_ratio_paired_median']:7.2f} {row['train_seconds']:10.2f} "
              f"{row['train_ratio']:6.2f} {row['train_ratio_paired_median']:7.2f}")


def print_accuracy(result: dict[str, Any]) -> None:
    print("\nTest accuracy (standard UCI split), delta 1e-5, configs/persona.toml")
    print(f"{'setting':14s} {'mean':>7s} {'min':>7s} {'max':>7s} {'runs':>5s} {'eps reached':>12s}")
    for label, row in result.items():
        reached = row["epsilon_reached"][0]
        reached_text = "-" if reached is None else f"{reached:.3f}"
        print(f"{label:14s} {row['mean']:7.4f} {row['min']:7.4f} {row['max']:7.4f} "
              f"{len(row['accuracy']):5d} {reached_text:>12s}")


if __name__ == "__main__":
    raise SystemExit(main())
