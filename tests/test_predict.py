"""predict: streamed scoring with the model's own encoding, pseudonyms only, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from personanet.cleaning.rows import prepare_rows
from personanet.config import load_config
from personanet.models import load_model
from personanet.privacy.pseudonym import pseudonym_key
from personanet.stages.predict import PREDICTIONS, REJECTS, read_predictions
from personanet.store import crypto
from personanet.store.artifacts import ArtifactStore

from .conftest import ROOT, all_bytes_under

NEW = ROOT / "data" / "persona_new.csv"


@pytest.fixture
def trained(cli, key_env, small_config: Path, tmp_path: Path) -> Path:
    for stage in ("collect", "clean", "train"):
        result = cli("--config", small_config, stage)
        assert result.code == 0, result.stderr
    return small_config


def test_predict_scores_every_row_with_pseudonyms_only(cli, key_env, trained: Path,
                                                       tmp_path: Path) -> None:
    result = cli("--json", "--config", trained, "predict", "--input", NEW)
    assert result.code == 0, result.stderr
    out = result.json()
    assert out["rows_in"] == 200 == out["rows_scored"] + out["rows_rejected"]
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    artifact = store.get("predict")
    predictions = read_predictions(artifact, key_env)
    rejects = read_predictions(artifact, key_env, REJECTS)
    assert predictions.height + rejects.height == 200
    assert sorted(predictions["row"].to_list() + rejects["row"].to_list()) == list(range(200))
    raw = pl.read_csv(NEW, infer_schema=False)
    decrypted = (crypto.read_encrypted_file(artifact.file(PREDICTIONS), key_env)
                 + crypto.read_encrypted_file(artifact.file(REJECTS), key_env))
    everything = decrypted + all_bytes_under(tmp_path / "artifacts") + result.stdout.encode() \
        + result.stderr.encode()
    leaked = [v for v in raw["name"].to_list() + raw["email"].to_list()
              if v.encode() in everything]
    assert leaked == []
    assert predictions["email"].str.len_chars().unique().to_list() == [32]
    assert set(predictions["prediction"].unique().to_list()) <= {"<=50K", ">50K"}
    assert np.allclose(predictions["proba_<=50K"] + predictions["proba_>50K"], 1.0, atol=1e-6)


def test_predictions_equal_the_model_on_the_encoded_tensor(cli, key_env, trained: Path,
                                                           tmp_path: Path) -> None:
    assert cli("--config", trained, "predict", "--input", NEW).code == 0
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    predictions = read_predictions(store.get("predict"), key_env).sort("row")
    model, encoder = load_model(store.get("train").path)
    prepared = prepare_rows(pl.read_csv(NEW, infer_schema=False), load_config(trained),
                            pseudonym_key(key_env), require_target=False)
    batch = encoder.transform(prepared.frame).tensors()
    direct = model.predict(categorical=batch["categorical"], numeric=batch["numeric"]).numpy()
    assert prepared.rows.to_list() == predictions["row"].to_list()
    assert np.allclose(predictions["proba_>50K"].to_numpy(), direct[:, 1], atol=1e-6)
    assert prepared.frame["email"].to_list() == predictions["email"].to_list()


def test_unscoreable_rows_are_rejected_with_a_reason_and_counted(cli, key_env, tmp_path: Path,
                                                                 small_csv: Path) -> None:
    from .conftest import write_config

    config = write_config(tmp_path / "strict.toml", small_csv, overrides=(
        "[train]\nepochs = 1\nbatch_size = 64\n[columns.age]\ninvalid = \"quarantine\"\n"))
    for stage in ("collect", "clean", "train"):
        assert cli("--config", config, stage).code == 0
    raw = pl.read_csv(NEW, infer_schema=False)
    messy = raw.with_columns(pl.when(pl.int_range(pl.len()) < 7).then(pl.lit("n/a"))
                             .otherwise(pl.col("age")).alias("age"))
    source = tmp_path / "messy.parquet"
    messy.write_parquet(source)
    result = cli("--json", "--config", config, "predict", "--input", source)
    assert result.code == 0, result.stderr
    out = result.json()
    assert (out["rows_in"], out["rows_scored"], out["rows_rejected"]) == (200, 193, 7)
    rejects = read_predictions(ArtifactStore(tmp_path / "artifacts", "persona").get("predict"),
                               key_env, REJECTS)
    assert rejects["row"].to_list() == list(range(7))
    assert set(rejects["column"].to_list()) == {"age"}


def test_small_batches_stream_and_give_the_same_predictions(cli, key_env, trained: Path,
                                                            tmp_path: Path) -> None:
    assert cli("--config", trained, "predict", "--input", NEW).code == 0
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    whole = read_predictions(store.get("predict"), key_env)
    small = tmp_path / "small_batches.toml"
    small.write_text(trained.read_text().replace("[predict]", "[predict]\nbatch_size = 64"))
    reused = cli("--json", "--config", small, "predict", "--input", NEW)
    assert reused.json()["reused"] is True  # the batch size does not change any prediction
    result = cli("--json", "--config", small, "predict", "--input", NEW, "--force")
    assert result.code == 0 and result.json()["batches"] == 4
    streamed = read_predictions(store.get("predict"), key_env)
    assert streamed.drop("model_version").equals(whole.drop("model_version"))


def test_output_copy_is_encrypted_unless_plaintext_is_asked_for(cli, key_env, trained: Path,
                                                                tmp_path: Path) -> None:
    encrypted = tmp_path / "out" / "predictions.enc"
    assert cli("--config", trained, "predict", "--input", NEW, "--output", encrypted).code == 0
    assert crypto.is_encrypted(encrypted)
    plain = tmp_path / "out" / "predictions.csv"
    result = cli("--config", trained, "predict", "--input", NEW, "--output", plain,
                 "--plaintext-output")
    assert result.code == 0, result.stderr
    table = pl.read_csv(plain)
    assert table.height == 200 and "email" in table.columns and "name" in table.columns
    raw = pl.read_csv(NEW, infer_schema=False)
    assert not set(raw["email"].to_list()) & set(table["email"].to_list())
    assert cli("--config", trained, "predict", "--plaintext-output").code == 2


def test_non_private_model_warns_and_says_so_in_the_manifest(cli, key_env, small_config: Path,
                                                             tmp_path: Path) -> None:
    for stage in (["collect"], ["clean"], ["train", "--no-dp"]):
        assert cli("--config", small_config, *stage).code == 0
    result = cli("--json", "--config", small_config, "predict", "--input", NEW)
    assert result.code == 0
    assert "without differential privacy" in result.stderr
    out = result.json()
    assert out["model_private"] is False and "warning" in out
    manifest = json.loads((Path(out["path"]) / "manifest.json").read_text())
    assert manifest["figures"]["model_private"] is False


def test_predict_on_a_clean_artifact_scores_its_test_split(cli, key_env, trained: Path,
                                                           tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    clean = store.get("clean")
    result = cli("--json", "--config", trained, "predict", "--clean", clean.version)
    assert result.code == 0, result.stderr
    assert result.json()["rows_scored"] == clean.output("test.parquet.enc")["rows"]
