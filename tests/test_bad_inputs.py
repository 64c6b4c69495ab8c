"""A corpus of malformed sources through the real CLI: refused cleanly, or every row accounted for.

Each file in tests/data/bad/ (made by make_bad.py) has its expected outcome in
EXPECTED.toml: either `collect` exits 65 with one line naming the file and no
artifact, or `collect` reads every record and `clean` puts each one in exactly one
place (train, test, duplicates, quarantine with a reason), as the figures and the
decrypted quarantine file both say.
"""

from __future__ import annotations

import collections
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from personanet.store import tables

from .conftest import ROOT, write_config

BAD = ROOT / "tests" / "data" / "bad"
EXPECTED: dict[str, dict[str, Any]] = tomllib.loads((BAD / "EXPECTED.toml").read_text("utf-8"))
COUNT_KINDS = ("missing", "invalid", "clipped", "other", "imputed")
EMAIL = re.compile(rb"[\w.+-]+@example\.(?:com|org|net|fr)")


def cases(*, refused: bool | None = None, bug_key: str = "bug") -> list[Any]:
    out = []
    for name, spec in EXPECTED.items():
        if refused is not None and (spec["exit"] == 65) != refused:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=spec[bug_key])] if bug_key in spec else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def run_collect_and_clean(cli, tmp_path: Path, name: str) -> tuple[Any, Any, Path]:
    config = write_config(tmp_path / "persona.toml", BAD / name)
    root = tmp_path / "artifacts"
    collected = cli("--json", "--config", config, "--artifacts", root, "collect")
    if collected.code != 0:
        return collected, None, root
    cleaned = cli("--json", "--config", config, "--artifacts", root, "clean")
    return collected, cleaned, root


def versions(root: Path, stage: str) -> list[Path]:
    folder = root / "persona" / stage
    return sorted(folder.iterdir()) if folder.is_dir() else []


def assert_one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("personanet: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- the corpus


def test_corpus_has_thirty_files_each_with_an_expected_outcome() -> None:
    files = {p.name for p in BAD.iterdir() if p.name not in ("make_bad.py", "EXPECTED.toml")}
    assert files == set(EXPECTED), "every corpus file needs an EXPECTED.toml entry, and back"
    assert len(files) >= 30
    for name, spec in EXPECTED.items():
        assert spec["exit"] in (0, 65), name
        assert spec.get("defect"), f"{name}: say what is wrong with the file"


@pytest.mark.parametrize("name", cases())
def test_bad_source_is_refused_or_every_row_is_accounted_for(cli, key_env, tmp_path: Path,
                                                             name: str) -> None:
    spec = EXPECTED[name]
    collected, cleaned, root = run_collect_and_clean(cli, tmp_path, name)

    if spec["exit"] == 65:
        assert collected.code == 65, (collected.code, collected.stderr)
        line = assert_one_line_error(collected.stderr)
        assert name in line, f"the message must name the file: {line}"
        assert re.search(spec["message"], line), line
        assert collected.json()["exit_code"] == 65
        assert versions(root, "collect") == [], "a refused source leaves no artifact"
        return

    assert collected.code == 0, collected.stderr
    assert collected.json()["rows"] == spec["rows"], "the reader lost or invented records"
    assert cleaned.code == 0, cleaned.stderr
    figures = cleaned.json()
    quarantined_rows = spec.get("quarantined_rows", [])
    expected = {
        "rows_in": spec["rows"],
        "rows_train": spec["train"],
        "rows_test": spec["test"],
        "duplicates_removed": spec.get("duplicates", 0),
        "rows_quarantined": len(quarantined_rows),
        "quarantined_by_reason": spec.get("by_reason", {}),
        "rows_dropped_by_bounding": 0,
    }
    assert {k: figures[k] for k in expected} == expected
    assert figures["rows_in"] == (figures["rows_train"] + figures["rows_test"]
                                  + figures["duplicates_removed"] + figures["rows_quarantined"]
                                  + figures["rows_dropped_by_bounding"])
    for column, counts in figures["columns"].items():
        want = spec.get("columns", {}).get(column, {})
        assert {k: counts[k] for k in COUNT_KINDS} == {k: want.get(k, 0) for k in COUNT_KINDS}, \
            column

    # The encrypted files agree with the figures: one quarantine line per refused row,
    # each with a reason, and train + test hold exactly the rows said.
    clean_dir = Path(figures["path"])
    quarantine = tables.read_encrypted_parquet(clean_dir / "quarantine.parquet.enc", key_env)
    assert sorted(quarantine["row"].to_list()) == quarantined_rows
    assert dict(collections.Counter(quarantine["reason"].to_list())) == expected[
        "quarantined_by_reason"]
    assert quarantine["column"].null_count() == 0
    for split in ("train", "test"):
        frame = tables.read_encrypted_parquet(clean_dir / f"{split}.parquet.enc", key_env)
        assert frame.height == figures[f"rows_{split}"]


@pytest.mark.parametrize("name", cases(refused=True, bug_key="leak_bug"))
def test_refusal_message_never_repeats_a_record_value(cli, key_env, tmp_path: Path,
                                                      name: str) -> None:
    # The message lands in cron mail and log files: it may name the file, never a person.
    collected, _, _ = run_collect_and_clean(cli, tmp_path, name)
    emails = {m.decode() for m in EMAIL.findall((BAD / name).read_bytes())}
    output = collected.stderr + collected.stdout
    assert not [e for e in emails if e in output], output


def test_refusal_with_log_format_json_is_one_json_object(cli, key_env, tmp_path: Path) -> None:
    config = write_config(tmp_path / "persona.toml", BAD / "semicolon_delimiter.csv")
    result = cli("--log-format", "json", "--config", config, "collect")
    assert result.code == 65
    (line,) = result.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["exit_code"] == 65 and "semicolon_delimiter.csv" in entry["message"]
