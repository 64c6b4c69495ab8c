"""Stages follow the config's chain of artifacts, never simply the newest.

Without an explicit version, clean reads the collect artifact of the config's sources,
train the clean artifact of that, and evaluate and predict the model of that chain (the
artifacts `run` would use), and say which. Mutation seen caught: `lineage.chain_input`
replaced by `store.get(stage)` (the newest): evaluate then scores another config's
non-private model, and a config without a model of its own borrows one.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from .conftest import ROOT, _dump_toml, write_config
from .store_trust import TINY, Built, artifact_dirs, build, copy_of, manifest_of, use_key

NEW = ROOT / "data" / "persona_new.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("lineage"))


@pytest.fixture
def root(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_key(monkeypatch, built.key)
    return copy_of(built, tmp_path)


def variant(built: Built, tmp_path: Path, name: str, extra: str) -> Path:
    """Another config of the same dataset (same name, same source), other settings."""
    merged = tomllib.loads(TINY)
    for section, values in tomllib.loads(extra).items():
        merged.setdefault(section, {}).update(values)
    return write_config(tmp_path / f"{name}.toml", built.csv, overrides=_dump_toml(merged))


def newest(root: Path, stage: str) -> Path:
    return max(artifact_dirs(root, stage), key=lambda p: manifest_of(p)["created_at"])


def test_bare_evaluate_and_predict_use_the_configs_model_not_a_newer_one(
        cli, root: Path, built: Built, tmp_path: Path) -> None:
    other = variant(built, tmp_path, "other", "[train]\nlearning_rate = 0.005\n")
    trained = cli("--json", "--config", other, "train", "--no-dp")
    assert trained.code == 0, trained.stderr
    model_b = trained.json()["version"]
    assert model_b != built.versions["train"] and newest(root, "train").name == model_b

    scored = cli("--json", "--config", built.config, "evaluate", "--force")
    assert scored.code == 0, scored.stderr
    inputs = manifest_of(Path(scored.json()["path"]))["inputs"]
    assert inputs[0]["stage"] == "train" and inputs[0]["version"] == built.versions["train"]
    assert f"model {built.versions['train']}" in scored.stderr and "chain" in scored.stderr

    reused = cli("--json", "--config", built.config, "evaluate")
    assert reused.code == 0 and reused.json()["reused"] is True, reused.stderr

    predicted = cli("--json", "--config", built.config, "predict", "--input", NEW, "--force")
    assert predicted.code == 0, predicted.stderr
    assert predicted.json()["model_version"] == built.versions["train"]
    assert predicted.json()["model_private"] is True

    # --model still picks any model.
    explicit = cli("--json", "--config", built.config, "evaluate", "--model", model_b)
    assert explicit.code == 0, explicit.stderr
    assert manifest_of(Path(explicit.json()["path"]))["inputs"][0]["version"] == model_b


def test_a_config_without_a_model_of_its_own_exits_66_naming_train(
        cli, root: Path, built: Built, tmp_path: Path) -> None:
    unseen = variant(built, tmp_path, "unseen", "[train]\nepochs = 2\n")
    for command in (("evaluate",), ("predict", "--input", NEW)):
        result = cli("--config", unseen, *command)
        assert result.code == 66, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "`personanet train`" in line and "--model" in line
    assert len(artifact_dirs(root, "evaluate")) == 1 and len(artifact_dirs(root, "predict")) == 1


def test_only_a_non_private_model_of_the_chain_is_used_with_a_warning(
        cli, root: Path, built: Built, tmp_path: Path) -> None:
    other = variant(built, tmp_path, "other", "[train]\nlearning_rate = 0.005\n")
    model_b = cli("--json", "--config", other, "train", "--no-dp").json()["version"]
    result = cli("--json", "--config", other, "evaluate")
    assert result.code == 0, result.stderr
    assert manifest_of(Path(result.json()["path"]))["inputs"][0]["version"] == model_b
    assert "--no-dp" in result.stderr and "no privacy guarantee" in result.stderr


def test_clean_and_train_read_the_chain_not_the_newest_input(
        cli, root: Path, built: Built, tmp_path: Path) -> None:
    # A newer collect artifact of other records, and a newer clean artifact of another config.
    others = tmp_path / "others.csv"
    lines = built.csv.read_text().splitlines(keepends=True)
    others.write_text(lines[0] + "".join(lines[-50:]))
    assert cli("--config", built.config, "collect", "--source", others).code == 0
    cleaned = cli("--json", "--config", built.config, "clean")
    assert cleaned.code == 0, cleaned.stderr
    assert cleaned.json()["reused"] is True
    assert cleaned.json()["version"] == built.versions["clean"]

    reseeded = variant(built, tmp_path, "reseeded", "[clean]\nseed = 7\n")
    assert cli("--config", reseeded, "clean").code == 0
    assert newest(root, "clean").name != built.versions["clean"]
    trained = cli("--json", "--config", built.config, "train")
    assert trained.code == 0, trained.stderr
    assert trained.json()["reused"] is True  # no budget spent on another config's data
    assert trained.json()["version"] == built.versions["train"]


def test_without_the_sources_the_chain_asks_for_an_explicit_version(
        cli, root: Path, built: Built) -> None:
    moved = built.csv.with_suffix(".moved")
    built.csv.rename(moved)
    try:
        result = cli("--config", built.config, "evaluate")
        assert result.code == 66, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "--model VERSION" in line and "persona_small.csv" in line
        pinned = cli("--json", "--config", built.config, "evaluate", "--model",
                     built.versions["train"])
        assert pinned.code == 0 and pinned.json()["reused"] is True, pinned.stderr
    finally:
        moved.rename(built.csv)
    assert json.loads(cli("--json", "--config", built.config, "evaluate").stdout)["reused"]


@pytest.mark.parametrize("command", ["clean", "train", "evaluate", "predict"])
def test_help_names_the_chain_as_the_default_input_not_the_newest(cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.code == 0
    assert "chain" in result.stdout and "newest" not in result.stdout
