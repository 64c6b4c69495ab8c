"""Latency and throughput of `personanet serve` against the bare model forward.

Usage: python benchmarks/bench_serve.py [--rows N] [--single R] [--batch B] [--requests Q]
                                        [--clients C]

Trains a small private model once (the first N records of the bundled sample, 1
epoch, into a temporary store, gates relaxed so that it may serve), starts
`personanet serve` on a free loopback port in a child process, then, bounded
(a fixed number of requests; it stops by itself):

* single: R sequential requests of one record each: p50 and p99 latency, client side
  (HTTP, JSON, token check, clean's rules, pseudonyms, the forward);
* batch: C concurrent clients sending Q requests of B records in all: records per second;
* bare: the same model's forward on the already encoded tensor, in this process:
  one record (p50, p99) and batches of B (records per second from the median batch),
  the floor.

Nothing leaves the machine: the server listens on 127.0.0.1 only. The temporary
store and the sample subset are removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "persona.toml"
SAMPLE = ROOT / "data" / "persona.csv.gz"
TOKEN = "bench-token-" + os.urandom(16).hex()


def settings(source: Path) -> list[str]:
    """--set overrides: the subset as source, a short run, gates that a small run passes."""
    pairs = [f"dataset.source={json.dumps(str(source))}", "train.epochs=1",
             "train.batch_size=256", "train.learning_rate=0.01", "evaluate.bootstrap=20",
             "evaluate.min_accuracy=0.0"]
    return [word for pair in pairs for word in ("--set", pair)]


def subset(folder: Path, rows: int) -> tuple[Path, list[dict[str, str]]]:
    """The first records of the sample, a quarter of them from its test split."""
    wanted = {"train": rows - rows // 4, "test": rows // 4}
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as fh:
        lines = [fh.readline()]
        for line in fh:
            split = line.rstrip("\n").rsplit(",", 1)[-1]
            if wanted.get(split, 0) > 0:
                wanted[split] -= 1
                lines.append(line)
    path = folder / "persona_subset.csv"
    path.write_text("".join(lines), encoding="utf-8")
    return path, list(csv.DictReader(io.StringIO("".join(lines))))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def start_server(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "personanet", *args, "serve", "--port",
                                str(port), "--max-batch", "10000", "--max-body", "100000000"],
                               env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz",
                                             headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(request, timeout=5).close()
            return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def bare_forward(config_args: list[str], root: Path, key_b64: str, records: list[dict],
                 single: int, batch: int, requests: int) -> dict[str, float]:
    """The served model's forward alone, on records already cleaned and encoded."""
    import polars as pl
    import torch

    from personanet.cleaning.rows import prepare_rows
    from personanet.config import load_config
    from personanet.models import family_of
    from personanet.privacy.pseudonym import pseudonym_key
    from personanet.serving.scorer import Scorer, select_model
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

    overrides = [config_args[i + 1] for i in range(0, len(config_args), 2)]
    config = load_config(CONFIG, overrides)
    key = MasterKey.from_base64(key_b64)
    store = ArtifactStore(root, config.dataset.name)
    artifact, info = select_model(config, store, key)
    scorer = Scorer(config, artifact, info, key)
    frame = pl.DataFrame(records[:batch], schema=dict.fromkeys(records[0], pl.String))
    prepared = prepare_rows(frame, config, pseudonym_key(key), require_target=False).frame
    family = family_of(scorer.model)
    inputs = family.inputs(scorer.encoder.transform(prepared).tensors(torch.device("cpu")))
    one = {name: tensor[:1] for name, tensor in inputs.items()}
    with torch.inference_mode():
        times = [timed(scorer.model.predict, one) for _ in range(single)]
        # The median batch: a whole loop of sub-millisecond calls on a shared machine is
        # at the mercy of one preemption, which would say nothing about the forward.
        batch_times = [timed(scorer.model.predict, inputs) for _ in range(requests)]
    return {"p50_ms": percentile(times, 0.5) * 1000, "p99_ms": percentile(times, 0.99) * 1000,
            "records_per_s": len(prepared) / statistics.median(batch_times)}


def timed(forward: Callable[..., object], inputs: dict) -> float:
    started = time.perf_counter()
    forward(**inputs)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--single", type=int, default=500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    from personanet.cli import run_cli
    from personanet.store.keys import MasterKey

    key_b64 = MasterKey.generate().to_base64()
    env = {**os.environ, "PERSONANET_KEY": key_b64, "PERSONANET_SERVE_TOKEN": TOKEN}
    env.pop("PERSONANET_KEY_FILE", None)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        source, records = subset(folder, args.rows)
        config_args = settings(source)
        base = ["--quiet", "--config", str(CONFIG), "--artifacts", str(folder / "artifacts"),
                *config_args]
        os.environ.update(PERSONANET_KEY=key_b64)
        os.environ.pop("PERSONANET_KEY_FILE", None)
        for stage in ("collect", "clean", "train", "evaluate"):
            if run_cli([*base, stage]) != 0:
                raise SystemExit(f"{stage} failed")
        bare = bare_forward(config_args, folder / "artifacts", key_b64, records, args.single,
                            args.batch, args.requests)
        process, port = start_server(base, env, folder)
        try:
            post(port, records[0])  # the first request pays for lazy imports
            latencies = []
            for i in range(args.single):
                started = time.perf_counter()
                post(port, records[i % len(records)])
                latencies.append(time.perf_counter() - started)
            batch = {"records": records[:args.batch]}
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(lambda _: post(port, batch), range(args.requests)))
            elapsed = time.perf_counter() - started
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    scored = sum(len(a["predictions"]) for a in answers)
    served = {"p50_ms": percentile(latencies, 0.5) * 1000,
              "p99_ms": percentile(latencies, 0.99) * 1000, "records_per_s": scored / elapsed}
    print(f"single record, {args.single} sequential requests:")
    print(f"  serve  p50 {served['p50_ms']:7.2f} ms   p99 {served['p99_ms']:7.2f} ms")
    print(f"  bare   p50 {bare['p50_ms']:7.3f} ms   p99 {bare['p99_ms']:7.3f} ms  (forward only)")
    print(f"batches of {args.batch}, {args.requests} requests, {args.clients} concurrent clients:")
    print(f"  serve  {served['records_per_s']:10,.0f} records/s")
    print(f"  bare   {bare['records_per_s']:10,.0f} records/s  (forward only, one thread)")
    print(f"  ratio  {bare['records_per_s'] / served['records_per_s']:.1f}x")
    print(json.dumps({"serve": served, "bare": bare, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
