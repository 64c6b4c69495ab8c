"""clean: every row accounted for, every defect counted, no identifier left behind."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import io
import json
import unicodedata
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personanet.cleaning.rows import prepare_rows
from personanet.cleaning.values import REASONS
from personanet.config import Config, load_config, parse_config
from personanet.errors import BadInputError, ConfigError
from personanet.privacy.pseudonym import pseudonym_key, pseudonymize
from personanet.reporting.clean_view import render_report
from personanet.sources.files import FileSource
from personanet.stages.base import require_key
from personanet.stages.clean import CleanReport, clean, clean_records, hash_split
from personanet.stages.collect import collect
from personanet.store import crypto, tables
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey

from .conftest import CONFIG, ROOT, sample_lines

MESSY = ROOT / "tests" / "data" / "messy"
OUTPUTS = ("train.parquet.enc", "test.parquet.enc", "quarantine.parquet.enc")


# ----------------------------------------------------------------------------- helpers


def accounted(figures: dict) -> int:
    return (figures["rows_train"] + figures["rows_test"] + figures["duplicates_removed"]
            + figures["rows_quarantined"] + figures["rows_dropped_by_bounding"])


def collected(config: Config, root: Path, key: MasterKey, source: Path | None = None
              ) -> ArtifactStore:
    store = ArtifactStore(root, config.dataset.name)
    collect(config, store, key, sources=[str(source)] if source else None)
    return store


def write_collect_artifact(store: ArtifactStore, key: MasterKey, records: pl.DataFrame) -> str:
    """A collect artifact written with the store API, bypassing collect's own checks.

    Its version: being no config's chain, clean reads it only when named (--input).
    """
    require_key(store, key)  # the store seals its manifest, as every stage's
    with store.lock(), store.create("collect", fingerprint="hand-made", inputs=[], config={},
                                    config_hash="none") as writer:
        tables.write_encrypted_parquet(writer.path("records.parquet.enc"), records, key)
        writer.add("records.parquet.enc", rows=records.height, encrypted=True,
                   key_id=key.key_id)
        return writer.commit().version


def decrypted(path: Path, key: MasterKey) -> bytes:
    return crypto.read_encrypted_file(path, key)


def read_outputs(result_path: Path, key: MasterKey) -> dict[str, pl.DataFrame]:
    return {name.split(".")[0]: tables.read_encrypted_parquet(result_path / name, key)
            for name in OUTPUTS}


def small_config(columns: dict, **clean_section) -> Config:
    """A config from a columns table (email identifier and income target included)."""
    raw = {
        "dataset": {"name": "tiny", "target": "income", "privacy_unit": "email"},
        "columns": {"email": {"role": "identifier"},
                    "income": {"role": "target", "categories": ["<=50K", ">50K"]},
                    **columns},
        "clean": clean_section,
    }
    return parse_config(raw)


# ----------------------------------------------------------------------------- bundled sample


def test_bundled_sample_every_row_is_accounted_for(tmp_path: Path, key: MasterKey) -> None:
    config = load_config(CONFIG)
    store = collected(config, tmp_path / "a", key)
    result = clean(config, store, key)
    figures = result.figures

    assert figures["rows_in"] == 48842
    assert figures["rows_in"] == accounted(figures)
    # The sample keeps the standard UCI Adult split through clean.split_column.
    assert (figures["rows_train"], figures["rows_test"]) == (32561, 16281)
    assert figures["split_by"] == "column 'split'"
    # data/README.md: "?" became empty in exactly these columns, now "__missing__".
    assert figures["columns"]["workclass"]["imputed"] == 2799
    assert figures["columns"]["occupation"]["imputed"] == 2809
    assert figures["columns"]["native_country"]["imputed"] == 857

    out = read_outputs(result.path, key)
    train, test = out["train"], out["test"]
    expected = ["name", "email", "age", "workclass", "education", "education_num",
                "marital_status", "occupation", "relationship", "race", "sex", "capital_gain",
                "capital_loss", "hours_per_week", "native_country", "income"]
    assert train.columns == expected and test.columns == expected  # config order, no ignored
    assert train.schema["age"] == pl.Float64
    assert train["email"].str.contains(r"^[0-9a-f]{32}$").all()
    for name, col in config.columns.items():
        if col.role == "feature" and col.kind == "numeric":
            low, high = col.bounds
            assert train[name].is_between(low, high).all(), name
        if col.role == "feature" and col.kind == "categorical":
            allowed = [*col.categories, "__other__", "__missing__"]
            assert train[name].is_in(allowed).all(), name
    assert set(train["income"].unique()) == {"<=50K", ">50K"}
    # a person is never on both sides
    assert set(train["email"]).isdisjoint(test["email"])


# ----------------------------------------------------------------------------- messy fixture


@pytest.fixture
def messy(tmp_path: Path, key: MasterKey):
    config = load_config(MESSY / "persona_messy.toml")
    store = collected(config, tmp_path / "a", key)
    return config, store, clean(config, store, key)


def test_messy_fixture_gives_the_expected_figure_for_each_defect(messy, key: MasterKey) -> None:
    _, _, result = messy
    figures = result.figures
    assert figures["rows_in"] == 25 == accounted(figures)
    assert figures["duplicates_exact"] == 2         # rows 1 and 21
    assert figures["duplicates_by_key"] == 3        # rows 2, 18 (older) and 22 (no timestamp)
    assert figures["rows_quarantined"] == 9
    assert figures["quarantined_by_reason"] == {
        "invalid_value": 1, "missing_privacy_unit": 1, "missing_target": 1, "missing_value": 1,
        "out_of_bounds": 2, "unknown_category": 1, "unknown_split_value": 1, "unknown_target": 1,
    }
    assert figures["rows_dropped_by_bounding"] == 0
    assert (figures["rows_train"], figures["rows_test"]) == (9, 2)
    columns = figures["columns"]
    assert columns["age"] == {"missing": 2, "invalid": 1, "clipped": 1, "other": 0, "imputed": 3}
    assert columns["workclass"] == {"missing": 1, "invalid": 0, "clipped": 0, "other": 1,
                                    "imputed": 1}
    assert columns["hours_per_week"] == {"missing": 0, "invalid": 1, "clipped": 1, "other": 0,
                                         "imputed": 1}
    assert columns["capital_loss"]["missing"] == 1 and columns["capital_loss"]["imputed"] == 1
    assert columns["collected_at"]["invalid"] == 1
    assert columns["name"]["missing"] == 1

    quarantine = read_outputs(result.path, key)["quarantine"]
    assert quarantine.schema == {"row": pl.UInt64, "column": pl.String, "reason": pl.String}
    assert quarantine.rows() == [
        (7, "capital_gain", "out_of_bounds"),
        (8, "education", "unknown_category"),
        (9, "education_num", "invalid_value"),
        (10, "marital_status", "missing_value"),
        (11, "income", "missing_target"),
        (12, "income", "unknown_target"),
        (13, "email", "missing_privacy_unit"),
        (14, "split", "unknown_split_value"),
        (20, "capital_gain", "out_of_bounds"),  # its first reason; income is missing too
    ]


def test_messy_values_are_parsed_clipped_and_imputed_from_public_values(messy, key: MasterKey
                                                                          ) -> None:
    config, _, result = messy
    out = read_outputs(result.path, key)
    train = out["train"]
    key_bytes = pseudonym_key(key)

    def person(email: str) -> dict:
        pseudonym = pseudonymize(pl.Series([email]), key=key_bytes, column="email",
                                 case="lower")[0]
        rows = pl.concat([out["train"], out["test"]]).filter(pl.col("email") == pseudonym)
        assert rows.height == 1, email
        return rows.row(0, named=True)

    assert person("zoe.muller.100005@example.com")["age"] == 90.0            # 150 clipped
    assert person("zoe.muller.100005@example.com")["hours_per_week"] == 1.0  # -5 clipped
    missing_age = person("siobhan.obrien.100003@example.org")
    assert missing_age["age"] == 53.5 and missing_age["age__missing"] is True  # midpoint
    assert missing_age["workclass"] == "__missing__"
    garbage = person("jose.perez.100004@example.net")
    assert garbage["age"] == 53.5 and garbage["workclass"] == "__other__"
    nan_inf = person("aiko.tanaka.100015@example.org")
    assert nan_inf["age"] == 53.5 and nan_inf["capital_loss"] == 0.0       # NaN/inf: missing
    spaced = person("lars.eriksson.100016@example.com")
    assert spaced["workclass"] == "Private" and spaced["sex"] == "Male"      # trimmed, case
    assert spaced["age"] == 58.0                                             # the newer row
    assert person("LUKASZ.NGUYEN.100002@example.com")["age"] == 51.0         # newest, any case
    assert person("priya.sharma.100021@example.com")["age"] == 35.0          # dated beats undated
    assert person("priya.sharma.100021@example.com")["name"] is None         # missing name
    words = person("emile.dubois.100023@example.fr")
    assert words["age"] == 45.0 and words["hours_per_week"] == 50.0          # " 45 ", "forty"
    assert train.schema["age__missing"] == pl.Boolean
    assert "collected_at" not in train.columns and "split" not in train.columns


# ----------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("name", ["empty.csv", "header_only.csv", "semicolon.csv"])
def test_malformed_sources_are_bad_input(name: str, tmp_path: Path, key: MasterKey) -> None:
    config = load_config(MESSY / "persona_messy.toml")
    store = ArtifactStore(tmp_path / "a", config.dataset.name)
    with pytest.raises(BadInputError) as caught:
        collect(config, store, key, sources=[str(MESSY / name)])
    assert caught.value.exit_code == 65


@pytest.mark.parametrize(("name", "message"), [
    ("header_only.csv", "empty"),
    ("semicolon.csv", "';'-separated"),
])
def test_clean_refuses_records_it_cannot_use(name: str, message: str, tmp_path: Path,
                                             key: MasterKey) -> None:
    # A collect artifact written without collect's checks still cannot reach a model.
    config = load_config(MESSY / "persona_messy.toml")
    store = ArtifactStore(tmp_path / "a", config.dataset.name)
    version = write_collect_artifact(store, key, FileSource(MESSY / name).read())
    with pytest.raises(BadInputError, match=message) as caught:
        clean(config, store, key, input_version=version)
    assert caught.value.exit_code == 65
    assert store.versions("clean") == []


@pytest.mark.parametrize("name", ["empty.csv", "header_only.csv", "semicolon.csv"])
def test_cli_malformed_input_exits_65_with_one_line(name: str, cli, key_env, tmp_path: Path
                                                    ) -> None:
    config = MESSY / "persona_messy.toml"
    root = tmp_path / "a"
    result = cli("--config", config, "--artifacts", root, "collect", "--source", MESSY / name)
    assert result.code == 65
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    if name != "empty.csv":  # the same records, smuggled past collect, stop clean too
        store = ArtifactStore(root, "messy")
        version = write_collect_artifact(store, key_env, FileSource(MESSY / name).read())
        result = cli("--config", config, "--artifacts", root, "clean", "--input", version)
        assert result.code == 65
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_clean_json_reports_the_figures(cli, key_env, tmp_path: Path) -> None:
    config = MESSY / "persona_messy.toml"
    root = tmp_path / "a"
    assert cli("--config", config, "--artifacts", root, "collect").code == 0
    first = cli("--json", "--config", config, "--artifacts", root, "clean")
    assert first.code == 0, first.stderr
    out = first.json()
    assert out["stage"] == "clean" and out["reused"] is False
    assert out["rows_in"] == 25 and out["rows_quarantined"] == 9
    assert cli("--json", "--config", config, "--artifacts", root, "clean").json()["reused"]


# ----------------------------------------------------------------------------- privacy


def test_no_identifier_value_in_any_byte_of_the_decrypted_outputs(tmp_path: Path,
                                                                  key: MasterKey) -> None:
    source = tmp_path / "persona_2000.csv"
    source.write_text(sample_lines(2000), encoding="utf-8")
    config = load_config(CONFIG)
    store = collected(config, tmp_path / "a", key, source)
    # collected from another source than the config's: named, since it is not the chain's
    result = clean(config, store, key, input_version=store.versions("collect")[-1].version)
    messy_config = load_config(MESSY / "persona_messy.toml")
    messy_result = clean(messy_config, collected(messy_config, tmp_path / "m", key), key)

    raw = pl.concat([pl.read_csv(source, infer_schema=False),
                     pl.read_csv(MESSY / "persona_messy.csv", infer_schema=False)])
    values = set()
    for column in ("name", "email"):
        for value in raw[column].drop_nulls().to_list():
            for form in (value, value.strip(), value.lower(), unicodedata.normalize("NFD", value)):
                values.add(form.strip())
    values.discard("")
    for path in (result.path, messy_result.path):
        for name in OUTPUTS:
            plaintext = decrypted(path / name, key)
            # every byte of the file, and every value after zstd is undone
            assert not [v for v in values if v.encode() in plaintext], name
            frame = pl.read_parquet(io.BytesIO(plaintext))
            uncompressed = io.BytesIO()
            frame.write_parquet(uncompressed, compression="uncompressed")
            assert not [v for v in values if v.encode() in uncompressed.getvalue()], name
            for column in frame.columns:
                text = frame[column].cast(pl.String)
                assert not text.str.contains_any(sorted(values)).any(), (name, column)
        manifest = (path / "manifest.json").read_text("utf-8")
        assert not [v for v in values if v in manifest]


def test_pseudonym_is_the_keyed_hmac_of_the_normalised_value() -> None:
    key = MasterKey.generate().derive("pseudonym")
    distinct = pl.Series("email", [f"user.{i}@example.org" for i in range(50)])
    repeated = pl.Series("name", ["  Zoë O'Brien ", "Zoe\u0308 O'Brien", None, "", "Ann"] * 20)
    for series, column in ((distinct, "email"), (repeated, "name")):  # both code paths
        out = pseudonymize(series, key=key, column=column)
        for value, pseudonym in zip(series.to_list(), out.to_list(), strict=True):
            text = unicodedata.normalize("NFC", (value or "").strip())
            if not text:
                assert pseudonym is None
                continue
            message = column.encode() + b"\x00" + text.encode()
            assert pseudonym == hmac.new(key, message, "sha256").hexdigest()[:32]
    names = pseudonymize(repeated, key=key, column="name")
    assert names[0] == names[1]  # composed and decomposed "ë", spaces: one person
    assert pseudonymize(pl.Series(["Ann"]), key=key, column="email")[0] != names[4]
    other_key = MasterKey.generate().derive("pseudonym")
    assert pseudonymize(pl.Series(["Ann"]), key=other_key, column="name")[0] != names[4]
    lower = pseudonymize(pl.Series(["ANN@X.ORG", "ann@x.org"]), key=key, column="e", case="lower")
    assert lower[0] == lower[1]


# ----------------------------------------------------------------------------- determinism


def test_same_input_config_and_key_give_identical_outputs_and_reuse(tmp_path: Path,
                                                                    key: MasterKey) -> None:
    config = load_config(MESSY / "persona_messy.toml")
    store = collected(config, tmp_path / "a", key)
    first = clean(config, store, key)
    again = clean(config, store, key)
    assert (first.reused, again.reused) == (False, True)
    assert again.version == first.version and again.figures == first.figures
    forced = clean(config, store, key, force=True)
    assert forced.reused is False and forced.version != first.version
    for name in OUTPUTS:
        assert decrypted(first.path / name, key) == decrypted(forced.path / name, key), name
    assert forced.figures == first.figures


# ----------------------------------------------------------------------------- split, bounding


def people(count: int, rows_each: int) -> pl.DataFrame:
    """`rows_each` records per person, differing by collection time and age."""
    return pl.DataFrame({
        "email": [f"p{i}@example.org" for i in range(count) for _ in range(rows_each)],
        "age": [str(20 + j) for _ in range(count) for j in range(rows_each)],
        "collected_at": [f"2025-01-{j + 1:02d}T00:00:00Z" for _ in range(count)
                         for j in range(rows_each)],
        "income": ["<=50K"] * (count * rows_each),
    })


def test_hash_split_bounds_contributions_and_keeps_each_person_on_one_side() -> None:
    config = small_config(
        {"age": {"type": "numeric", "bounds": [17, 90]},
         "collected_at": {"type": "datetime", "role": "ignore",
                          "bounds": ["2024-01-01", "2026-12-31"]}},
        max_rows_per_unit=2, dedupe_key=["email", "collected_at"], dedupe_keep="newest",
        timestamp_column="collected_at", test_fraction=0.25, seed=7,
    )
    key = MasterKey.generate().derive("pseudonym")
    outcome = clean_records(people(2000, 3), config, key)
    report = outcome.report
    assert report.rows_in == 6000 == report.rows_accounted
    assert report.rows_dropped_by_bounding == 2000  # the oldest of each person's three
    assert report.rows_train + report.rows_test == 4000
    assert report.units_train + report.units_test == 2000
    train, test = outcome.train, outcome.test
    assert set(train["email"]).isdisjoint(test["email"])
    assert train.group_by("email").len()["len"].max() == 2
    assert set(pl.concat([train, test])["age"]) == {21.0, 22.0}  # the two newest kept
    assert 0.21 < report.units_test / 2000 < 0.29
    assert report.split_by.startswith("hash")

    # deterministic in pseudonym and seed; another seed, another split
    assert clean_records(people(2000, 3), config, key).test.equals(test)
    reseeded = dataclasses.replace(config, clean=dataclasses.replace(config.clean, seed=8))
    assert not clean_records(people(2000, 3), reseeded, key).test.equals(test)


def test_hash_split_depends_only_on_pseudonym_and_seed() -> None:
    units = pseudonymize(pl.Series([f"u{i}" for i in range(10000)]), key=b"k" * 32, column="u")
    is_test = hash_split(units, seed=1, test_fraction=0.2)
    assert 0.18 < is_test.mean() < 0.22
    assert hash_split(units.reverse(), seed=1, test_fraction=0.2).reverse().equals(is_test)
    assert not hash_split(units, seed=2, test_fraction=0.2).equals(is_test)


def test_split_column_conflict_within_a_person_is_quarantined() -> None:
    config = small_config(
        {"age": {"type": "numeric", "bounds": [17, 90]},
         "split": {"role": "ignore"}},
        max_rows_per_unit=2, dedupe_key=["email", "age"], split_column="split",
    )
    records = pl.DataFrame({"email": ["a@x", "a@x", "b@x"], "age": ["30", "31", "40"],
                            "income": ["<=50K"] * 3, "split": ["train", "test", "test"]})
    outcome = clean_records(records, config, b"k" * 32)
    assert outcome.quarantine.rows() == [(1, "split", "split_conflict")]
    assert (outcome.report.rows_train, outcome.report.rows_test) == (1, 1)
    assert outcome.report.rows_accounted == 3


# ----------------------------------------------------------------------------- per-row rules


def test_datetimes_after_collection_follow_the_out_of_bounds_policy() -> None:
    records = pl.DataFrame({
        "email": ["a@x", "b@x", "c@x", "d@x"],
        "signup": ["2025-06-01", "2026-03-01T10:00:00+02:00", "2099-01-01", "never"],
        "income": ["<=50K"] * 4,
    })
    as_of = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    spec = {"type": "datetime", "bounds": ["2020-01-01", "2030-01-01"]}
    clipped = prepare_rows(records, small_config({"signup": spec}), b"k" * 32,
                           require_target=True, as_of=as_of)
    assert clipped.frame["signup"].to_list() == [
        dt.datetime(2025, 6, 1, tzinfo=dt.UTC), as_of, as_of,
        # "never": invalid, then the midpoint of 2020-01-01 .. 2030-01-01 23:59:59
        dt.datetime(2024, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    ]
    assert clipped.counters["signup"].clipped == 2 and clipped.counters["signup"].invalid == 1

    strict = small_config({"signup": {**spec, "out_of_bounds": "quarantine"}})
    refused = prepare_rows(records, strict, b"k" * 32, require_target=True, as_of=as_of)
    assert refused.quarantine.rows() == [(1, "signup", "in_future"),
                                         (2, "signup", "out_of_bounds")]
    assert refused.rows.to_list() == [0, 3]


def test_prepare_rows_scores_new_people_without_a_target(key: MasterKey) -> None:
    config = load_config(CONFIG)
    new = FileSource(ROOT / "data" / "persona_new.csv").read()
    prepared = prepare_rows(new, config, pseudonym_key(key), require_target=False)
    assert prepared.frame.height == 200 and prepared.quarantine.height == 0
    assert "income" not in prepared.frame.columns
    assert prepared.frame["email"].str.contains(r"^[0-9a-f]{32}$").all()
    assert prepared.rows.to_list() == list(range(200))
    empty = prepare_rows(new.head(0), config, pseudonym_key(key), require_target=False)
    assert empty.frame.height == 0 and empty.frame.columns == prepared.frame.columns


def test_config_that_clean_cannot_apply_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="outside its bounds"):
        clean_records(pl.DataFrame({"email": ["a"], "age": ["1"], "income": ["<=50K"]}),
                      small_config({"age": {"type": "numeric", "bounds": [17, 90],
                                            "impute": 200}}), b"k" * 32)
    with pytest.raises(ConfigError, match="timestamp_column"):
        clean_records(pl.DataFrame({"email": ["a"], "when": ["x"], "income": ["<=50K"]}),
                      small_config({"when": {"role": "ignore"}, "sex": {"categories": ["F"]}},
                                   dedupe_keep="newest", timestamp_column="when"), b"k" * 32)


# ----------------------------------------------------------------------------- invariants


text = st.sampled_from(["", " ", "1", "17", "42", "99", "-3", "abc", "NaN", "inf", "1e9",
                        "<=50K", ">50K", "Female", "male", "?", "2025-01-01", "x@y", "X@Y"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["a@x", "b@x", "c@x", " A@X ", "", "d@x"]),
                          text, text, text, st.sampled_from(["train", "test", "dev"])),
                min_size=1, max_size=40),
       st.sampled_from(["clip", "quarantine"]), st.sampled_from(["null", "quarantine"]),
       st.integers(1, 3))
def test_every_row_leaves_in_exactly_one_place(rows, out_of_bounds, invalid, max_rows) -> None:
    config = small_config(
        {"age": {"type": "numeric", "bounds": [17, 90], "out_of_bounds": out_of_bounds,
                 "invalid": invalid},
         "sex": {"categories": ["Female", "Male"], "case": "lower"},
         "split": {"role": "ignore"}},
        max_rows_per_unit=max_rows, dedupe_key=["email", "age"], split_column="split",
    )
    records = pl.DataFrame(rows, schema=["email", "age", "sex", "income", "split"],
                           orient="row")
    outcome = clean_records(records, config, b"k" * 32)
    report = outcome.report
    assert report.rows_accounted == len(rows)
    quarantined = outcome.quarantine["row"].to_list()
    assert len(quarantined) == len(set(quarantined)) == report.rows_quarantined
    assert all(0 <= r < len(rows) for r in quarantined)
    assert sum(report.quarantined_by_reason.values()) == report.rows_quarantined
    assert set(report.quarantined_by_reason) <= set(REASONS)
    assert set(outcome.train["email"]).isdisjoint(outcome.test["email"])
    both = pl.concat([outcome.train, outcome.test])
    assert (both.group_by("email").len()["len"].max() or 0) <= max_rows
    assert both["age"].drop_nulls().is_between(17, 90).all()


def test_report_round_trips_and_renders(messy) -> None:
    from rich.console import Console

    _, _, result = messy
    report = CleanReport.from_dict(result.figures)
    assert report.to_dict() == result.figures
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render_report(result.figures))
    shown = console.file.getvalue()
    assert "rows in" in shown and "unknown_split_value" in shown and "age" in shown
    assert json.loads(json.dumps(result.figures)) == result.figures


def test_aliases_map_other_spellings_of_a_category_and_nothing_else() -> None:
    """UCI's adult.test writes its labels ">50K." and "<=50K.": without aliases every row
    is quarantined as an unknown target; with them the rows are kept under the categories,
    in clean and in predict alike (the same rule)."""
    records = pl.DataFrame({"email": ["a@x", "b@x", "c@x", "d@x"],
                            "sex": ["Male", " female", "F", "?"],
                            "income": [">50K.", "<=50K.", "<=50K", ">50k."]})
    columns = {"sex": {"categories": ["Female", "Male"], "case": "lower",
                       "aliases": {"F": "Female", "M": "Male"}}}
    plain = clean_records(records, small_config(columns), b"k" * 32)
    assert plain.report.quarantined_by_reason == {"unknown_target": 3}

    aliased = parse_config({
        "dataset": {"name": "tiny", "target": "income", "privacy_unit": "email"},
        "columns": {"email": {"role": "identifier"}, **columns,
                    "income": {"role": "target", "categories": ["<=50K", ">50K"],
                               "aliases": {">50K.": ">50K", "<=50K.": "<=50K"}}},
        "clean": {}})
    outcome = clean_records(records, aliased, b"k" * 32)
    assert outcome.report.rows_quarantined == 1  # ">50k.": case "none" on income
    assert outcome.quarantine.rows() == [(3, "income", "unknown_target")]
    kept = pl.concat([outcome.train, outcome.test]).sort("income")
    assert kept["income"].to_list() == ["<=50K", "<=50K", ">50K"]
    assert sorted(kept["sex"].to_list()) == ["Female", "Female", "Male"]
    assert outcome.report.columns["sex"].other == 0
    prepared = prepare_rows(records.drop("income"), aliased, b"k" * 32, require_target=False)
    assert sorted(prepared.frame["sex"].to_list()) == ["Female", "Female", "Male", "__other__"]


@pytest.mark.parametrize(("aliases", "message"), [
    ({"x": "Other"}, r"names 'Other', which is not one of its categories"),
    ({"male": "Female"}, r"'male' already means 'Male'"),
    ({"f": "Female", " F": "Male"}, r"' F' already means 'Female'"),
    ({" ": "Male"}, r"a blank spelling"),
    ({}, r"must be a table"),
])
def test_aliases_that_could_mean_two_things_are_refused(aliases: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"columns\.sex\.aliases.*" + message):
        small_config({"sex": {"categories": ["Female", "Male"], "case": "lower",
                              "aliases": aliases}})
    with pytest.raises(ConfigError, match=r"columns\.age\.aliases only applies"):
        small_config({"age": {"type": "numeric", "bounds": [1, 2], "aliases": {"a": "b"}}})
