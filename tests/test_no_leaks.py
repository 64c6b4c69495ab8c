"""No plaintext leaks (README: Privacy): names and emails never leave encryption.

A full `run` of the bundled sample's config (the first 3,000 records of
data/persona.csv.gz, and data/persona_new.csv to score) in real child processes, then a
byte-for-byte search for every raw name and email of both inputs in:

- every file under the artifact root (models, reports, plots, manifests, the ledger,
  checkpoints, the lock file, the ciphertexts);
- everything the runs printed: stderr with --log-format text and json (and --debug),
  stdout with --json and without;
- the system temp directory the runs used (tempfile.gettempdir() in the child), compared
  before and after, every new or modified file. The children get a temp directory of their
  own through TMPDIR, which tempfile, polars, torch and matplotlib all honour: the shared
  /tmp of a developer machine has other writers, whose files could hold this same sample.

Names are searched as UTF-8 bytes (and, for non-ASCII names, as JSON \\u escapes too).
Decrypted, the predictions and the clean tables must hold pseudonyms only: exactly the
keyed HMAC of each input's identifier, 32 hex characters.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from personanet.config import load_config
from personanet.privacy.pseudonym import pseudonym_key, pseudonymize
from personanet.stages.predict import read_predictions
from personanet.store import crypto, tables
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey
from tests.conftest import ROOT, run_subprocess, sample_lines, write_config

PREDICT_INPUT = ROOT / "data" / "persona_new.csv"
PSEUDONYM = re.compile(r"^[0-9a-f]{32}$")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[A-Za-z]{2,}")
IDENTIFIERS = ("name", "email")


def identifiers_of(csv_text: str) -> dict[str, set[str]]:
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    return {column: {row[column] for row in rows if row[column].strip()}
            for column in IDENTIFIERS}


def needles(values: set[str]) -> dict[bytes, str]:
    """The bytes a leaked value would show up as: UTF-8, and JSON's ASCII escapes."""
    out = {}
    for value in values:
        out[value.encode("utf-8")] = value
        if not value.isascii():
            out[json.dumps(value)[1:-1].encode("ascii")] = value
    return out


def files_state(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def find_leaks(haystacks: dict[str, bytes], searched: dict[bytes, str]) -> list[str]:
    """'<where>: <value>' for every raw value found (searched once in one joined blob)."""
    labels = list(haystacks)
    separator = b"\x00\xff\x00"
    blob = separator.join(haystacks[label] for label in labels)
    starts, offset = [], 0
    for label in labels:
        starts.append(offset)
        offset += len(haystacks[label]) + len(separator)
    leaks = []
    for needle, value in searched.items():
        at = blob.find(needle)
        if at >= 0:
            where = labels[max(i for i, start in enumerate(starts) if start <= at)]
            leaks.append(f"{where}: {value!r}")
    return sorted(leaks)


@pytest.mark.slow
def test_a_full_run_leaks_no_name_or_email_to_artifacts_logs_or_temp_files(
        tmp_path: Path, key_env: MasterKey) -> None:
    key = key_env
    text = sample_lines(2400, split="train") + sample_lines(600, split="test").split("\n", 1)[1]
    source = tmp_path / "persona_3000.csv.gz"
    with gzip.open(source, "wt", encoding="utf-8") as fh:
        fh.write(text)
    config_path = write_config(tmp_path / "persona.toml", source, overrides=f"""
[train]
epochs = 2
[evaluate]
min_accuracy = 0.0
bootstrap = 20
[predict]
source = {json.dumps(str(PREDICT_INPUT))}
""")
    config = load_config(config_path)
    root = tmp_path / "artifacts"
    store = ArtifactStore(root, config.dataset.name)

    raw = identifiers_of(text)
    new_people = PREDICT_INPUT.read_text("utf-8")
    for column, values in identifiers_of(new_people).items():
        raw[column] |= values
    searched = needles(raw["name"] | raw["email"])
    assert len(raw["email"]) > 3000
    assert sum(not name.isascii() for name in raw["name"]) > 100  # ś, ø, Ō... in UTF-8

    temp = tmp_path / "system-temp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    seen = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                          env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == str(temp)
    temp_before = files_state(temp)

    base = ["--config", str(config_path), "--artifacts", str(root)]
    commands = {
        "run --json, text log": [*base, "--log-format", "text", "--json", "run"],
        "run --force collect, json log, --debug": [*base, "--log-format", "json", "--debug",
                                                   "run", "--force", "collect"],
        "budget show": [*base, "budget", "show"],
        "artifacts list": [*base, "--json", "artifacts", "list"],
        "artifacts verify": [*base, "--log-format", "json", "artifacts", "verify"],
    }
    haystacks: dict[str, bytes] = {}
    for label, args in commands.items():
        done = run_subprocess(args, env=env)
        assert done.returncode == 0, f"{label}: {done.stderr}"
        haystacks[f"stdout of {label}"] = done.stdout.encode("utf-8")
        haystacks[f"stderr of {label}"] = done.stderr.encode("utf-8")
    first = json.loads(haystacks["stdout of run --json, text log"])
    assert [s["stage"] for s in first["stages"]] == [
        "collect", "clean", "train", "evaluate", "predict"]

    for path in sorted(root.rglob("*")):
        if path.is_file():
            haystacks[f"artifact file {path.relative_to(root)}"] = path.read_bytes()
    changed = {p for p, state in files_state(temp).items() if temp_before.get(p) != state}
    for path in sorted(changed):
        haystacks[f"temp file {path}"] = path.read_bytes()

    # Decrypted, predictions and clean tables are searched too: they must hold pseudonyms.
    predict = store.get("predict")
    predictions = read_predictions(predict, key)
    haystacks["decrypted predictions"] = predictions.write_csv().encode("utf-8")
    haystacks["decrypted rejects"] = crypto.read_encrypted_file(
        predict.file("rejects.csv.enc"), key)
    clean = store.get("clean")
    clean_tables = {name: tables.read_encrypted_parquet(clean.file(name), key)
                    for name in ("train.parquet.enc", "test.parquet.enc")}
    for name, frame in clean_tables.items():
        haystacks[f"decrypted clean {name}"] = frame.write_csv().encode("utf-8")

    leaks = find_leaks(haystacks, searched)
    assert not leaks, f"{len(leaks)} raw identifiers found, e.g.\n" + "\n".join(leaks[:20])

    # Predictions: each person's identifiers are exactly their keyed pseudonyms.
    scored = pl.read_csv(PREDICT_INPUT, infer_schema=False)
    hmac_key = pseudonym_key(key)
    assert predictions.height == predict.figures["rows_scored"] > 0
    for column in IDENTIFIERS:
        case = config.columns[column].case
        expected = pseudonymize(scored[column], key=hmac_key, column=column, case=case)
        got = predictions[column].cast(pl.String).to_list()
        assert all(PSEUDONYM.match(value) for value in got), got[:5]
        assert got == [expected[i] for i in predictions["row"].to_list()]
    for frame in clean_tables.values():
        for column in IDENTIFIERS:
            assert all(PSEUDONYM.match(v) for v in frame[column].to_list()), column

    # Reports: no identifier at all, not even something shaped like an email.
    evaluate = store.get("evaluate")
    for name in ("report.md", "metrics.json"):
        report = evaluate.file(name).read_text("utf-8")
        assert not EMAIL.search(report), f"{name}: {EMAIL.search(report)}"
    print(f"\nsearched {len(searched)} raw values in {len(haystacks)} places "
          f"({sum(map(len, haystacks.values()))} bytes; {len(changed)} new temp files)")
