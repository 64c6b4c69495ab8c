"""The artifact store: immutable versions, atomic writes, reuse, one writer (README: Artifacts)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from personanet.errors import InputMissingError, IntegrityError, LockBusyError
from personanet.store.artifacts import LOCK_FILE, ArtifactStore, verify_checksums


def _write(store: ArtifactStore, stage: str = "collect", *, fp: str = "fp",
           body: bytes = b"x") -> object:
    with store.create(stage, fingerprint=fp, inputs=[], config={}, config_hash="h") as writer:
        writer.write_bytes("data.bin", body, rows=1)
        writer.figures = {"rows": 1}
        return writer.commit()


def test_commit_writes_manifest_with_lineage_and_environment(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds")
    artifact = _write(store)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["stage"] == "collect" and manifest["version"] == artifact.version
    assert manifest["dataset"] == "ds" and manifest["created_at"].endswith("Z")
    out = manifest["outputs"][0]
    assert out["name"] == "data.bin" and out["bytes"] == 1 and len(out["sha256"]) == 64
    env = manifest["environment"]
    assert env["personanet"] and env["python"] and "torch" in env["packages"]
    verify_checksums(artifact)


def test_versions_are_unique_and_newest_wins(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds")
    first, second = _write(store, fp="a"), _write(store, fp="b")
    assert first.version != second.version
    assert store.get("collect").version == second.version
    assert store.get("collect", first.version).version == first.version


def test_readers_ignore_incomplete_folders(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds")
    good = _write(store)
    stage_dir = store.stage_dir("collect")
    (stage_dir / ".tmp-20990101T000000.000000Z-aaaaaa").mkdir()
    (stage_dir / "20990101T000000.000000Z-bbbbbb").mkdir()
    corrupt = stage_dir / "20990101T000000.000000Z-cccccc"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    other = stage_dir / "20990101T000000.000000Z-dddddd"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**good.manifest, "version": "x"}))
    assert [a.version for a in store.versions("collect")] == [good.version]
    assert store.get("collect").version == good.version
    with pytest.raises(InputMissingError):
        store.get("collect", "20990101T000000.000000Z-bbbbbb")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds")
    with pytest.raises(RuntimeError), store.create("clean", fingerprint="f", inputs=[],
                                                   config={}, config_hash="h") as writer:
        writer.write_bytes("part.bin", b"half")
        raise RuntimeError("crash")
    # Not even the empty stage and dataset folders stay behind.
    assert not store.dataset_dir.exists()


def test_failed_write_keeps_the_committed_versions_beside_it(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds")
    with store.create("clean", fingerprint="f", inputs=[], config={},
                      config_hash="h") as writer:
        writer.write_bytes("part.bin", b"whole")
        kept = writer.commit()
    with pytest.raises(RuntimeError), store.create("clean", fingerprint="g", inputs=[],
                                                   config={}, config_hash="h") as writer:
        writer.write_bytes("part.bin", b"half")
        raise RuntimeError("crash")
    assert [p.name for p in store.stage_dir("clean").iterdir()] == [kept.version]


def test_missing_stage_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(InputMissingError, match="run `personanet train` first"):
        ArtifactStore(tmp_path, "ds").get("train")


def test_reuse_finds_identical_fingerprint(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds")
    artifact = _write(store, fp="same")
    assert store.find_reusable("collect", "same").version == artifact.version
    assert store.find_reusable("collect", "other") is None


def test_flipped_byte_fails_checksum(tmp_path: Path) -> None:
    artifact = _write(ArtifactStore(tmp_path, "ds"), body=b"abc")
    (artifact.path / "data.bin").write_bytes(b"abd")
    with pytest.raises(IntegrityError, match="data.bin"):
        verify_checksums(artifact)


def test_lock_held_elsewhere_times_out_with_75(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, "ds", lock_timeout=0.2)
    tmp_path.mkdir(exist_ok=True)
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockBusyError) as err, store.lock():
            pass
        assert err.value.exit_code == 75 and "retry" in str(err.value)
    finally:
        os.close(fd)
    with store.lock(), store.lock():  # free now, and re-entrant within a process
        pass


def test_lock_busy_through_cli_exits_75(cli, tmp_path: Path, small_config: Path,
                                        key_env) -> None:
    root = tmp_path / "artifacts"
    root.mkdir()
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = cli("--config", small_config, "--artifacts", root, "--lock-timeout", "0.2",
                     "collect")
    finally:
        os.close(fd)
    assert result.code == 75
    assert "locked by another personanet process" in result.stderr
