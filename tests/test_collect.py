"""collect: raw exports in, encrypted records out, nothing readable on disk."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from personanet.config import load_config
from personanet.errors import KeyAccessError
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore

from .conftest import CONFIG, SAMPLE, all_bytes_under, write_config


def test_collect_bundled_sample_json_before_or_after_command(cli, key_env, tmp_path: Path
                                                               ) -> None:
    first = cli("--json", "collect", "--config", CONFIG, "--artifacts", tmp_path / "a")
    assert first.code == 0, first.stderr
    out = first.json()
    assert out["stage"] == "collect" and out["rows"] == 48842 and out["reused"] is False
    assert Path(out["path"]).is_dir() and out["version"] in out["path"]
    entries_before = sorted(p.name for p in (tmp_path / "a" / "persona" / "collect").iterdir())

    second = cli("collect", "--config", CONFIG, "--json", "--artifacts", tmp_path / "a")
    assert second.code == 0, second.stderr
    again = second.json()
    assert again["reused"] is True and again["version"] == out["version"]
    entries_after = sorted(p.name for p in (tmp_path / "a" / "persona" / "collect").iterdir())
    assert entries_after == entries_before  # nothing new written


def test_no_plaintext_identifier_under_artifact_root(cli, key_env, tmp_path: Path) -> None:
    root = tmp_path / "a"
    assert cli("--config", CONFIG, "--artifacts", root, "collect").code == 0
    raw = pl.read_csv(SAMPLE, infer_schema=False)
    names = raw["name"].unique().to_list()
    emails = raw["email"].to_list()
    blob = all_bytes_under(root)
    leaked = [v for v in names + emails if v.encode() in blob]
    assert leaked == []
    # and the records are really there, for the key holder
    store = ArtifactStore(root, "persona")
    records = tables.read_encrypted_parquet(store.get("collect").file("records.parquet.enc"),
                                            key_env)
    assert records.height == 48842 and records["email"].to_list() == emails


def test_wrong_key_cannot_read_records(cli, key_env, tmp_path: Path) -> None:
    from personanet.store.keys import MasterKey

    root = tmp_path / "a"
    assert cli("--config", CONFIG, "--artifacts", root, "collect").code == 0
    path = ArtifactStore(root, "persona").get("collect").file("records.parquet.enc")
    with pytest.raises(KeyAccessError):
        tables.read_encrypted_parquet(path, MasterKey.generate())


def test_extra_columns_dropped_and_reported(cli, key_env, tmp_path: Path, small_csv: Path
                                           ) -> None:
    frame = pl.read_csv(small_csv, infer_schema=False).with_columns(
        pl.lit("x").alias("phone"))
    source = tmp_path / "extra.parquet"
    frame.write_parquet(source)
    config = write_config(tmp_path / "c.toml", source)
    result = cli("--json", "--config", config, "collect")
    assert result.code == 0, result.stderr
    assert result.json()["columns_dropped"] == ["phone"]
    assert "phone" not in result.json()["columns"]


def test_glob_of_csv_and_ndjson_sources(cli, key_env, tmp_path: Path, small_csv: Path) -> None:
    frame = pl.read_csv(small_csv, infer_schema=False)
    folder = tmp_path / "exports"
    folder.mkdir()
    frame.head(150).write_csv(folder / "part1.csv")
    frame.slice(150).write_ndjson(folder / "part2.ndjson")
    config = write_config(tmp_path / "c.toml", folder / "part*")
    result = cli("--json", "--config", config, "collect")
    assert result.code == 0, result.stderr
    out = result.json()
    assert out["rows"] == frame.height
    assert [s["rows"] for s in out["sources"]] == [150, frame.height - 150]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"name,email,age\n", "required column"),
        (None, "no records"),
        (b"name;email;age;workclass\nA;a@x;3;Private\n", "another delimiter"),
        (b"\x00\x01\x02binary\xff\xfe garbage\n\x00", "required column|cannot read"),
    ],
    ids=["empty", "missing-columns", "header-only", "wrong-delimiter", "binary"],
)
def test_malformed_sources_exit_65_with_one_line(cli, key_env, tmp_path: Path,
                                                 content: bytes | None, message: str) -> None:
    source = tmp_path / "bad.csv"
    if content is None:
        with gzip.open(SAMPLE) as fh:
            content = fh.readline()  # the real header, no rows
    source.write_bytes(content)
    config = write_config(tmp_path / "c.toml", source)
    result = cli("--config", config, "collect")
    assert result.code == 65, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    import re

    assert re.search(message, lines[0])
    assert not (tmp_path / "artifacts" / "persona" / "collect").exists() or not [
        p for p in (tmp_path / "artifacts" / "persona" / "collect").iterdir()]


def test_missing_source_exits_66(cli, key_env, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", tmp_path / "nowhere-*.csv")
    result = cli("--config", config, "collect")
    assert result.code == 66 and "matches no file" in result.stderr


def test_missing_key_exits_77(cli, tmp_path: Path, small_config: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERSONANET_KEY", raising=False)
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    result = cli("--config", small_config, "collect")
    assert result.code == 77 and "PERSONANET_KEY_FILE" in result.stderr


@pytest.mark.slow
def test_sigkilled_collect_leaves_no_artifact_that_looks_complete(tmp_path: Path, key_env
                                                                  ) -> None:
    # Eight copies of the sample make a collect that takes long enough to be killed mid-way.
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(8):
        shutil.copy(SAMPLE, folder / f"part{i}.csv.gz")
    config = write_config(tmp_path / "c.toml", folder / "*.csv.gz")
    root = tmp_path / "artifacts"
    env = {**os.environ, "PERSONANET_KEY": key_env.to_base64()}
    args = [sys.executable, "-m", "personanet", "--config", str(config), "--artifacts", str(root),
            "collect", "--force"]
    started = time.monotonic()
    subprocess.run(args, env=env, check=True, capture_output=True)
    full = time.monotonic() - started
    store = ArtifactStore(root, "persona")
    config_obj = load_config(config)
    assert config_obj.dataset.name == "persona"
    for fraction in (0.2, 0.4, 0.55, 0.7, 0.8, 0.9, 0.95):
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for artifact in store.versions("collect"):
        manifest = json.loads((artifact.path / "manifest.json").read_text())
        records = tables.read_encrypted_parquet(artifact.file("records.parquet.enc"), key_env)
        assert records.height == manifest["figures"]["rows"] == 8 * 48842
    visible = {p.name for p in store.stage_dir("collect").iterdir() if not p.name.startswith(".")}
    assert visible == {a.version for a in store.versions("collect")}
