"""Databases as sources: SQLite and a real PostgreSQL server, collect -> clean -> train.

Specifications: the rows of a table or query stream into the encrypted artifact in
batches; the URI's secret never reaches the config, a manifest, --json, a log line or an
error (a wrong password exits 77 with a scrubbed message; an unreachable server 66); an
unchanged table is reused, a changed one makes a new version.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from personanet.stages.files import RECORDS
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore
from tests.conftest import all_bytes_under
from tests.db_fixtures import (
    database_config,
    sample_frame,
    scratch_pg_uri,
    write_pg,
    write_sqlite,
)


@pytest.fixture(scope="session")
def pg_uri() -> str:
    return scratch_pg_uri()


def _stages(cli, config: Path, root: Path, *extra: str) -> dict[str, dict]:
    out = {}
    for stage in ("collect", "clean", "train"):
        result = cli("--json", "--config", config, "--artifacts", root, stage, *extra)
        assert result.code == 0, result.stderr
        out[stage] = result.json()
    return out


def test_sqlite_table_collect_clean_train(cli, key_env, tmp_path: Path, small_csv: Path
                                         ) -> None:
    write_sqlite(tmp_path / "people.db", sample_frame(small_csv))
    config = database_config(tmp_path / "db.toml", {"sqlite": "people.db", "table": "people"})
    out = _stages(cli, config, tmp_path / "a")
    assert out["collect"]["rows"] == 400
    assert out["clean"]["rows_in"] == 400 and out["clean"]["rows_train"] > 200
    assert out["train"]["private"] is True and 0 < out["train"]["epsilon"] <= 1.0
    records = tables.read_artifact_table(ArtifactStore(tmp_path / "a", "persona").get(
        "collect"), RECORDS, key_env)
    assert records["email"].to_list() == sample_frame(small_csv)["email"].to_list()


def test_postgresql_query_collect_clean_train(cli, key_env, tmp_path: Path, small_csv: Path,
                                             pg_uri: str, monkeypatch) -> None:
    table = f"people_{secrets.token_hex(4)}"
    write_pg(pg_uri, sample_frame(small_csv), table)
    monkeypatch.setenv("PERSONA_DB", pg_uri)
    config = database_config(tmp_path / "db.toml", {
        "uri_env": "PERSONA_DB", "query": f"SELECT * FROM {table} WHERE age <> '17';",
        "batch_size": 128})
    root = tmp_path / "a"
    out = _stages(cli, config, root)
    expected = sample_frame(small_csv).filter(lambda_age_not_17())
    assert out["collect"]["rows"] == expected.height
    assert out["collect"]["database"]["database"].startswith("postgresql://127.0.0.1:")
    assert out["clean"]["rows_in"] == expected.height
    assert out["train"]["private"] is True
    secret = pg_uri.split("//", 1)[1].rsplit("@", 1)[0]  # user:password
    password = secret.split(":", 1)[1]
    everything = all_bytes_under(root) + config.read_bytes() + repr(out).encode()
    assert password.encode() not in everything and secret.encode() not in everything


def lambda_age_not_17():
    import polars as pl

    return pl.col("age") != "17"


def test_wrong_password_exits_77_without_the_secret(cli, key_env, tmp_path: Path,
                                                    pg_uri: str, monkeypatch) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    user, _, rest = pg_uri.split("//", 1)[1].partition("@")
    bad_uri = f"postgresql://{user.split(':')[0]}:{wrong}@{rest}"
    monkeypatch.setenv("PERSONA_DB", bad_uri)
    config = database_config(tmp_path / "db.toml", {"uri_env": "PERSONA_DB",
                                                    "table": "people"})
    result = cli("--config", config, "--artifacts", tmp_path / "a", "collect")
    assert result.code == 77, result.stderr
    said = result.stdout + result.stderr
    assert "refused the credentials in $PERSONA_DB" in said
    assert wrong not in said and bad_uri not in said and f":{wrong}@" not in said
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_server_exits_66_without_the_secret(cli, key_env, tmp_path: Path,
                                                        monkeypatch) -> None:
    password = secrets.token_hex(12)
    uri_file = tmp_path / "db.uri"
    uri_file.write_text(f"postgresql://someone:{password}@127.0.0.1:1/nowhere\n")
    config = database_config(tmp_path / "db.toml", {"uri_file": "db.uri", "table": "people"})
    result = cli("--config", config, "--artifacts", tmp_path / "a", "collect")
    assert result.code == 66, result.stderr
    assert "postgresql://127.0.0.1:1/nowhere: cannot connect" in result.stderr
    assert password not in result.stdout + result.stderr


def test_missing_uri_variable_exits_77(cli, key_env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("PERSONA_DB", raising=False)
    config = database_config(tmp_path / "db.toml", {"uri_env": "PERSONA_DB", "table": "t"})
    result = cli("--config", config, "--artifacts", tmp_path / "a", "collect")
    assert result.code == 77 and "PERSONA_DB" in result.stderr


def test_uri_in_the_config_is_refused(cli, key_env, tmp_path: Path) -> None:
    config = database_config(tmp_path / "db.toml", {
        "uri_env": "postgresql://u:p@h/db", "table": "t"})
    result = cli("--config", config, "--artifacts", tmp_path / "a", "collect")
    assert result.code == 78 and "u:p" not in result.stderr


def test_unchanged_table_reused_changed_table_new_version(cli, key_env, tmp_path: Path,
                                                          small_csv: Path) -> None:
    import sqlite3

    db = tmp_path / "people.db"
    write_sqlite(db, sample_frame(small_csv))
    config = database_config(tmp_path / "db.toml", {"sqlite": str(db), "table": "people"})
    root = tmp_path / "a"
    first = cli("--json", "--config", config, "--artifacts", root, "collect").json()
    again = cli("--json", "--config", config, "--artifacts", root, "collect").json()
    assert again["reused"] is True and again["version"] == first["version"]
    with sqlite3.connect(db) as conn:  # one value of one row changes
        conn.execute("UPDATE people SET age = '41' WHERE id = 7 AND age <> '41'")
    conn.close()
    changed = cli("--json", "--config", config, "--artifacts", root, "collect").json()
    assert changed["reused"] is False and changed["version"] != first["version"]
    assert changed["rows"] == first["rows"]


def test_rows_stream_in_batches_into_the_encrypted_file(cli, key_env, tmp_path: Path,
                                                        small_csv: Path, monkeypatch) -> None:
    """Each batch is handed to the encrypting writer before the next is read: reads and
    writes interleave (batch_size 50: eight batches of the 400 rows)."""
    from personanet.sources.database import DatabaseSource

    events: list[str] = []
    read_batches = DatabaseSource._text_batches

    def reading(self, batch_size, digest):
        for frame in read_batches(self, batch_size, digest):
            events.append("read")
            yield frame

    write_batches = tables.write_encrypted_parquet_stream

    def writing(path, frames, key):
        def seen():
            for frame in frames:
                yield frame
                events.append("written")
        return write_batches(path, seen(), key)

    monkeypatch.setattr(DatabaseSource, "_text_batches", reading)
    monkeypatch.setattr(tables, "write_encrypted_parquet_stream", writing)
    write_sqlite(tmp_path / "people.db", sample_frame(small_csv))
    config = database_config(tmp_path / "db.toml", {"sqlite": "people.db", "table": "people",
                                                    "batch_size": 50})
    result = cli("--json", "--config", config, "--artifacts", tmp_path / "a", "collect")
    assert result.code == 0, result.stderr
    writes = events[events.index("written") - 1:]  # the plan's fingerprint pass came first
    assert writes == ["read", "written"] * 8
    artifact = ArtifactStore(tmp_path / "a", "persona").get("collect")
    assert tables.read_artifact_table(artifact, RECORDS, key_env).height == 400


def test_scrub_removes_every_form_of_the_secret() -> None:
    from personanet.sources.database import Credential

    uri = "postgresql://ann:p%40ss-w0rd!@db.example.org:6543/people?sslmode=require"
    cred = Credential(uri, "$PERSONA_DB")
    said = cred.scrub(f"failed for {uri}; user ann:p%40ss-w0rd!; password p@ss-w0rd!; "
                      "other postgresql://bob:hunter2@x/y; password=hunter3 more")
    for secret in (uri, "p%40ss-w0rd!", "p@ss-w0rd!", "hunter2", "hunter3", "ann:"):
        assert secret not in said
    assert cred.public_uri == "postgresql://db.example.org:6543/people"
