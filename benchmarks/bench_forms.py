"""Benchmark: the image model (cnn) on the bundled forms sample, through train's own code.

The bundled forms sample (data/forms: 5,000 MNIST digits, the fixed stratified 4,000 /
1,000 split of its `split` column) trained with `personanet.training` exactly as `train`
does (the cnn family, Opacus' Poisson sampler, calibrated noise, the clipping path the
config picks, the loop), without the artifact store around it; accuracy on the 1,000 test
images. All 4,000 training images are trained on (`train` itself holds out
``validation_fraction`` of them).

Prints three tables:

1. accuracy at epsilon 1, 3, 8 (delta 1e-5) and without DP, per preset;
2. augmentation multiplicity: K = 1 against K at epsilon 3 (same runs otherwise);
3. seconds per epoch of the default CNN: no DP, book-keeping clipping, Opacus' hooks,
   Opacus' two-pass ghost clipping, side by side in one process, as ratios to no DP.

Usage (one thread: the machine is shared):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_forms.py --only accuracy --epochs 30 \
        --runs 3 --presets tanh
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_forms.py --only accuracy --epochs 30 \
        --runs 3 --presets seed --lr 0.003
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_forms.py --only timing
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "forms.toml"
MANIFEST = ROOT / "data" / "forms" / "manifest.csv"
REFERENCE = {1.0: 0.851, 3.0: 0.924, 8.0: 0.942}


def load_forms() -> dict[str, Any]:
    """The sample's images (float32 (n, 1, 28, 28) in [0, 1]), labels and split."""
    from PIL import Image

    images, labels, test = [], [], []
    with MANIFEST.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            with Image.open(MANIFEST.parent / row["image"]) as img:
                images.append(np.asarray(img, dtype=np.uint8))
            labels.append(int(row["label"]))
            test.append(row["split"] == "test")
    x = np.stack(images)[:, None].astype(np.float32) / 255.0
    y, is_test = np.asarray(labels, dtype=np.int64), np.asarray(test)
    return {"train": (x[~is_test], y[~is_test]), "test": (x[is_test], y[is_test])}


def train_once(data: dict[str, Any], *, preset: str, epsilon: float | None, epochs: int,
               seed: int, extra: list[str] | None = None) -> dict[str, float]:
    """One run; accuracy on the test images and seconds per epoch."""
    import torch

    from personanet.config import load_config
    from personanet.models import get_family
    from personanet.models.image_encoding import ImageBatch
    from personanet.training.augment import augmentation_for
    from personanet.training.image_defaults import resolve_image_train_config
    from personanet.training.loop import TrainHistory, make_loader, make_optimizer, run_epochs
    from personanet.training.private import make_plain, make_private

    overrides = [f"train.preset={preset}", f"train.epochs={epochs}", f"train.seed={seed}",
                 f"train.epsilon={epsilon or 1.0}", *(extra or [])]
    config = load_config(CONFIG, overrides)
    x, y = data["train"]
    cfg, _ = resolve_image_train_config(config.train, n_train_rows=len(y))
    config = type(config)(**{**config.__dict__, "train": cfg})
    family = get_family("cnn")
    torch.manual_seed(seed)
    encoder = family.encoder(config)
    model = family.build(family.spec_for(encoder, cfg))
    loss_fn = family.loss(encoder.task, reduction="none")
    optimizer = make_optimizer(model, cfg)
    private = epsilon is not None
    loader = make_loader(ImageBatch(x, y), batch_size=cfg.batch_size,
                         device=torch.device("cpu"), private=private, seed=seed)
    if private:
        run = make_private(model, optimizer, loader, config, family=family, task=encoder.task,
                           device=torch.device("cpu"), checkpoint=None)
    else:
        run = make_plain(model, optimizer, loader, config, family=family)
    run.augment = augmentation_for(cfg, private=private)
    history = TrainHistory()
    run_epochs(run, loss_fn, history, epochs, save=lambda epoch: None)
    model.eval()
    xt, yt = data["test"]
    with torch.no_grad():
        predicted = model(torch.as_tensor(xt)).argmax(1).numpy()
    return {"accuracy": float((predicted == yt).mean()),
            "epoch_seconds": history.train_seconds / epochs, "mode": run.grad_sample_mode or "-"}


def accuracy_table(data: dict[str, Any], *, presets: list[str], epsilons: list[float | None],
                   epochs: int, runs: int, extra: list[str]) -> None:
    print(f"\naccuracy, {len(data['train'][1])} train / {len(data['test'][1])} test, delta "
          f"1e-5, {epochs} epochs, mean of {runs} run(s) (min-max)")
    print(f"{'preset':8} {'epsilon':>8} {'accuracy':>9} {'range':>13} {'ref':>6} "
          f"{'s/epoch':>8} mode")
    for preset in presets:
        for epsilon in epsilons:
            results = []
            for seed in range(runs):
                results.append(train_once(data, preset=preset, epsilon=epsilon, epochs=epochs,
                                          seed=seed, extra=extra))
                # one line per run, so that a run cut short still leaves its finished runs
                print(f"  run seed={seed}: accuracy {results[-1]['accuracy']:.3f}, "
                      f"{results[-1]['epoch_seconds']:.2f} s/epoch", flush=True)
            acc = [r["accuracy"] for r in results]
            ref = REFERENCE.get(epsilon or 0.0)
            print(f"{preset:8} {'no DP' if epsilon is None else f'{epsilon:g}':>8} "
                  f"{statistics.mean(acc):9.3f} {min(acc):6.3f}-{max(acc):.3f} "
                  f"{'' if ref is None else f'{ref:.3f}':>6} "
                  f"{statistics.mean(r['epoch_seconds'] for r in results):8.2f} "
                  f"{results[0]['mode']}", flush=True)


def augment_table(data: dict[str, Any], *, multiplicity: int, epochs: int, runs: int) -> None:
    print(f"\naugmentation at epsilon 3, tanh preset, {epochs} epochs, {runs} run(s)")
    rows = [("none", ["train.augment=false"]),
            ("K=1", ["train.augment=true", "train.augment_multiplicity=1"]),
            (f"K={multiplicity}", ["train.augment=true",
                                   f"train.augment_multiplicity={multiplicity}"])]
    for name, extra in rows:
        results = [train_once(data, preset="tanh", epsilon=3.0, epochs=epochs, seed=seed,
                              extra=extra) for seed in range(runs)]
        acc = [r["accuracy"] for r in results]
        print(f"{name:6} accuracy {statistics.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})  "
              f"{statistics.mean(r['epoch_seconds'] for r in results):.2f} s/epoch  "
              f"{results[0]['mode']}", flush=True)


def timing_table(data: dict[str, Any], *, epochs: int) -> None:
    print(f"\nseconds per epoch, tanh preset, epsilon 3, {epochs} epoch(s) each, one process")
    paths = [("no DP", None, []),
             ("book-keeping", 3.0, ["train.grad_sample_mode=ghost", "train.bookkeeping=true"]),
             ("Opacus hooks", 3.0, ["train.grad_sample_mode=hooks"]),
             ("Opacus ghost", 3.0, ["train.grad_sample_mode=ghost", "train.bookkeeping=false"]),
             ("hooks, K=4", 3.0, ["train.augment=true", "train.augment_multiplicity=4"])]
    base = None
    for name, epsilon, extra in paths:
        began = time.perf_counter()
        result = train_once(data, preset="tanh", epsilon=epsilon, epochs=epochs, seed=0,
                            extra=extra)
        seconds = result["epoch_seconds"]
        base = base or seconds
        print(f"{name:14} {seconds:7.2f} s/epoch  x{seconds / base:5.2f} of no DP  "
              f"(mode {result['mode']}, {time.perf_counter() - began:.0f} s in all)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--multiplicity", type=int, default=4)
    parser.add_argument("--presets", default="tanh,seed")
    parser.add_argument("--epsilons", default="1,3,8,none")
    parser.add_argument("--only", choices=["accuracy", "augment", "timing"], default=None)
    parser.add_argument("--timing-epochs", type=int, default=3)
    parser.add_argument("--lr", default="auto", help="Adam's learning rate (auto: 5e-3)")
    args = parser.parse_args()
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("personanet").setLevel(logging.ERROR)  # the per-run notices
    data = load_forms()
    epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    if args.only in (None, "timing"):
        timing_table(data, epochs=args.timing_epochs)
    if args.only in (None, "accuracy"):
        accuracy_table(data, presets=args.presets.split(","), epsilons=epsilons,
                       epochs=args.epochs, runs=args.runs,
                       extra=[f"train.learning_rate={args.lr}"])
    if args.only in (None, "augment"):
        augment_table(data, multiplicity=args.multiplicity, epochs=args.epochs, runs=args.runs)


if __name__ == "__main__":
    main()
