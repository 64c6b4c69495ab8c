"""Manifests are sealed (HMAC-SHA256 under a key derived from the master key).

Plaintext files (model weights, encoder, privacy claim) are protected only by their
sha256 in the manifest; the seal makes the manifest itself unforgeable without the
key. Mutations seen caught: `Sealer.check` made a no-op (a forged privacy.json with a
recomputed checksum passes verify and evaluate reports epsilon 0.1);
`stage.check_plain_files` made a no-op (evaluate --force and predict read an edited
privacy.json / swapped weights whose manifest was left alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personanet.store.artifacts import sha256_file

from .conftest import ROOT
from .store_trust import Built, artifact_dirs, build, copy_of, manifest_of, use_key

NEW = ROOT / "data" / "persona_new.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("seal"))


@pytest.fixture
def root(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_key(monkeypatch, built.key)
    return copy_of(built, tmp_path)


def train_dir(root: Path, built: Built) -> Path:
    return root / "persona" / "train" / built.versions["train"]


def claim_epsilon(model: Path, epsilon: float) -> None:
    privacy = json.loads((model / "privacy.json").read_text())
    privacy["epsilon"] = epsilon
    (model / "privacy.json").write_text(json.dumps(privacy))


def recompute_checksums(artifact: Path) -> None:
    """What an attacker without the key can do: make the manifest agree with the files."""
    manifest = manifest_of(artifact)
    for out in manifest["outputs"]:
        path = artifact / out["name"]
        out["sha256"], out["bytes"] = sha256_file(path), path.stat().st_size
    (artifact / "manifest.json").write_text(json.dumps(manifest, indent=2))


def refused_by_every_reader(cli, built: Built, *, naming: str) -> None:
    model = built.versions["train"]
    for command in (("artifacts", "verify"),
                    ("--config", built.config, "evaluate"),
                    ("--config", built.config, "evaluate", "--force", "--model", model),
                    ("--config", built.config, "predict", "--force", "--input", NEW),
                    ("--config", built.config, "predict", "--model", model, "--input", NEW)):
        result = cli(*command)
        assert result.code == 65, (command, result.stderr)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and naming in errors[0], (command, result.stderr)
        assert "Traceback" not in result.stderr


def test_manifests_are_sealed_and_verify(cli, root: Path, built: Built) -> None:
    for stage in ("collect", "clean", "train", "evaluate", "predict"):
        (folder,) = artifact_dirs(root, stage)
        seal = manifest_of(folder)["seal"]
        assert seal["algorithm"] == "HMAC-SHA256" and seal["key_id"] == built.key.key_id
    assert cli("artifacts", "verify").code == 0


def test_forged_privacy_claim_with_recomputed_checksum_is_refused(cli, root: Path,
                                                                  built: Built) -> None:
    model = train_dir(root, built)
    claim_epsilon(model, 0.1)
    recompute_checksums(model)
    refused_by_every_reader(cli, built, naming="manifest.json")
    # Nothing reported the forged claim: no new evaluate artifact was written.
    assert len(artifact_dirs(root, "evaluate")) == 1


def test_swapped_model_weights_with_recomputed_checksum_are_refused(cli, root: Path,
                                                                    built: Built) -> None:
    from safetensors.torch import load_file, save_file

    # Another valid model of the same shape (one that memorised its data, say).
    model = train_dir(root, built)
    weights = load_file(str(model / "model.safetensors"))
    save_file({name: tensor * 3 for name, tensor in weights.items()},
              str(model / "model.safetensors"))
    recompute_checksums(model)
    refused_by_every_reader(cli, built, naming="manifest.json")


@pytest.mark.parametrize("name", ["privacy.json", "model.safetensors", "encoder.json",
                                  "model.json"])
def test_plaintext_file_edited_behind_the_manifest_is_refused_before_use(
        cli, root: Path, built: Built, name: str) -> None:
    # The manifest (and its seal) untouched: the file's sha256 no longer matches it.
    path = train_dir(root, built) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused_by_every_reader(cli, built, naming=name)


def test_unsealed_manifest_is_refused_until_adopted_by_artifacts_seal(
        cli, root: Path, built: Built) -> None:
    # As a manifest written before manifests were sealed (or an attacker's deletion).
    model = train_dir(root, built)
    manifest = manifest_of(model)
    del manifest["seal"]
    (model / "manifest.json").write_text(json.dumps(manifest))

    for command in (("artifacts", "verify"), ("--config", built.config, "evaluate")):
        result = cli(*command)
        assert result.code == 65, result.stderr
        assert "not sealed" in result.stderr and "artifacts seal" in result.stderr

    adopted = cli("--json", "artifacts", "seal")
    assert adopted.code == 0, adopted.stderr
    assert adopted.json()["sealed"] == [f"persona/train/{built.versions['train']}"]
    assert adopted.json()["already_sealed"] == 4
    assert built.versions["train"] in adopted.stderr  # logged, one line per adoption
    assert manifest_of(model)["seal"]["key_id"] == built.key.key_id
    assert cli("artifacts", "verify").code == 0
    assert cli("--config", built.config, "evaluate").code == 0


def test_artifacts_seal_refuses_a_damaged_artifact_and_seals_nothing(
        cli, root: Path, built: Built) -> None:
    collected = root / "persona" / "collect" / built.versions["collect"]
    manifest = manifest_of(collected)
    del manifest["seal"]
    (collected / "manifest.json").write_text(json.dumps(manifest))
    records = collected / "records.parquet.enc"
    data = bytearray(records.read_bytes())
    data[-5] ^= 0x80
    records.write_bytes(bytes(data))
    recompute_checksums(collected)  # the checksum agrees: only authentication can tell

    result = cli("artifacts", "seal")
    assert result.code == 65 and "records.parquet.enc" in result.stderr, result.stderr
    assert "seal" not in manifest_of(collected)


def test_seal_of_one_manifest_does_not_fit_another(cli, root: Path, built: Built) -> None:
    # Copying a valid seal onto an edited manifest does not help: the MAC covers every byte.
    model = train_dir(root, built)
    manifest = manifest_of(model)
    manifest["figures"]["epsilon"] = 0.1
    (model / "manifest.json").write_text(json.dumps(manifest))
    result = cli("artifacts", "verify")
    assert result.code == 65 and "seal does not match" in result.stderr
