"""Reading one's own outputs: `artifacts export` decrypts an artifact's table on explicit
request, never overwrites, and the row number joins predictions and rejects back to the
input; `predict --output` refuses ciphertext under a plaintext name."""

from __future__ import annotations

import stat
from pathlib import Path

import polars as pl

from personanet.privacy.pseudonym import pseudonym_key, pseudonymize
from personanet.store.artifacts import ArtifactStore

from .conftest import ROOT, write_config
from .test_dialects import DATA, adult_config

NEW = ROOT / "data" / "persona_new.csv"
STRICT_AGE = ("[train]\nepochs = 1\nbatch_size = 64\nlearning_rate = 0.01\n"
              "[columns.age]\ninvalid = \"quarantine\"\n")


def with_bad_ages(source: Path, target: Path, rows: int) -> Path:
    """`source` with the age of its first `rows` records made unreadable."""
    frame = pl.read_csv(source, infer_schema=False)
    frame.with_columns(pl.when(pl.int_range(pl.len()) < rows).then(pl.lit("n/a"))
                       .otherwise(pl.col("age")).alias("age")).write_csv(target)
    return target


def test_export_decrypts_predictions_and_rejects_which_join_back_to_the_input(
        cli, key_env, tmp_path: Path, small_csv: Path) -> None:
    config = write_config(tmp_path / "strict.toml", small_csv, overrides=STRICT_AGE)
    for stage in ("collect", "clean", "train"):
        assert cli("--config", config, stage).code == 0
    source = with_bad_ages(NEW, tmp_path / "new.csv", 7)
    predicted = cli("--json", "--config", config, "predict", "--input", source)
    assert predicted.code == 0, predicted.stderr
    version = predicted.json()["version"]

    refused = cli("--config", config, "artifacts", "export", version, "predictions.csv.enc",
                  "--output", tmp_path / "preds.csv")
    assert refused.code == 2 and "--plaintext-output" in refused.stderr
    assert not (tmp_path / "preds.csv").exists()

    preds_path, rejects_path = tmp_path / "preds.csv", tmp_path / "rejects.parquet"
    for name, out in (("predictions.csv.enc", preds_path), ("rejects.csv.enc", rejects_path)):
        result = cli("--json", "--config", config, "artifacts", "export", version, name,
                     "--output", out, "--plaintext-output")
        assert result.code == 0, result.stderr
        assert "plaintext" in result.stderr  # logged
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    preds = pl.read_csv(preds_path)
    rejects = pl.read_parquet(rejects_path)  # the format follows the output's suffix
    assert rejects["row"].to_list() == list(range(7))
    assert set(rejects["column"].to_list()) == {"age"}
    assert sorted(preds["row"].to_list() + rejects["row"].to_list()) == list(range(200))

    # `row` is the 0-based position of the record in the input: join on it.
    raw = pl.read_csv(source, infer_schema=False).with_row_index("row")
    joined = preds.join(raw.select("row", pl.col("email").alias("raw_email")), on="row")
    expected = pseudonymize(joined["raw_email"], key=pseudonym_key(key_env), column="email",
                            case="lower")
    assert joined.height == 193 and joined["email"].to_list() == expected.to_list()

    before = preds_path.read_bytes()
    again = cli("--config", config, "artifacts", "export", version, "predictions.csv.enc",
                "--output", preds_path, "--plaintext-output")
    assert again.code == 73 and "exists" in again.stderr
    assert preds_path.read_bytes() == before

    streamed = cli("--config", config, "artifacts", "export", version, "predictions.csv.enc",
                   "--output", "-", "--plaintext-output")
    assert streamed.code == 0 and streamed.stdout.encode() == before

    # predict's own plaintext copy follows its name's suffix too.
    copy = tmp_path / "copy.parquet"
    assert cli("--config", config, "predict", "--input", source, "--output", copy,
               "--plaintext-output").code == 0
    assert pl.read_parquet(copy).equals(preds)


def test_export_decrypts_the_quarantine_of_clean(cli, key_env, tmp_path: Path,
                                                 small_csv: Path) -> None:
    source = with_bad_ages(small_csv, tmp_path / "records.csv", 3)
    config = write_config(tmp_path / "strict.toml", source, overrides=STRICT_AGE)
    assert cli("--config", config, "collect").code == 0
    cleaned = cli("--json", "--config", config, "clean")
    assert cleaned.code == 0 and cleaned.json()["rows_quarantined"] == 3
    out = tmp_path / "quarantine.csv"
    result = cli("--config", config, "artifacts", "export", cleaned.json()["version"][:20],
                 "quarantine.parquet.enc", "--output", out, "--plaintext-output")
    assert result.code == 0, result.stderr
    quarantine = pl.read_csv(out)
    assert quarantine.columns == ["row", "column", "reason"]
    assert quarantine["row"].to_list() == [0, 1, 2]
    assert set(quarantine["reason"].to_list()) == {"invalid_value"}


def test_predict_output_with_a_plaintext_name_needs_plaintext_output(
        cli, key_env, tmp_path: Path, small_config: Path) -> None:
    for name in ("preds.csv", "preds.parquet", "preds.json", "preds.csv.gz"):
        result = cli("--config", small_config, "predict", "--input", NEW, "--output",
                     tmp_path / name)
        assert result.code == 2, (name, result.stderr)
        assert "--plaintext-output" in result.stderr and f"{name}.enc" in result.stderr
        assert not (tmp_path / name).exists()
    # An encrypted name passes the check (and then needs a model, which this root lacks).
    assert cli("--config", small_config, "predict", "--input", NEW, "--output",
               tmp_path / "preds.csv.enc").code == 66
    assert not (tmp_path / "artifacts" / "persona" / "predict").exists()
    # export's stdout cannot carry both the table and --json's object.
    both = cli("--json", "--config", small_config, "artifacts", "export", "2026", "x.csv.enc",
               "--output", "-", "--plaintext-output")
    assert both.code == 2 and both.json()["exit_code"] == 2


def test_predict_reads_its_input_with_the_source_options(cli, key_env, tmp_path: Path) -> None:
    config = adult_config(tmp_path / "adult.toml", DATA / "adult_head.data")
    for stage in ("collect", "clean", "train"):
        result = cli("--config", config, stage)
        assert result.code == 0, result.stderr
    predicted = cli("--json", "--config", config, "predict", "--input",
                    DATA / "adult_new.data")
    assert predicted.code == 0, predicted.stderr
    out = predicted.json()
    assert (out["rows_in"], out["rows_scored"], out["rows_rejected"]) == (40, 40, 0)
    unnamed = ["fnlwgt", "education", "education_num", "marital_status", "occupation",
               "relationship", "race", "capital_gain", "capital_loss", "native_country"]
    assert out["columns_dropped"] == unnamed
    notes = [line for line in predicted.stderr.splitlines() if "not in the config" in line]
    assert len(notes) == 1 and "native_country" in notes[0]
    store = ArtifactStore(tmp_path / "artifacts", "adult")
    from personanet.stages.predict import read_predictions

    preds = read_predictions(store.get("predict"), key_env)
    assert preds["row"].to_list() == list(range(40))
    assert set(preds["prediction"].to_list()) <= {"<=50K", ">50K"}
