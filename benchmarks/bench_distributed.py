"""DP-SGD in one process and in two (torch.distributed, gloo on CPU): steps per second.

Usage: python benchmarks/bench_distributed.py [--rows N] [--batch-size B] [--epochs E]
                                              [--repeat R] [--json PATH]

Trains PersonaNet (configs/persona.toml's columns and "auto" settings for N rows) on a
synthetic encoded set of N rows (default 1,000,000), with the code `personanet train`
runs: `make_private` / `make_plain` (Opacus' distributed sampler and optimizer in two
processes), `run_epochs`, one thread per process. Four cases, interleaved, best of
`--repeat`: DP and no-DP (the same Poisson batches, no clipping or noise), in 1 and
in 2 processes. Each worker reports its loop's steps per second (the `train_seconds`
figure: batches, forward, backward, clipping, noise, the gradients' all-reduce,
optimizer steps; not reading, encoding, calibration or files).

Printed side by side from one run: 2-process / 1-process speed-up, with DP and
without, and the DP / no-DP time ratio in each. On a machine shared with other work
the absolute figures are noise; the ratios measured in one run are the figures.
The nccl path (CUDA, one process per GPU) is the same code with another backend and
is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(rows: int, batch_size: int, epochs: int, private: bool) -> dict[str, Any]:
    """One process of a run (WORLD_SIZE/RANK in the environment for two)."""
    import dataclasses

    import numpy as np
    import torch

    from personanet.config import load_config
    from personanet.models import get_family
    from personanet.models.encoding import EncodedBatch, Encoder
    from personanet.training.defaults import resolve_train_config
    from personanet.training.distributed import World, joined
    from personanet.training.loop import TrainHistory, make_loader, make_optimizer, run_epochs
    from personanet.training.private import make_plain, make_private

    torch.set_num_threads(1)
    config = load_config(ROOT / "configs" / "persona.toml",
                         [f"train.epochs={epochs}", f"train.batch_size={batch_size}",
                          "budget.epsilon=1000"])
    cfg, _ = resolve_train_config(dataclasses.replace(config.train, batch_size=batch_size),
                                  n_train_rows=rows)
    config = dataclasses.replace(config, train=cfg)
    encoder = Encoder.from_config(config)
    rng = np.random.default_rng(2026)  # the same rows on every rank, as read from one file
    categorical = np.stack([rng.integers(0, c, rows) for c in encoder.cardinalities], 1)
    numeric = rng.random((rows, encoder.n_numeric), dtype=np.float32)
    target = (numeric[:, 0] + 0.3 * (categorical[:, 0] % 2) + rng.normal(0, .2, rows) > .8)
    data = EncodedBatch(categorical.astype(np.int64), numeric, target.astype(np.int64))
    world = World.from_env()
    device = torch.device("cpu")
    with joined(world, "cpu"):
        family = get_family("tabular")
        torch.manual_seed(cfg.seed)
        model = family.build(family.spec_for(encoder, cfg))
        loader = make_loader(data, batch_size=cfg.batch_size, device=device, private=private,
                             seed=cfg.seed)
        optimizer = make_optimizer(model, cfg)
        if private:
            run = make_private(model, optimizer, loader, config, family=family,
                               task=encoder.task, device=device, checkpoint=None)
        else:
            run = make_plain(model, optimizer, loader, config, family=family)
        history = TrainHistory()
        run_epochs(run, family.loss(encoder.task, reduction="none"), history, cfg.epochs,
                   save=lambda epoch: None)
    return {"steps": run.steps, "seconds": history.train_seconds,
            "steps_per_second": run.steps / history.train_seconds,
            "noise_multiplier": run.noise_multiplier, "sample_rate": run.sample_rate,
            "epsilon": run.epsilon(final=True) if private else None,
            "loss": history.loss_curve[-1]}


def run_case(processes: int, private: bool, args: argparse.Namespace) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, __file__, "--worker", "--rows", str(args.rows),
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    if not private:
        command.append("--no-dp")
    children = []
    for rank in range(processes):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if processes > 1:
            env.update(WORLD_SIZE=str(processes), RANK=str(rank), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        children.append(subprocess.Popen(command, env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for child in children:
        out, err = child.communicate()
        if child.returncode:
            raise SystemExit(f"worker failed ({child.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results[0]  # every rank took the same steps; rank 0's clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-dp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rows, args.batch_size, args.epochs, not args.no_dp)))
        return 0

    cases = [(p, dp) for p in (1, 2) for dp in (True, False)]
    best: dict[tuple[int, bool], dict[str, Any]] = {}
    began = time.perf_counter()
    for attempt in range(args.repeat):
        for case in cases if attempt % 2 == 0 else reversed(cases):
            result = run_case(*case, args)
            print(f"  {case[0]} process(es) {'DP' if case[1] else 'no-DP'}: "
                  f"{result['steps']} steps, {result['steps_per_second']:.1f} steps/s",
                  file=sys.stderr)
            if case not in best or result["seconds"] < best[case]["seconds"]:
                best[case] = result
    speed = {case: r["steps_per_second"] for case, r in best.items()}
    figures = {
        "rows": args.rows, "batch_size": args.batch_size, "epochs": args.epochs,
        "repeat": args.repeat, "cpus": os.cpu_count(), "seconds_total": time.perf_counter() - began,
        "steps": best[(1, True)]["steps"],
        "steps_per_second": {f"{p}proc_{'dp' if dp else 'nodp'}": round(s, 2)
                             for (p, dp), s in speed.items()},
        "speedup_2_vs_1_dp": round(speed[(2, True)] / speed[(1, True)], 3),
        "speedup_2_vs_1_nodp": round(speed[(2, False)] / speed[(1, False)], 3),
        "dp_over_nodp_time_1proc": round(speed[(1, False)] / speed[(1, True)], 3),
        "dp_over_nodp_time_2proc": round(speed[(2, False)] / speed[(2, True)], 3),
        "same_privacy": all(best[(2, True)][k] == best[(1, True)][k]
                            for k in ("steps", "noise_multiplier", "sample_rate", "epsilon")),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
