"""verify, gc and key rotation on a real artifact root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personanet.store.artifacts import ArtifactStore
from personanet.store.crypto_header import read_header
from personanet.store.keys import MasterKey, write_key_file


@pytest.fixture
def collected(cli, key_env, small_config: Path, tmp_path: Path) -> Path:
    result = cli("--json", "--config", small_config, "collect")
    assert result.code == 0, result.stderr
    return Path(result.json()["path"])


def test_verify_passes_then_names_a_flipped_file(cli, collected: Path) -> None:
    assert cli("artifacts", "verify").code == 0
    target = collected / "records.parquet.enc"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    result = cli("artifacts", "verify")
    assert result.code == 65 and "records.parquet.enc" in result.stderr


def test_verify_authenticates_even_when_checksums_are_forged(cli, key_env, collected: Path
                                                            ) -> None:
    target = collected / "records.parquet.enc"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x80
    target.write_bytes(bytes(data))
    manifest = json.loads((collected / "manifest.json").read_text())
    from personanet.store.artifacts import sha256_file

    manifest["outputs"][0]["sha256"] = sha256_file(target)
    # Re-sealed with the key itself: even a manifest that vouches for the flipped file
    # (the seal is checked first) cannot hide it from end-to-end authentication.
    from personanet.stages.base import sealer_for

    (collected / "manifest.json").write_text(json.dumps(sealer_for(key_env).seal(manifest)))
    result = cli("artifacts", "verify")
    assert result.code == 65 and "records.parquet.enc" in result.stderr


def test_rotation_rewraps_and_old_key_opens_nothing(cli, key_env, collected: Path,
                                                    tmp_path: Path, monkeypatch, small_config
                                                    ) -> None:
    new = MasterKey.generate()
    write_key_file(tmp_path / "new.key", new)
    target = collected / "records.parquet.enc"
    payload_before = target.read_bytes()[200:]
    result = cli("--json", "keys", "rotate", "--new-key-file", tmp_path / "new.key")
    assert result.code == 0, result.stderr
    assert result.json()["files_rewrapped"] == 1
    assert read_header(target).key_id == new.key_id
    assert target.read_bytes()[200:] == payload_before  # payload not re-encrypted
    assert cli("artifacts", "verify").code == 77  # the old key opens nothing
    again = cli("--json", "keys", "rotate", "--new-key-file", tmp_path / "new.key")
    assert again.code == 0, again.stderr  # resumable: nothing left to do
    assert again.json()["files_rewrapped"] == 0 and again.json()["files_already_rotated"] == 1
    monkeypatch.setenv("PERSONANET_KEY", new.to_base64())
    assert cli("artifacts", "verify").code == 0
    rerun = cli("--json", "--config", small_config, "collect")
    assert rerun.code == 0 and rerun.json()["reused"] is True
    manifest = json.loads((collected / "manifest.json").read_text())
    assert manifest["outputs"][0]["key_id"] == new.key_id
    assert manifest["key_rotations"][0]["to"] == new.key_id


def test_gc_is_a_dry_run_unless_yes(cli, key_env, small_config: Path, tmp_path: Path) -> None:
    first = cli("--json", "--config", small_config, "collect").json()
    second = cli("--json", "--config", small_config, "collect", "--force").json()
    dry = cli("--json", "artifacts", "gc", "--keep", "1")
    assert dry.code == 0
    assert dry.json()["datasets"]["persona"]["remove"] == [f"collect/{first['version']}"]
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    assert len(store.versions("collect")) == 2
    assert cli("artifacts", "gc", "--keep", "1", "--yes").code == 0
    assert [a.version for a in store.versions("collect")] == [second["version"]]
    assert cli("artifacts", "verify").code == 0
