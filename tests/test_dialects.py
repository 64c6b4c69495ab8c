"""Real files as they come: [source] read options and a generated row unit.

A headerless, comma + space separated `.data` export (the raw UCI Adult file) and a
Latin-1 CSV go through collect and clean with `[source]` options; without them they
are refused with the way forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from personanet.config import ROW_UNIT, load_config
from personanet.privacy.pseudonym import pseudonym_key, pseudonymize
from personanet.sources.files import FileSource
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore

DATA = Path(__file__).resolve().parent / "data" / "adult"
ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status",
                 "occupation", "relationship", "race", "sex", "capital_gain", "capital_loss",
                 "hours_per_week", "native_country", "income"]


def adult_config(path: Path, source: Path, *, source_options: bool = True) -> Path:
    """A config for the raw UCI file: no identifier, so each row is a person."""
    options = f"""
[source]
format = "csv"
has_header = false
trim_whitespace = true
null_values = ["?"]
column_names = {json.dumps(ADULT_COLUMNS)}
""" if source_options else ""
    path.write_text(f"""
[dataset]
name = "adult"
source = "{source}"
target = "income"
privacy_unit = "{ROW_UNIT}"
{options}
[columns.age]
type = "numeric"
bounds = [17, 90]

[columns.workclass]
categories = ["Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov",
              "State-gov", "Without-pay", "Never-worked"]

[columns.hours_per_week]
type = "numeric"
bounds = [1, 99]

[columns.sex]
categories = ["Female", "Male"]
sensitive = true

[columns.income]
categories = ["<=50K", ">50K"]

[train]
epochs = 1
batch_size = 32
learning_rate = 0.01
""")
    return path


def test_headerless_comma_space_data_file_goes_through_collect_and_clean(
        cli, key_env, tmp_path: Path) -> None:
    config = adult_config(tmp_path / "adult.toml", DATA / "adult_head.data")
    collected = cli("--json", "--config", config, "collect")
    assert collected.code == 0, collected.stderr
    assert collected.json()["rows"] == 300
    cleaned = cli("--json", "--config", config, "clean")
    assert cleaned.code == 0, cleaned.stderr
    report = cleaned.json()
    # Each row is a person: every row is its own unit, nothing is a duplicate of another.
    assert report["rows_train"] + report["rows_test"] == 300
    assert report["units_train"] + report["units_test"] == 300
    assert report["duplicates_removed"] == report["rows_dropped_by_bounding"] == 0
    assert report["rows_quarantined"] == 0
    # "?" is missing (then imputed), not an unknown category; " State-gov" was trimmed.
    lines = (DATA / "adult_head.data").read_text().splitlines()
    unknown_workclass = sum(1 for line in lines if line.split(", ")[1] == "?")
    assert report["columns"]["workclass"]["missing"] == unknown_workclass > 0
    assert report["columns"]["workclass"]["other"] == 0
    assert report["columns"]["sex"]["other"] == 0
    store = ArtifactStore(tmp_path / "artifacts", "adult")
    train = tables.read_artifact_table(store.get("clean"), "train.parquet.enc", key_env)
    assert set(train["sex"].unique().to_list()) == {"Female", "Male"}
    assert set(train["income"].unique().to_list()) == {"<=50K", ">50K"}


def test_source_options_apply_to_collect_source_too(cli, key_env, tmp_path: Path) -> None:
    config = adult_config(tmp_path / "adult.toml", tmp_path / "elsewhere.data")
    result = cli("--json", "--config", config, "collect", "--source",
                 DATA / "adult_head.data")
    assert result.code == 0, result.stderr
    assert result.json()["rows"] == 300 and "native_country" in result.json()["columns_dropped"]


def test_generated_row_unit_is_the_collected_row_number(key, tmp_path: Path) -> None:
    from personanet.stages.clean import clean_records

    config = load_config(adult_config(tmp_path / "adult.toml", DATA / "adult_head.data"))
    records = FileSource(DATA / "adult_head.data", config.source).read()
    records = pl.concat([records, records.head(5)])  # five rows repeated: five more people
    outcome = clean_records(records, config, pseudonym_key(key))
    assert outcome.report.rows_train + outcome.report.rows_test == 305
    assert outcome.report.duplicates_removed == 0
    # The split is a keyed hash of the row number's pseudonym, as for any privacy unit.
    from personanet.stages.clean import hash_split

    units = pseudonymize(pl.Series([str(i) for i in range(305)]), key=pseudonym_key(key),
                         column=ROW_UNIT)
    expected_test = hash_split(units, seed=config.clean.seed,
                               test_fraction=config.clean.test_fraction)
    assert outcome.report.rows_test == int(expected_test.sum())
    test_ages = [float(age) for age in records["age"].filter(expected_test)]
    assert outcome.test["age"].cast(float).to_list() == test_ages


def test_data_file_without_source_options_is_refused_with_the_way_forward(
        cli, key_env, tmp_path: Path) -> None:
    config = adult_config(tmp_path / "adult.toml", DATA / "adult_head.data",
                          source_options=False)
    result = cli("--config", config, "collect")
    assert result.code == 65
    assert "[source] format = \"csv\"" in result.stderr


def test_a_configured_column_named_like_the_row_unit_is_refused(cli, key_env,
                                                                tmp_path: Path) -> None:
    config = adult_config(tmp_path / "adult.toml", DATA / "adult_head.data")
    config.write_text(config.read_text() + f'\n[columns."{ROW_UNIT}"]\nrole = "identifier"\n')
    result = cli("--config", config, "collect")
    assert result.code == 78 and "reserved" in result.stderr


LATIN1_CONFIG = """
[dataset]
name = "towns"
source = "{source}"
target = "y"
privacy_unit = "name"
{options}
[columns.name]
role = "identifier"

[columns.town]
categories = ["Zürich", "Genève", "Besançon", "Málaga"]
unknown_category = "quarantine"

[columns.age]
type = "numeric"
bounds = [17, 90]

[columns.y]
categories = ["no", "yes"]
"""


def test_latin1_file_with_accents_reads_right(cli, key_env, tmp_path: Path) -> None:
    towns = ["Zürich", "Genève", "Besançon", "Málaga"]
    names = [f"José Müller-Ñúñez {i}" for i in range(40)]
    lines = ["name;town;age;y"] + [f"{n};{towns[i % 4]};{20 + i};{'yes' if i % 3 else 'no'}"
                                   for i, n in enumerate(names)]
    source = tmp_path / "towns.csv"
    source.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    assert "ü".encode("latin-1") in source.read_bytes()  # really Latin-1, not UTF-8
    config = tmp_path / "towns.toml"

    config.write_text(LATIN1_CONFIG.format(source=source, options='[source]\ndelimiter = ";"\n'))
    refused = cli("--config", config, "collect")
    assert refused.code == 65 and 'encoding = "latin-1"' in refused.stderr

    config.write_text(LATIN1_CONFIG.format(
        source=source, options='[source]\ndelimiter = ";"\nencoding = "latin-1"\n'))
    assert cli("--config", config, "collect").code == 0
    cleaned = cli("--json", "--config", config, "clean")
    assert cleaned.code == 0, cleaned.stderr
    assert cleaned.json()["rows_quarantined"] == 0  # every accented town is in the domain
    store = ArtifactStore(tmp_path / "artifacts", "towns")
    clean_artifact = store.get("clean")
    both = pl.concat([tables.read_artifact_table(clean_artifact, f, key_env)
                      for f in ("train.parquet.enc", "test.parquet.enc")])
    assert sorted(set(both["town"].to_list())) == sorted(towns)
    # The names were decoded right before they were pseudonymized.
    expected = pseudonymize(pl.Series(names), key=pseudonym_key(key_env), column="name")
    assert set(both["name"].to_list()) == set(expected.to_list())


def test_source_section_is_documented_in_the_readme() -> None:
    import dataclasses

    from personanet.config import SourceConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("### `[source]`")
    section = readme[start:readme.find("\n### ", start + 1)]
    assert [f.name for f in dataclasses.fields(SourceConfig)
            if f"`{f.name}`" not in section] == []
    assert f"`{ROW_UNIT}`" in readme
