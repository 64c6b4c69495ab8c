"""Streaming: files read in bounded blocks give exactly the rows of a whole-file read."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from personanet.config import SourceConfig
from personanet.sources import csv_dialect
from personanet.sources.csv_blocks import csv_frames
from personanet.sources.files import FileSource

TRICKY = (
    'name,note,score\r\n'
    '"Ann ""the"" Smith","line one\nline two, with a comma",1\r\n'
    'Bob,"",2\r\n'
    '"Zoë","quoted ""\n"" newline",3\r\n'
    'plain,unquoted text,4\r\n'
    '"a,b","c\r\nd",5'  # no line end after the last record
)


def _arguments(path: Path, options: SourceConfig) -> dict:
    data = csv_dialect.csv_input(path, options)
    return csv_dialect.csv_arguments(options, csv_dialect.csv_layout(path, data, options))


@pytest.mark.parametrize("block_bytes", [1, 7, 16, 64, 1 << 20])
@pytest.mark.parametrize("compressed", [False, True], ids=["csv", "csv.gz"])
def test_blocks_cut_only_between_records(tmp_path: Path, block_bytes: int,
                                         compressed: bool) -> None:
    path = tmp_path / ("tricky.csv.gz" if compressed else "tricky.csv")
    data = TRICKY.encode("utf-8")
    path.write_bytes(gzip.compress(data) if compressed else data)
    options = SourceConfig()
    arguments = _arguments(path, options)
    whole = pl.read_csv(path, **arguments)
    frames = list(csv_frames(path, arguments, batch_size=2, block_bytes=block_bytes))
    assert all(f.height <= 2 for f in frames)
    assert pl.concat(frames).equals(whole)
    assert whole.height == 5 and whole["note"][0] == "line one\nline two, with a comma"


def test_without_quoting_every_line_end_ends_a_record(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("a;b\n" + "".join(f'x"{i};{i}\n' for i in range(50)))
    options = SourceConfig(delimiter=";", quote_char="")
    arguments = _arguments(path, options)
    frames = list(csv_frames(path, arguments, batch_size=8, block_bytes=16))
    assert pl.concat(frames).equals(pl.read_csv(path, **arguments))
    assert sum(f.height for f in frames) == 50


def test_a_sources_batches_hold_the_rows_of_its_whole_read(tmp_path: Path) -> None:
    rows = "".join(f'"p{i}","multi\nline {i}",{i}\n' for i in range(3000))
    path = tmp_path / "many.csv"
    path.write_text("name,note,score\n" + rows)
    source = FileSource(path, SourceConfig())
    batches = list(source.batches(1000))
    assert len(batches) >= 3 and all(b.height <= 1000 for b in batches)
    assert pl.concat(batches).equals(source.read())


def test_the_header_is_read_without_reading_the_whole_file(tmp_path: Path,
                                                           monkeypatch) -> None:
    path = tmp_path / "big.csv"
    path.write_text("a,b\n" + "1,2\n" * 400_000)  # 1.6 MB: more than the 1 MiB head
    seen: list[object] = []
    real = pl.read_csv

    def spy(source, *args, **kwargs):
        seen.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pl, "read_csv", spy)
    layout = csv_dialect.csv_layout(path, path, SourceConfig())
    assert layout.names == ["a", "b"]
    assert seen and all(isinstance(s, bytes) and len(s) <= 1 << 20 for s in seen)


# ------------------------------------------------------------------ clean in batches


def _cleaned(cli, config: Path, key) -> dict:
    import dataclasses

    from personanet.config import load_config
    from personanet.stages.clean import CleanReport
    from personanet.store import tables
    from personanet.store.artifacts import ArtifactStore

    result = cli("--json", "--config", config, "clean", "--force")
    assert result.code == 0, result.stderr
    loaded = load_config(config)
    artifact = ArtifactStore(config.parent / "artifacts", loaded.dataset.name).get(
        "clean", result.json()["version"])
    frames = {name: tables.read_artifact_table(artifact, name, key) for name in
              ("train.parquet.enc", "test.parquet.enc", "quarantine.parquet.enc")}
    names = {f.name for f in dataclasses.fields(CleanReport)}
    figures = {k: v for k, v in result.json().items() if k in names}
    assert figures["rows_in"] > 0
    return {"figures": figures, **frames}


@pytest.fixture
def messy_config(tmp_path: Path) -> Path:
    """The sample with exact duplicates far from their originals, duplicates by email,
    a person over the contribution bound and rows without a unit."""
    from .conftest import sample_lines, write_config

    lines = sample_lines(300).splitlines()
    header, rows = lines[0], lines[1:]
    email = header.split(",").index("email")
    fields = rows[7].split(",")
    fields[email] = ""  # no privacy unit: quarantined, in the last batch
    rows = rows + rows[:40] + [rows[5]] * 3 + [",".join(fields)]  # copies in later batches
    path = tmp_path / "messy.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return write_config(tmp_path / "persona.toml", path,
                        overrides="[clean]\nmax_rows_per_unit = 2\n")


def test_clean_in_small_batches_equals_clean_in_one(cli, key_env, messy_config: Path,
                                                    monkeypatch) -> None:
    from personanet.stages import clean_stream

    assert cli("--config", messy_config, "collect").code == 0
    whole = _cleaned(cli, messy_config, key_env)
    monkeypatch.setattr(clean_stream, "ONE_PASS_BYTES", 0)
    monkeypatch.setattr(clean_stream, "BATCH_ROWS", 37)
    batched = _cleaned(cli, messy_config, key_env)
    figures = whole["figures"]
    assert figures["duplicates_exact"] == 43 and figures["rows_quarantined"] >= 1
    assert batched["figures"] == figures
    for name in ("train.parquet.enc", "test.parquet.enc", "quarantine.parquet.enc"):
        assert batched[name].equals(whole[name]), name


def test_a_shared_record_hash_alone_makes_no_duplicate(cli, key_env, messy_config: Path,
                                                       monkeypatch) -> None:
    from personanet.stages import clean_stream

    assert cli("--config", messy_config, "collect").code == 0
    whole = _cleaned(cli, messy_config, key_env)
    monkeypatch.setattr(clean_stream, "ONE_PASS_BYTES", 0)
    monkeypatch.setattr(clean_stream, "BATCH_ROWS", 50)
    # Every record hashes alike: only the comparison of whole records may decide.
    monkeypatch.setattr(pl.DataFrame, "hash_rows",
                        lambda self, seed=0: pl.Series([0] * self.height, dtype=pl.UInt64))
    batched = _cleaned(cli, messy_config, key_env)
    assert batched["figures"] == whole["figures"]
    assert batched["train.parquet.enc"].equals(whole["train.parquet.enc"])


# ------------------------------------------------------------------ collect in batches


def test_a_bad_later_source_fails_collect_with_its_own_error(cli, key_env, tmp_path: Path,
                                                             monkeypatch) -> None:
    from personanet.stages import collect as collect_stage

    from .conftest import sample_lines, write_config

    good = tmp_path / "a.csv"
    good.write_text(sample_lines(120))
    bad = tmp_path / "b.csv"
    header, *rows = sample_lines(30).splitlines()
    columns = header.split(",")
    drop = columns.index("income")  # the target: required
    bad.write_text("\n".join(",".join(v for i, v in enumerate(line.split(",")) if i != drop)
                             for line in [header, *rows]) + "\n")
    config = write_config(tmp_path / "persona.toml", good)
    monkeypatch.setattr(collect_stage, "BATCH_ROWS", 50)  # the error comes mid-stream
    result = cli("--config", config, "collect", "--source", str(good), "--source", str(bad))
    assert result.code == 65, result.stderr
    assert "b.csv" in result.stderr and "income" in result.stderr
    # Nothing was committed, and no plaintext was left behind.
    assert not list((tmp_path / "artifacts").rglob("records.parquet.enc"))


def test_collect_in_small_batches_keeps_every_row_in_order(cli, key_env, tmp_path: Path,
                                                           monkeypatch) -> None:
    from personanet.config import load_config
    from personanet.stages import collect as collect_stage
    from personanet.store import tables
    from personanet.store.artifacts import ArtifactStore

    from .conftest import sample_lines, write_config

    source = tmp_path / "s.csv"
    source.write_text(sample_lines(257))
    config = write_config(tmp_path / "persona.toml", source)
    monkeypatch.setattr(collect_stage, "BATCH_ROWS", 10)
    result = cli("--json", "--config", config, "collect")
    assert result.code == 0, result.stderr
    artifact = ArtifactStore(tmp_path / "artifacts", load_config(config).dataset.name).get(
        "collect", result.json()["version"])
    records = tables.read_artifact_table(artifact, "records.parquet.enc", key_env)
    expected = FileSource(source, SourceConfig()).read().select(records.columns)
    assert records.equals(expected) and records.height == 257
