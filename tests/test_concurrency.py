"""Concurrency (README: Artifacts): one writer at a time per artifact root.

Four real `python -m personanet run` processes start together on one artifact root.
With a long --lock-timeout they serialize (all exit 0); with a short one the losers give
up with exit 75 (a cron job's "retry later"). Either way nothing is corrupted: `artifacts
verify` passes, every artifact reads back, budget.json is a valid ledger whose totals are
the sum of its runs, and identical work is never done twice unless forced.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from personanet.config import Config, load_config
from personanet.stages.predict import read_predictions
from personanet.store import crypto
from personanet.store.artifacts import STAGES, ArtifactStore
from personanet.store.keys import MasterKey
from tests.conftest import run_subprocess, write_config
from tests.test_crash_safety import (
    TINY_RUN,
    assert_ledger_consistent,
    assert_no_incomplete_artifact_visible,
    verify_cli,
)

RUNS = 4


def run_together(config_path: Path, root: Path, *, lock_timeout: float,
                 extra: list[list[str]], command: str = "run") -> list[tuple[int, dict, str]]:
    """Start `command` RUNS times at once (`extra[i]`: more options for run i); wait for all.

    Returns (exit code, the one JSON object printed on stdout, stderr) per run.
    """
    procs = [
        subprocess.Popen([sys.executable, "-m", "personanet", "--config", str(config_path),
                          "--artifacts", str(root), "--lock-timeout", str(lock_timeout),
                          "--json", command, *extra[i]],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(RUNS)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one JSON object on stdout, got {out!r}\n{err}"
        results.append((proc.returncode, json.loads(lines[0]), err))
    return results


def assert_store_sound(config_path: Path, config: Config, store: ArtifactStore,
                       key: MasterKey) -> list[dict]:
    """No corruption: verify passes, every artifact reads back, the ledger adds up."""
    verified = verify_cli(config_path, store.root)
    assert verified.returncode == 0, verified.stderr
    assert_no_incomplete_artifact_visible(store)
    for stage in STAGES:
        for artifact in store.versions(stage):
            for out in artifact.manifest["outputs"]:
                path = artifact.path / out["name"]
                if out["encrypted"]:
                    crypto.read_encrypted_file(path, key)
                elif path.suffix == ".json":
                    json.loads(path.read_text("utf-8"))
            if stage == "predict":
                assert read_predictions(artifact, key).height == artifact.figures["rows_scored"]
    entries = assert_ledger_consistent(store, config)

    shown = run_subprocess(["--config", str(config_path), "--artifacts", str(store.root),
                            "--json", "budget", "show"])
    assert shown.returncode == 0, shown.stderr
    budget = json.loads(shown.stdout)
    settled = [e for e in entries if e["status"] == "settled"]
    reserved = [e for e in entries if e["status"] == "reserved"]
    assert budget["spent_epsilon"] == pytest.approx(sum(e["epsilon_spent"] for e in settled))
    assert budget["reserved_epsilon"] == pytest.approx(sum(e["epsilon"] for e in reserved))
    assert budget["composed_epsilon"] <= budget["spent_epsilon"] + budget["reserved_epsilon"] + 1e-9
    assert budget["remaining_epsilon"] == pytest.approx(
        config.budget.epsilon - budget["composed_epsilon"])
    # Under the lock nothing can be left half-way: every run that trained has settled.
    assert not reserved, f"reservations left open by runs that all ended: {reserved}"
    return entries


def fingerprints(store: ArtifactStore, stage: str) -> Counter[str]:
    return Counter(a.manifest["fingerprint"] for a in store.versions(stage))


def stage_result(payload: dict, stage: str) -> dict:
    return next(s for s in payload["stages"] if s["stage"] == stage)


@pytest.fixture
def tiny(tmp_path: Path, small_csv: Path, key_env: MasterKey
         ) -> tuple[Path, Config, ArtifactStore, MasterKey]:
    config_path = write_config(tmp_path / "persona.toml", small_csv, overrides=TINY_RUN)
    config = load_config(config_path)
    return config_path, config, ArtifactStore(tmp_path / "artifacts", config.dataset.name), key_env


@pytest.mark.slow
def test_concurrent_runs_with_a_long_lock_timeout_serialize_and_compute_everything_once(
        tiny: tuple[Path, Config, ArtifactStore, MasterKey]) -> None:
    config_path, config, store, key = tiny
    results = run_together(config_path, store.root, lock_timeout=300, extra=[[]] * RUNS)
    print(f"\nlong lock timeout: exit codes {[code for code, _, _ in results]}")

    assert [code for code, _, _ in results] == [0] * RUNS, [err for _, _, err in results]
    assert_store_sound(config_path, config, store, key)
    for stage in STAGES:
        counts = fingerprints(store, stage)
        assert list(counts.values()) == [1], f"{stage}: identical work done twice: {counts}"
        # One run computed it; the other three reused exactly that artifact.
        flags = [stage_result(payload, stage)["reused"] for _, payload, _ in results]
        assert sorted(flags) == [False] + [True] * (RUNS - 1), (stage, flags)
        versions = {stage_result(payload, stage)["version"] for _, payload, _ in results}
        assert versions == {store.get(stage).version}
    entries = assert_ledger_consistent(store, config)
    assert len(entries) == 1 and entries[0]["status"] == "settled", entries


@pytest.mark.slow
def test_concurrent_runs_with_a_short_lock_timeout_either_finish_or_exit_75_cleanly(
        tiny: tuple[Path, Config, ArtifactStore, MasterKey]) -> None:
    config_path, config, store, key = tiny
    results = run_together(config_path, store.root, lock_timeout=0.5, extra=[[]] * RUNS)
    codes = [code for code, _, _ in results]
    print(f"\nshort lock timeout: exit codes {codes}")

    assert set(codes) <= {0, 75}, [err for _, _, err in results]
    assert 0 in codes
    for code, payload, err in results:
        if code == 75:
            assert payload["exit_code"] == 75 and "lock" in payload["error"], payload
            assert "Traceback" not in err
            assert len(err.strip().splitlines()) == 1, err  # one line says what to do
    assert_store_sound(config_path, config, store, key)
    for stage in STAGES:
        counts = fingerprints(store, stage)
        assert list(counts.values()) == [1], f"{stage}: identical work done twice: {counts}"

    # The runs that gave up left nothing behind: the next run only reuses.
    again = run_subprocess(["--config", str(config_path), "--artifacts", str(store.root),
                            "--json", "run"])
    assert again.returncode == 0, again.stderr
    assert all(stage["reused"] for stage in json.loads(again.stdout)["stages"])


@pytest.mark.slow
def test_concurrent_forced_runs_each_train_once_and_each_training_is_in_the_ledger(
        tiny: tuple[Path, Config, ArtifactStore, MasterKey]) -> None:
    config_path, config, store, key = tiny
    forced = [["--force", "train"], [], ["--force", "train"], []]
    results = run_together(config_path, store.root, lock_timeout=300, extra=forced)
    print(f"\nlong lock timeout, two runs forced: exit codes {[c for c, _, _ in results]}")

    assert [code for code, _, _ in results] == [0] * RUNS, [err for _, _, err in results]
    entries = assert_store_sound(config_path, config, store, key)
    for stage in ("collect", "clean"):
        assert list(fingerprints(store, stage).values()) == [1]
    trained = [stage_result(payload, "train") for _, payload, _ in results]
    new_models = [t["version"] for t in trained if not t["reused"]]
    # Each forced run trains; an unforced run trains only if it came before any model.
    assert 2 <= len(new_models) <= 3, trained
    assert sorted(new_models) == sorted(a.version for a in store.versions("train"))
    assert list(fingerprints(store, "train").values()) == [len(new_models)]
    for opts, result in zip(forced, trained, strict=True):
        if opts:
            assert not result["reused"], "--force train must train again"
    assert sorted(e["version"] for e in entries) == sorted(new_models)
    assert all(e["status"] == "settled" for e in entries)


# ----------------------------------------------------------------------- stage commands
# Cron jobs and make targets also run the stages one by one. Two of them at once on
# identical input must not do the same work twice either: for `train` that would spend
# the privacy budget twice for one model.


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A store after `collect` + `clean`, and a copy after `train` too (copied per test)."""
    from tests.conftest import sample_lines

    folder = tmp_path_factory.mktemp("staged")
    source = folder / "persona_small.csv"
    source.write_text(sample_lines(300, split="train")
                      + sample_lines(100, split="test").split("\n", 1)[1], encoding="utf-8")
    config_path = write_config(folder / "persona.toml", source, overrides=TINY_RUN)
    key = MasterKey.generate()
    env = {"PERSONANET_KEY": key.to_base64(), "PERSONANET_KEY_FILE": ""}
    roots = {}
    for stage in ("collect", "clean", "train"):
        done = run_subprocess(["--config", str(config_path), "--artifacts",
                               str(folder / "root"), stage], env=env)
        assert done.returncode == 0, done.stderr
        roots[stage] = folder / f"after-{stage}"
        shutil.copytree(folder / "root", roots[stage])
    return {"config": config_path, "key": key, "roots": roots}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "evaluate", "predict"])
def test_concurrent_stage_commands_on_identical_input_do_the_work_once(
        stage: str, staged: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key: MasterKey = staged["key"]
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    monkeypatch.setenv("PERSONANET_KEY", key.to_base64())
    config_path: Path = staged["config"]
    config = load_config(config_path)
    root = tmp_path / "artifacts"
    shutil.copytree(staged["roots"]["clean" if stage == "train" else "train"], root)
    store = ArtifactStore(root, config.dataset.name)

    results = run_together(config_path, root, lock_timeout=300, extra=[[]] * RUNS,
                           command=stage)
    codes = [code for code, _, _ in results]
    print(f"\n{RUNS} concurrent `{stage}`: exit codes {codes}, reused "
          f"{[payload.get('reused') for _, payload, _ in results]}")

    assert set(codes) <= {0, 75}, [err for _, _, err in results]
    entries = assert_store_sound(config_path, config, store, key)
    counts = fingerprints(store, stage)
    assert list(counts.values()) == [1], f"{stage}: identical work done {counts} times"
    assert len(entries) == 1, f"one model, yet the budget was charged {len(entries)} times"
