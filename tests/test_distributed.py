"""Training in several processes (torchrun, gloo on CPU): the same DP-SGD as one process.

Each test starts real processes with real gloo collectives, real Opacus and real files:

- the clipped sums of the ranks are summed and noised once (book-keeping clipper and
  Opacus' distributed optimizer), and every rank takes every step, empty batches too;
- `personanet train --nproc-per-node 2` trains replicas that end identical, with the
  noise, sample rate, steps and epsilon of a single-process run;
- a rank other than 0 writes nothing under the artifact root;
- a killed rank fails the other within 60 s, the reservation stays counted, and
  `train --resume` finishes the run in another world size.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_subprocess, write_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank_env(rank: int, size: int, port: int, **extra: str) -> dict[str, str]:
    """The environment torchrun gives a worker (and nothing of the test runner's ranks)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE=str(size), RANK=str(rank), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), **extra)
    return env


def _python(code: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# ----------------------------------------------------------------- one DP step, two ranks

_STEP = r"""
import json, sys, torch, torch.distributed as dist
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from personanet.privacy import BookkeepingClipper
from personanet.training import distributed

rank, size = RANK, SIZE
if size > 1:
    dist.init_process_group("gloo", rank=rank, world_size=size)
x, y = torch.randn(40, 6, generator=torch.Generator().manual_seed(1)) * 3, torch.arange(40) % 2
out = {}
for mode in ("exact", "empty", "noise"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 2))
    mine = torch.arange(40) if size == 1 else torch.arange(rank, 40, size)
    if mode == "empty":  # rank 1's Poisson batch came out empty; alone: rank 0's rows
        mine = mine[:0] if rank == 1 else torch.arange(0, 40, 2)
    engine = PrivacyEngine(accountant="rdp")
    _, optimizer, _, loader = engine.make_private(
        module=distributed.wrap_for_dp(model),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0), criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=1.0 if mode == "noise" else 0.0, max_grad_norm=0.5,
        grad_sample_mode="ghost", wrap_model=False, poisson_sampling=True)
    distributed.keep_empty_batches(loader)
    clipper = BookkeepingClipper(model, max_grad_norm=0.5)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    optimizer.zero_grad(set_to_none=True)
    clipper.backward(nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="none"))
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out[mode] = {"update": (after - before).tolist(), "steps_seen": sum(1 for _ in loader),
                 "loader_steps": len(loader), "expected": optimizer.expected_batch_size,
                 "rate": loader.sample_rate}
from opacus.data_loader import DPDataLoader
tiny = DPDataLoader.from_data_loader(DataLoader(TensorDataset(x[:10], y[:10]), batch_size=1),
                                     distributed=size > 1)
distributed.keep_empty_batches(tiny)  # q = 0.1 over 5 rows: most local batches are empty
out["tiny"] = {"steps_seen": sum(1 for _ in tiny), "loader_steps": len(tiny)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """One DP step per mode, in one process and in two (all started at once)."""
    tmp_path = tmp_path_factory.mktemp("steps")
    port = _free_port()
    procs = {size: [_python(_STEP.replace("RANK, SIZE", f"{rank}, {size}"),
                            _rank_env(rank, size, port), tmp_path) for rank in range(size)]
             for size in (1, 2)}
    results: dict[int, list[dict]] = {}
    for size, ranks in procs.items():
        results[size] = []
        for proc in ranks:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            results[size].append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_clipped_sums_of_the_ranks_are_summed_and_a_rank_with_an_empty_batch_steps(
        steps: dict[int, list[dict]]) -> None:
    import torch

    for mode in ("exact", "empty"):
        one = torch.tensor(steps[1][0][mode]["update"])
        two = [torch.tensor(rank[mode]["update"]) for rank in steps[2]]
        # the same update on both ranks as in one process over the same rows
        assert torch.equal(two[0], two[1]), mode
        assert torch.allclose(two[0], one, atol=1e-6), (mode, float((two[0] - one).abs().max()))


def test_noise_is_added_once_per_step_and_the_loader_keeps_every_step(
        steps: dict[int, list[dict]]) -> None:
    import torch

    exact = torch.tensor(steps[2][0]["exact"]["update"])
    noisy = [rank["noise"] for rank in steps[2]]
    assert noisy[0]["update"] == noisy[1]["update"]  # one noise, on every replica
    # update = -(clipped sum + N(0, (sigma C)^2)) / expected batch: noise from one rank
    # has std 1 in units of sigma*C/E; from both ranks it would be sqrt(2).
    expected = noisy[0]["expected"] * 2
    assert expected == steps[1][0]["noise"]["expected"] == 8
    spread = float(((torch.tensor(noisy[0]["update"]) - exact) * expected / 0.5).std())
    assert 0.9 < spread < 1.15, spread
    for rank in noisy:  # Opacus' sampler skips a rank's empty batches; ours keeps the step
        assert rank["steps_seen"] == rank["loader_steps"] == 5
        assert rank["rate"] == pytest.approx(1 / 5)
    for rank in steps[2]:
        assert rank["tiny"]["steps_seen"] == rank["tiny"]["loader_steps"] == 10


# ----------------------------------------------------------------- the command

#: installed in every worker through PYTHONPATH: a rank other than 0 that opens a file
#: under the artifact root for writing, or renames, removes or creates anything there,
#: fails on the spot (and says so in the log)
_NO_WRITES = r'''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("DIST_TEST_ROOT"):
    root = os.path.realpath(os.environ["DIST_TEST_ROOT"])
    log = os.environ["DIST_TEST_LOG"]
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    CHANGES = ("os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir",
               "shutil.rmtree", "os.truncate", "os.chmod", "os.link", "os.symlink", "os.utime")

    def under(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if event == "open" and args and not isinstance(args[0], int):
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            bad = under(args[0]) and bool(flags & WRITE or set(mode) & set("wax+"))
        elif event in CHANGES:
            bad = any(under(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))
        else:
            return
        if bad:
            with open(log, "a") as fh:
                fh.write(f"WRITE {event} {args[:2]}\n")
            raise PermissionError(f"rank {os.environ['RANK']} wrote under the root: {args[:2]}")

    sys.addaudithook(hook)
    with open(log, "a") as fh:
        fh.write(f"watching rank {os.environ['RANK']}\n")
'''


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, small_lines: str) -> dict:
    """A store with a clean artifact and a single-process private run of 2 epochs."""
    from personanet.cli import run_cli
    from personanet.store.keys import MasterKey

    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "people.csv").write_text(small_lines)
    key_file = tmp / "key"
    key_file.write_text(MasterKey.generate().to_base64())
    key_file.chmod(0o600)
    # batch 2 of 300 rows: q = 1/150, so a rank's shard of 150 rows comes out empty at
    # about one step in three, which every rank must still take
    config = write_config(tmp / "persona.toml", tmp / "people.csv", overrides=(
        "[train]\nepochs = 2\nbatch_size = 2\n[budget]\nepsilon = 100\n"))
    root = tmp / "artifacts"
    saved = {k: os.environ.get(k) for k in ("PERSONANET_KEY_FILE", "PERSONANET_KEY")}
    os.environ.pop("PERSONANET_KEY", None)
    os.environ["PERSONANET_KEY_FILE"] = str(key_file)
    try:
        base = ["--config", str(config), "--artifacts", str(root), "--quiet"]
        assert run_cli([*base, "collect"]) == 0
        assert run_cli([*base, "clean"]) == 0
        single = _one_run(run_cli, [*base, "--json", "train"])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return {"tmp": tmp, "config": config, "root": root, "key_file": key_file,
            "single": single}


@pytest.fixture(scope="module")
def small_lines() -> str:
    from tests.conftest import sample_lines

    return sample_lines(300, split="train") + sample_lines(100, split="test").split("\n", 1)[1]


def _one_run(run_cli, argv: list[str]) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli(argv)
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue().strip().splitlines()[-1])


def _weights_sha256(model_file: Path) -> str:
    """`check_replicas`' digest of a committed model."""
    import hashlib

    from safetensors.torch import load_file

    weights = load_file(str(model_file))
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_processes_train_identical_replicas_under_the_single_process_privacy(
        store: dict) -> None:
    hooks = store["tmp"] / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_NO_WRITES)
    watch = store["tmp"] / "writes.log"
    env = {"PERSONANET_KEY_FILE": str(store["key_file"]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "DIST_TEST_ROOT": str(store["root"]),
           "DIST_TEST_LOG": str(watch), "PERSONANET_DIST_TIMEOUT": "60"}
    result = run_subprocess(["--config", str(store["config"]), "--artifacts", str(store["root"]),
                             "--json", "--debug", "train", "--force", "--nproc-per-node", "2"],
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # rank 0 alone prints the result
    two, one = json.loads(lines[0]), store["single"]
    assert two["processes"] == 2 and "processes" not in one
    for name in ("sample_rate", "steps", "epochs", "accountant", "train_rows",
                 "grad_sample_mode"):
        assert two[name] == one[name], name
    # The workers run under another BLAS thread count (OMP_NUM_THREADS=1), which may move
    # the last bits of the calibration's and PRV's float sums; anything coarser is a change.
    assert two["noise_multiplier"] == pytest.approx(one["noise_multiplier"], rel=1e-12)
    assert two["epsilon"] == pytest.approx(one["epsilon"], rel=1e-8)
    privacy = [json.loads((Path(r["path"]) / "privacy.json").read_text()) for r in (one, two)]
    assert privacy[0]["expected_batch_size"] == privacy[1]["expected_batch_size"]
    histories = [[float(x) for entry in p["accountant_history"] for x in entry] for p in privacy]
    assert histories[1] == pytest.approx(histories[0], rel=1e-12)
    # both replicas ended with the committed weights, to the bit
    digests = {rank: digest for digest, rank
               in re.findall(r"replica weights sha256 (\w+) \(rank (\d)\)", result.stderr)}
    assert set(digests) == {"0", "1"}, result.stderr[-2000:]
    assert set(digests.values()) == {_weights_sha256(Path(two["path"]) / "model.safetensors")}
    # rank 1 was watched, and wrote nothing under the root
    assert watch.read_text() == "watching rank 1\n"
    ledger = json.loads((store["root"] / "persona" / "budget.json").read_text())
    settled = {e["run_id"]: e["status"] for e in ledger["entries"]}
    assert settled[one["run_id"]] == settled[two["run_id"]] == "settled"


def test_a_killed_rank_stops_the_run_within_60_s_and_resume_finishes_it_alone(
        store: dict) -> None:
    from personanet.cli import run_cli

    config = write_config(store["tmp"] / "long.toml", store["tmp"] / "people.csv", overrides=(
        "[train]\nepochs = 60\nbatch_size = 64\n[budget]\nepsilon = 100\n"))
    argv = ["--config", str(config), "--artifacts", str(store["root"]), "--quiet"]
    port = _free_port()
    env = {"PERSONANET_KEY_FILE": str(store["key_file"])}
    ranks = [subprocess.Popen([sys.executable, "-m", "personanet", *argv, "train"],
                              env=_rank_env(rank, 2, port, **env), cwd=store["tmp"],
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in range(2)]
    try:
        checkpoints = store["root"] / "persona" / "checkpoints"
        deadline = time.monotonic() + 180
        while not list(checkpoints.glob("*/epoch-*")):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "no checkpoint"
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert ranks[0].returncode == 75, err[-2000:]
    assert "--resume" in err
    run_id = next(checkpoints.glob("*/epoch-*")).parent.name
    ledger = json.loads((store["root"] / "persona" / "budget.json").read_text())
    entry = next(e for e in ledger["entries"] if e["run_id"] == run_id)
    assert entry["status"] == "reserved" and entry["epsilon"] == 1.0 and entry["steps"] > 0
    # the same run goes on in one process, under the same reservation, to the planned epsilon
    saved = os.environ.get("PERSONANET_KEY_FILE")
    os.environ["PERSONANET_KEY_FILE"] = str(store["key_file"])
    try:
        resumed = _one_run(run_cli, [*argv, "--json", "train", "--resume"])
    finally:
        if saved is None:
            os.environ.pop("PERSONANET_KEY_FILE")
        else:
            os.environ["PERSONANET_KEY_FILE"] = saved
    assert resumed["resumed"] is True and resumed["run_id"] == run_id
    assert resumed["steps"] == 60 * 5 and resumed["epsilon"] <= 1.0
    ledger = json.loads((store["root"] / "persona" / "budget.json").read_text())
    assert next(e for e in ledger["entries"] if e["run_id"] == run_id)["status"] == "settled"


# ----------------------------------------------------------------- flags and environment


def test_the_world_comes_from_torchrun_s_environment() -> None:
    from personanet.errors import ConfigError
    from personanet.training.distributed import World

    assert World.from_env({}) is None
    assert World.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # one process
    assert World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(ConfigError):
        World.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_launcher_flags_are_checked_and_workers_get_no_key_on_their_command_line(
        cli, key_env, small_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import personanet.training.launcher as launcher

    seen: dict = {}
    real = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda argv, **kw: seen.update(argv=argv, **kw))
    assert cli("--config", small_config, "train", "--nnodes", "2").code == 2
    assert cli("--config", small_config, "train", "--nproc-per-node", "2", "--nnodes", "2",
               "--rdzv-endpoint", "10.0.0.1:29500", "--node-rank", "1", "--resume",
               "--set", "train.epochs=1").code == 0
    assert seen["nproc_per_node"] == 2 and seen["nnodes"] == 2 and seen["node_rank"] == 1
    argv = seen["argv"]
    assert argv[argv.index("--config") + 1] == str(small_config.resolve())
    assert argv[argv.index("train"):] == ["train", "--resume"]
    assert "train.epochs=1" in argv
    assert key_env.to_base64() not in " ".join(argv)
    monkeypatch.setattr(launcher, "launch", real)
    result = cli("--config", small_config, "train", "--nproc-per-node", "2", "--nnodes", "2")
    assert result.code == 78 and "--rdzv-endpoint" in result.stderr


def test_person_level_in_two_processes_keeps_the_single_process_plan_and_replicas(
        tmp_path: Path) -> None:
    """k rows a person, clipped as one: the loader is over people, so each rank samples
    its shard of people; the plan and epsilon are those of one process, the replicas
    end identical, and privacy.json counts the same people."""
    from personanet.store.keys import MasterKey
    from tests.test_person_level import panel_csv

    key_file = tmp_path / "key"
    key_file.write_text(MasterKey.generate().to_base64())
    key_file.chmod(0o600)
    config = write_config(tmp_path / "panel.toml", panel_csv(tmp_path / "panel.csv"),
                          overrides=("[clean]\nmax_rows_per_unit = 6\n"
                                     "dedupe_key = [\"email\", \"collected_at\"]\n"
                                     "[train]\nepochs = 1\nbatch_size = 16\n"
                                     "[budget]\nepsilon = 100\n"))
    env = {"PERSONANET_KEY_FILE": str(key_file), "OMP_NUM_THREADS": "1",
           "PERSONANET_DIST_TIMEOUT": "60"}
    base = ["--config", str(config), "--artifacts", str(tmp_path / "root")]
    for stage in ("collect", "clean"):
        assert run_subprocess([*base, stage], env=env, timeout=120).returncode == 0
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc-per-node", "2"])):
        result = run_subprocess([*base, "--json", "--debug", "train", "--force", *extra],
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (json.loads(result.stdout.strip().splitlines()[-1]), result.stderr)
    (one, _), (two, err) = runs["one"], runs["two"]
    assert two["processes"] == 2
    for name in ("sample_rate", "steps", "train_rows"):
        assert two[name] == one[name], name
    assert two["noise_multiplier"] == pytest.approx(one["noise_multiplier"], rel=1e-12)
    assert two["epsilon"] == pytest.approx(one["epsilon"], rel=1e-8)
    levels = [json.loads((Path(r["path"]) / "privacy.json").read_text())["unit_level"]
              for r in (one, two)]
    assert levels[0] == levels[1] and levels[0]["level"] == "person"
    assert levels[0]["rows_per_unit"] == 6 and levels[0]["people"] < one["train_rows"]
    digests = {rank: digest for digest, rank
               in re.findall(r"replica weights sha256 (\w+) \(rank (\d)\)", err)}
    assert set(digests) == {"0", "1"}, err[-2000:]
    assert set(digests.values()) == {_weights_sha256(Path(two["path"]) / "model.safetensors")}
