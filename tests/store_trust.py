"""A small real artifact root, built once per test module and copied per test.

Shared by the tests of the store's trust (test_key_pinning, test_manifest_seal,
test_lineage): one tiny private run (collect -> clean -> train -> evaluate -> predict)
under a real key, on 400 real records of the bundled sample.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from personanet.cli import run_cli
from personanet.store.keys import MasterKey

from .conftest import sample_lines, write_config

#: 1 epoch, small batches, a fixed learning rate, a short bootstrap: seconds per stage
TINY = """
[train]
epochs = 1
batch_size = 64
learning_rate = 0.01
[evaluate]
bootstrap = 20
min_accuracy = 0.0
"""


@dataclass
class Built:
    folder: Path
    config: Path
    csv: Path
    key: MasterKey
    versions: dict[str, str]


def build(folder: Path, *, overrides: str = TINY) -> Built:
    """Write 400 records, a config and a key under `folder`, and `run` the pipeline there."""
    csv = folder / "persona_small.csv"
    csv.write_text(sample_lines(300, split="train")
                   + sample_lines(100, split="test").split("\n", 1)[1], encoding="utf-8")
    config = write_config(folder / "persona.toml", csv, overrides=overrides)
    key = MasterKey.generate()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PERSONANET_KEY_FILE", raising=False)
        patch.setenv("PERSONANET_KEY", key.to_base64())
        patch.chdir(folder)
        code = run_cli(["--quiet", "--config", str(config), "run"])
    assert code == 0, "the pipeline must run on the tiny sample"
    versions = {stage: artifact_dirs(folder / "artifacts", stage)[0].name
                for stage in ("collect", "clean", "train", "evaluate", "predict")}
    return Built(folder, config, csv, key, versions)


def copy_of(built: Built, tmp_path: Path) -> Path:
    """A private copy of the built root under `tmp_path/artifacts` (what the cli fixture uses)."""
    shutil.copytree(built.folder / "artifacts", tmp_path / "artifacts")
    return tmp_path / "artifacts"


def artifact_dirs(root: Path, stage: str) -> list[Path]:
    """Every folder under a stage, temporaries included, sorted."""
    folder = root / "persona" / stage
    return sorted(folder.iterdir()) if folder.is_dir() else []


def manifest_of(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def use_key(monkeypatch: pytest.MonkeyPatch, key: MasterKey) -> None:
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    monkeypatch.setenv("PERSONANET_KEY", key.to_base64())
