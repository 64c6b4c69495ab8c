"""An artifact root is pinned to one master key.

Every stage refuses (exit 77, before writing anything) a key other than the one the
root's artifacts are under, naming both key ids and `keys rotate`; a wrong key never
damages the store, so `artifacts verify` with the right key still passes afterwards.
Mutation seen caught: `stage.require_key` made a no-op (collect --force then exits 0
and writes a second collect artifact under the wrong key; verify exits 77 for good).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from personanet.store.keys import MasterKey, write_key_file

from .conftest import ROOT
from .store_trust import Built, artifact_dirs, build, copy_of, manifest_of, use_key

NEW = ROOT / "data" / "persona_new.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("pinning"))


def snapshot(root: Path) -> dict[str, list[str]]:
    return {stage: [p.name for p in artifact_dirs(root, stage)]
            for stage in ("collect", "clean", "train", "evaluate", "predict")}


WRONG_KEY_COMMANDS = [
    ("collect", "--force"),
    ("clean", "--force"),
    ("train",),
    ("train", "--force"),
    ("evaluate",),
    ("evaluate", "--force"),
    ("predict", "--force", "--input", str(NEW)),
    ("run",),
]


def test_every_stage_refuses_a_wrong_key_and_the_store_stays_whole(
        cli, built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_of(built, tmp_path)
    before = snapshot(root)
    wrong = MasterKey.generate()
    use_key(monkeypatch, wrong)
    for command in WRONG_KEY_COMMANDS:
        result = cli("--config", built.config, *command)
        assert result.code == 77, (command, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert built.key.key_id in line and wrong.key_id in line, line
        assert "keys rotate" in line and "Traceback" not in line
        assert snapshot(root) == before, f"{command} wrote something under the wrong key"

    use_key(monkeypatch, built.key)
    verified = cli("artifacts", "verify")
    assert verified.code == 0, verified.stderr
    assert cli("--config", built.config, "run").code == 0


def test_run_with_a_wrong_key_fails_even_when_every_stage_would_be_reused(
        cli, built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_of(built, tmp_path)
    use_key(monkeypatch, built.key)
    right = cli("--json", "--config", built.config, "run")
    assert right.code == 0, right.stderr
    assert all(stage["reused"] for stage in right.json()["stages"])

    use_key(monkeypatch, MasterKey.generate())
    wrong = cli("--json", "--config", built.config, "run")
    assert wrong.code == 77, wrong.stderr
    assert wrong.json()["exit_code"] == 77


def test_a_stage_is_refused_when_only_a_plaintext_artifact_names_the_key(
        cli, built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With only the train and evaluate artifacts left (no encrypted file at all), the
    # manifests' seals still pin the root to its key.
    root = copy_of(built, tmp_path)
    for stage in ("collect", "clean", "predict"):
        for folder in artifact_dirs(root, stage):
            (folder / "manifest.json").unlink()
    wrong = MasterKey.generate()
    use_key(monkeypatch, wrong)
    result = cli("--config", built.config, "evaluate", "--model", built.versions["train"])
    assert result.code == 77, result.stderr
    assert built.key.key_id in result.stderr and wrong.key_id in result.stderr


def test_rotation_reseals_every_manifest_and_the_old_key_is_refused(
        cli, built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_of(built, tmp_path)
    new = MasterKey.generate()
    write_key_file(tmp_path / "new.key", new)
    use_key(monkeypatch, built.key)
    rotated = cli("--json", "keys", "rotate", "--new-key-file", tmp_path / "new.key")
    assert rotated.code == 0, rotated.stderr
    # Every manifest, the train and evaluate ones with no encrypted file included.
    for stage in ("collect", "clean", "train", "evaluate", "predict"):
        for folder in artifact_dirs(root, stage):
            assert manifest_of(folder)["seal"]["key_id"] == new.key_id, folder

    assert cli("artifacts", "verify").code == 77  # the old key opens nothing
    old_run = cli("--config", built.config, "evaluate")
    assert old_run.code == 77 and new.key_id in old_run.stderr
    use_key(monkeypatch, new)
    assert cli("artifacts", "verify").code == 0
    again = cli("--json", "--config", built.config, "run")
    assert again.code == 0, again.stderr
    assert all(stage["reused"] for stage in again.json()["stages"])


def test_an_interrupted_rotation_is_refused_by_stages_and_resumes(
        cli, built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from personanet.stages.housekeeping import RotationReport, _rotate_artifact
    from personanet.store.artifacts import ArtifactStore

    root = copy_of(built, tmp_path)
    new = MasterKey.generate()
    write_key_file(tmp_path / "new.key", new)
    # The rotation stopped after its first artifact: the root names both keys.
    collected = ArtifactStore(root, "persona").get("collect")
    _rotate_artifact(collected, built.key, new, RotationReport(built.key.key_id, new.key_id))
    assert manifest_of(collected.path)["seal"]["key_id"] == new.key_id

    for key in (built.key, new):
        use_key(monkeypatch, key)
        result = cli("--config", built.config, "evaluate")
        assert result.code == 77, result.stderr
        assert "interrupted" in result.stderr and "keys rotate" in result.stderr

    use_key(monkeypatch, built.key)
    resumed = cli("--json", "keys", "rotate", "--new-key-file", tmp_path / "new.key")
    assert resumed.code == 0, resumed.stderr
    assert resumed.json()["files_already_rotated"] == 1
    use_key(monkeypatch, new)
    assert cli("artifacts", "verify").code == 0
    assert cli("--config", built.config, "evaluate").code == 0
