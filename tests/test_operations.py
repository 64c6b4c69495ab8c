"""Operations: `run` like `dvc repro`, cron and make, artifact care, rotation, locking."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from personanet.store.artifacts import STAGES, ArtifactStore
from personanet.store.keys import MasterKey, write_key_file

from .conftest import ROOT, write_config

TINY = "[train]\nepochs = 1\nbatch_size = 64\n[evaluate]\nmin_accuracy = 0.5\nbootstrap = 20\n"


@pytest.fixture
def tiny_config(tmp_path: Path, small_csv: Path) -> Path:
    return write_config(tmp_path / "persona.toml", small_csv, overrides=TINY)


def _run(cli, config: Path, *extra: str) -> dict:
    result = cli("--json", "--config", config, "run", *extra)
    assert result.code == 0, result.stderr
    return result.json()


def _reused(out: dict) -> dict[str, bool]:
    return {s["stage"]: s["reused"] for s in out["stages"]}


def _budget(cli, config: Path) -> dict:
    result = cli("--json", "--config", config, "budget", "show")
    assert result.code == 0, result.stderr
    return result.json()


def test_second_run_on_unchanged_input_reuses_every_stage_and_spends_nothing(
        cli, key_env, tiny_config: Path) -> None:
    first = _run(cli, tiny_config)
    assert [s["stage"] for s in first["stages"]] == list(STAGES)
    assert not any(_reused(first).values())
    spent = _budget(cli, tiny_config)
    assert spent["spent_epsilon"] > 0 and spent["reserved_epsilon"] == 0
    second = _run(cli, tiny_config)
    assert all(_reused(second).values())
    assert [s["version"] for s in second["stages"]] == [s["version"] for s in first["stages"]]
    again = _budget(cli, tiny_config)
    assert again["spent_epsilon"] == spent["spent_epsilon"]
    assert len(again["entries"]) == len(spent["entries"]) == 1


def test_changing_one_training_parameter_reruns_train_evaluate_predict_only(
        cli, key_env, tiny_config: Path) -> None:
    _run(cli, tiny_config)
    tiny_config.write_text(tiny_config.read_text().replace("max_grad_norm = 1.0",
                                                           "max_grad_norm = 0.5"))
    out = _run(cli, tiny_config)
    assert _reused(out) == {"collect": True, "clean": True, "train": False,
                            "evaluate": False, "predict": False}


def test_force_recomputes_from_the_named_stage_on(cli, key_env, tiny_config: Path) -> None:
    _run(cli, tiny_config)
    out = _run(cli, tiny_config, "--force", "evaluate")
    assert _reused(out) == {"collect": True, "clean": True, "train": True,
                            "evaluate": False, "predict": False}
    assert cli("--config", tiny_config, "run", "--force", "nonsense").code == 2


def test_rotation_then_run_reuses_everything_and_old_key_exits_77(
        cli, key_env, tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    first = _run(cli, tiny_config)
    new = MasterKey.generate()
    write_key_file(tmp_path / "new.key", new)
    rotated = cli("--json", "keys", "rotate", "--new-key-file", tmp_path / "new.key")
    assert rotated.code == 0, rotated.stderr
    assert rotated.json()["files_rewrapped"] >= 6  # collect 1, clean 3, predict 2
    old = cli("--config", tiny_config, "run", "--force", "clean")
    assert old.code == 77 and new.key_id in old.stderr
    monkeypatch.setenv("PERSONANET_KEY", new.to_base64())
    out = _run(cli, tiny_config)
    assert all(_reused(out).values())
    assert [s["version"] for s in out["stages"]] == [s["version"] for s in first["stages"]]
    assert cli("artifacts", "verify").code == 0


def test_gc_keep_one_leaves_a_store_that_run_continues_from(cli, key_env, tiny_config: Path,
                                                             tmp_path: Path) -> None:
    _run(cli, tiny_config)
    tiny_config.write_text(tiny_config.read_text().replace("max_grad_norm = 1.0",
                                                           "max_grad_norm = 0.5"))
    latest = _run(cli, tiny_config)
    budget_before = (tmp_path / "artifacts" / "persona" / "budget.json").read_bytes()
    dry = cli("--json", "artifacts", "gc", "--keep", "1")
    assert dry.json()["datasets"]["persona"]["remove"]  # the first train/evaluate/predict
    assert cli("artifacts", "gc", "--keep", "1", "--yes").code == 0
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    assert [len(store.versions(s)) for s in STAGES] == [1, 1, 1, 1, 1]
    assert (tmp_path / "artifacts" / "persona" / "budget.json").read_bytes() == budget_before
    assert cli("artifacts", "verify").code == 0
    again = _run(cli, tiny_config)
    assert all(_reused(again).values())
    assert [s["version"] for s in again["stages"]] == [s["version"] for s in latest["stages"]]


@pytest.mark.slow
def test_verify_exits_65_after_any_single_byte_of_any_artifact_file_is_flipped(
        cli, key_env, tiny_config: Path, tmp_path: Path) -> None:
    _run(cli, tiny_config)
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    files = [a.path / o["name"] for s in STAGES for a in store.versions(s)
             for o in a.manifest["outputs"]]
    assert len(files) >= 15
    for path in files:
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(original) // 3] ^= 0x10
        path.write_bytes(bytes(flipped))
        result = cli("artifacts", "verify")
        path.write_bytes(original)
        assert result.code == 65, path
        assert path.name in result.stderr
    assert cli("artifacts", "verify").code == 0


@pytest.mark.slow
def test_two_concurrent_runs_serialise_and_corrupt_nothing(key_env, tiny_config: Path,
                                                           tmp_path: Path) -> None:
    env = {**os.environ, "PERSONANET_KEY": key_env.to_base64()}
    args = [sys.executable, "-m", "personanet", "--quiet", "--config", str(tiny_config),
            "--artifacts", str(tmp_path / "artifacts"), "--lock-timeout", "120", "run",
            "--force", "train"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert set(codes) <= {0, 75}, [p.stderr.read() for p in procs]
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    verify = subprocess.run([sys.executable, "-m", "personanet", "--artifacts",
                             str(tmp_path / "artifacts"), "artifacts", "verify"], env=env,
                            capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    ledger = json.loads((store.dataset_dir / "budget.json").read_text())
    trains = store.versions("train")
    assert len(trains) == codes.count(0)
    settled = [e for e in ledger["entries"] if e["status"] == "settled"]
    assert len(settled) == len(trains)
    assert {e.get("version") for e in settled} == {a.version for a in trains}


def test_json_log_format_run_writes_only_json_lines_on_stderr(key_env, tiny_config: Path,
                                                              tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "personanet", "--log-format", "json", "--config",
         str(tiny_config), "--artifacts", str(tmp_path / "a"), "run"],
        env={**os.environ, "PERSONANET_KEY": key_env.to_base64(), "TERM": "xterm"},
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines)
    assert "\x1b[" not in proc.stderr + proc.stdout  # no colour, no bars: not a terminal
    assert len(proc.stdout.strip().splitlines()) == 5  # one result line per stage


def _readme_block(after: str) -> str:
    """The first indented code block of the README at or after the line holding `after`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    while not lines[start].startswith("    "):
        start += 1
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip("\n")


@pytest.mark.slow
def test_readme_cron_and_make_examples_run_as_written(key_env, tiny_config: Path,
                                                      tmp_path: Path) -> None:
    # A project folder laid out like the README's /srv/persona: .venv, configs, data.
    project = tmp_path / "srv"
    (project / "configs").mkdir(parents=True)
    os.symlink(Path(sys.executable).parent.parent, project / ".venv")
    shutil.copy(tiny_config, project / "configs" / "persona.toml")
    key_file = tmp_path / "master.key"
    write_key_file(key_file, key_env)
    log = tmp_path / "personanet.jsonl"

    cron = _readme_block("# m h dom mon dow  command")
    entry = " ".join(line.strip().rstrip("\\") for line in cron.splitlines()[1:])
    command = entry.split(None, 5)[5]
    command = (command.replace("/srv/persona", str(project))
               .replace("/etc/personanet/master.key", str(key_file))
               .replace("/var/log/personanet.jsonl", str(log)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONANET_")}
    for attempt in range(2):
        proc = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, log.read_text()[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert records and all("level" in r or "stage" in r for r in records)

    makefile = _readme_block("In a Makefile:")
    (project / "Makefile").write_text(re.sub(r"^(\S+:[^;]*); ", r"\1\n\t", makefile,
                                             flags=re.M) + "\n")
    env_make = {**env, "PATH": f"{project / '.venv' / 'bin'}:{os.environ['PATH']}",
                "PERSONANET_KEY_FILE": str(key_file)}
    proc = subprocess.run(["make", "-C", str(project), "model"], env=env_make,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
