"""A root written by the previous code layout is read, verified and reused as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "data" / "root_v1"


def _copy(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "root_v1"
    shutil.copytree(FIXTURE, root)
    monkeypatch.setenv("PERSONANET_KEY", (root / "key.b64").read_text().strip())
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    return root


def test_run_reuses_every_stage_of_a_root_written_before(cli, tmp_path: Path,
                                                         monkeypatch) -> None:
    root = _copy(tmp_path, monkeypatch)
    ledger_before = (root / "store" / "persona" / "budget.json").read_bytes()
    result = cli("--config", root / "config.toml", "--artifacts", root / "store", "--json", "run")
    assert result.code == 0, result.stderr
    stages = result.json()["stages"]
    assert [s["stage"] for s in stages] == ["collect", "clean", "train", "evaluate", "predict"]
    assert all(s["reused"] for s in stages), stages
    # Nothing was spent or rewritten: the ledger is byte for byte the one on disk.
    assert (root / "store" / "persona" / "budget.json").read_bytes() == ledger_before


def test_a_root_written_before_verifies(cli, tmp_path: Path, monkeypatch) -> None:
    root = _copy(tmp_path, monkeypatch)
    result = cli("--config", root / "config.toml", "--artifacts", root / "store", "--json",
                 "artifacts", "verify")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["artifacts"] == 5
