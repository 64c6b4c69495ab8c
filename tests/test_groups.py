"""Fairness groups: numeric and datetime sensitive columns in public bins, small groups
suppressed without their size, gaps only between two different groups (issue 10, item 8)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from personanet.config import load_config
from personanet.errors import ConfigError
from personanet.reporting.groups import grouping
from personanet.reporting.metrics import group_metrics, group_regression_metrics
from personanet.reporting.plots import write_plots
from personanet.reporting.report import build_gates, render_markdown

from .conftest import write_config

BINARY = ["no", "yes"]


def sensitive(*, age: str = "", collected_at: str = "", evaluate: str = "") -> str:
    """Config overrides: sensitive numeric, datetime and categorical (41 public values) columns,
    a quick one-epoch training, no accuracy gate; extra lines per table."""
    return f"""
[columns.age]
sensitive = true
{age}
[columns.collected_at]
role = "feature"
sensitive = true
{collected_at}
[columns.native_country]
sensitive = true
[evaluate]
min_accuracy = 0.0
bootstrap = 20
{evaluate}
[train]
epochs = 1
batch_size = 64
learning_rate = 0.01
"""


def proba_of(p1: list[float]) -> np.ndarray:
    p = np.asarray(p1, dtype=float)
    return np.c_[1 - p, p]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def config_with(tmp_path: Path, small_csv: Path, extra: str, name: str = "c.toml") -> Path:
    return write_config(tmp_path / name, small_csv, overrides=extra)


# --- grouping from the config -----------------------------------------------------------------


def test_numeric_sensitive_column_is_binned_by_its_public_bounds(tmp_path: Path,
                                                                small_csv: Path) -> None:
    config = load_config(config_with(tmp_path, small_csv, sensitive()))
    age = grouping(config.columns["age"])
    assert age.labels == ("[17, 31.6)", "[31.6, 46.2)", "[46.2, 60.8)", "[60.8, 75.4)",
                          "[75.4, 90]")
    ages = pl.Series([17.0, 31.5, 31.6, 89.9, 90.0, None])
    assert age.assign(ages).tolist() == ["[17, 31.6)", "[17, 31.6)", "[31.6, 46.2)",
                                         "[75.4, 90]", "[75.4, 90]", "(missing)"]
    # never from the data: the same bins whatever values are assigned
    assert grouping(config.columns["age"]).edges == age.edges


def test_datetime_sensitive_column_is_binned_in_whole_days(tmp_path: Path,
                                                          small_csv: Path) -> None:
    config = load_config(config_with(tmp_path, small_csv, sensitive()))
    collected = grouping(config.columns["collected_at"])
    assert collected.labels[0] == "[2024-01-01, 2024-08-07)"
    assert collected.labels[-1] == "[2026-05-27, 2026-12-31]"
    assert len(collected.labels) == 5
    import datetime as dt

    moments = pl.Series([dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
                         dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.UTC)]
                        ).dt.cast_time_unit("us")
    assert collected.assign(moments).tolist() == [collected.labels[0], collected.labels[-1]]


def test_configured_group_edges_are_honoured(tmp_path: Path, small_csv: Path) -> None:
    config = load_config(config_with(tmp_path, small_csv, sensitive(
        age="groups = [30, 45, 65]", collected_at='groups = ["2025-01-01", "2026-01-01"]')))
    assert grouping(config.columns["age"]).labels == ("[17, 30)", "[30, 45)", "[45, 65)",
                                                      "[65, 90]")
    assert grouping(config.columns["collected_at"]).labels == (
        "[2024-01-01, 2025-01-01)", "[2025-01-01, 2026-01-01)", "[2026-01-01, 2026-12-31]")


@pytest.mark.parametrize(("columns", "message"), [
    ('[columns.age]\nsensitive = true\ngroups = [45, 30]', "strictly increasing"),
    ('[columns.age]\nsensitive = true\ngroups = [30, 30]', "strictly increasing"),
    ('[columns.age]\nsensitive = true\ngroups = [10, 30]', "outside bounds"),
    ('[columns.age]\nsensitive = true\ngroups = [30, 95]', "outside bounds"),
    ('[columns.age]\nsensitive = true\ngroups = [17, 90]', "strictly inside"),
    ('[columns.age]\nsensitive = true\ngroups = ["thirty"]', "finite number"),
    ('[columns.age]\ngroups = [30]', "sensitive = true"),
    ('[columns.sex]\nsensitive = true\ngroups = [1, 2]', "numeric or datetime"),
    ('[columns.collected_at]\nsensitive = true\ngroups = ["2030-01-01"]', "outside bounds"),
    ('[columns.email]\nsensitive = true', "group of one"),
])
def test_bad_group_edges_exit_78(columns: str, message: str, tmp_path: Path, small_csv: Path,
                                 key_env: Any, cli: Any) -> None:
    path = config_with(tmp_path, small_csv, columns)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    result = cli("--config", path, "--artifacts", tmp_path / "a", "collect")
    assert result.code == 78
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unset_groups_keep_the_clean_and_train_fingerprints_of_older_configs(
        tmp_path: Path, small_csv: Path) -> None:
    # the columns section feeds the clean and train fingerprints: a key that appeared in every
    # column would change them all, and `run` would retrain (spending budget) on unchanged data
    plain = load_config(config_with(tmp_path, small_csv, sensitive()))
    assert all("groups" not in column for column in plain.section("columns").values())
    edged = load_config(config_with(tmp_path, small_csv, sensitive(age="groups = [30]")))
    assert edged.section("columns")["age"]["groups"] == [30.0]


def test_min_group_size_must_be_positive(tmp_path: Path, small_csv: Path) -> None:
    with pytest.raises(ConfigError, match="min_group_size"):
        load_config(config_with(tmp_path, small_csv, "[evaluate]\nmin_group_size = 0\n"))
    assert load_config(config_with(tmp_path, small_csv, "")).evaluate.min_group_size == 20


# --- metrics ----------------------------------------------------------------------------------


def test_suppressed_groups_publish_no_size() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    band = np.array(["a", "a", "a", "a", "b", "b", "c", "c"])
    report = group_metrics({"band": band}, y, proba_of([0.2, 0.8, 0.4, 0.1, 0.9, 0.3, 0.6, 0.5]),
                           BINARY, min_group_size=3)
    assert report["band"]["min_group_size"] == 3
    assert report["band"]["groups"]["b"] == {"suppressed": True}
    assert report["band"]["groups"]["c"] == {"suppressed": True}
    assert report["band"]["groups"]["a"]["n"] == 4
    text = render_markdown({"model": {"private": True, "epsilon": 1.0, "delta": 1e-5},
                            "overall": {"n": 8}, "groups": report})
    assert "| b | < 3 | suppressed |" in text and "| c | < 3 | suppressed |" in text


def test_a_small_group_cannot_be_counted_from_the_total() -> None:
    # 30 + 25 + 3 people: publishing 30 and 25 next to n = 58 would give the 3 away
    sizes = {"a": 30, "b": 25, "c": 3}
    band = np.repeat(list(sizes), list(sizes.values()))
    y = np.arange(len(band)) % 2
    report = group_metrics({"band": band}, y, proba_of([0.3] * len(band)), BINARY,
                           min_group_size=20)
    groups = report["band"]["groups"]
    assert groups["c"] == {"suppressed": True} and groups["b"] == {"suppressed": True}
    assert groups["a"]["n"] == 30
    hidden = len(band) - sum(g["n"] for g in groups.values() if not g.get("suppressed"))
    assert hidden >= 20


def test_gap_never_compares_a_group_with_itself() -> None:
    # two groups of equal accuracy: a gap of 0 between two different groups
    y = np.array([1, 0, 1, 0])
    tied = group_metrics({"g": np.array(["a", "a", "b", "b"])}, y,
                         proba_of([0.9, 0.8, 0.9, 0.8]), BINARY)
    gap = tied["g"]["gaps"]["accuracy"]
    assert gap["gap"] == 0.0 and gap["max_group"] != gap["min_group"]
    regression = group_regression_metrics({"g": np.array(["a", "a", "b", "b"])},
                                          [1, 2, 3, 4], [2, 3, 4, 5])
    assert regression["g"]["gaps"]["mae"]["max_group"] != regression["g"]["gaps"]["mae"][
        "min_group"]
    # one reportable group (the other suppressed): no gap at all, and the gate cannot check it
    y = np.array([1, 0, 1, 0, 1])
    single = group_metrics({"g": np.array(["a", "a", "a", "a", "b"])}, y,
                           proba_of([0.9, 0.8, 0.9, 0.2, 0.9]), BINARY, min_group_size=2)
    assert all(gap is None for gap in single["g"]["gaps"].values())
    [gate] = build_gates(overall={}, groups=single, max_group_gap=0.1)
    assert gate["value"] is None and gate["passed"] is None
    text = render_markdown({"model": {"private": False}, "overall": {}, "groups": single})
    assert "Fewer than two reportable groups: no gaps." in text


def test_listed_groups_keep_their_order_and_empty_ones_are_suppressed() -> None:
    labels = ["[2, 10)", "[10, 20)", "[20, 30]"]
    values = np.array(["[10, 20)"] * 3 + ["[2, 10)"] * 3, dtype=object)
    report = group_metrics({"x": values}, np.array([0, 1, 0, 1, 0, 1]),
                           proba_of([0.1, 0.9, 0.2, 0.8, 0.3, 0.7]), BINARY,
                           order={"x": labels})
    assert list(report["x"]["groups"]) == labels  # not sorted as text ("[10" < "[2")
    assert report["x"]["groups"]["[20, 30]"] == {"suppressed": True}


def test_groups_plot_keeps_a_sane_size_with_many_groups(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 6000
    y = rng.integers(0, 2, n)
    proba = proba_of(np.clip(y * 0.6 + rng.normal(0.2, 0.2, n), 0, 1).tolist())
    # 74 ages and 60 common countries with about 80-100 people each, 150 rare countries
    common = rng.choice([f"a country with a long name, number {i}" for i in range(60)], n - 200)
    rare = rng.choice([f"rare {i}" for i in range(150)], 200)
    groups = group_metrics({"age": rng.integers(17, 91, n).astype(str),
                            "country": np.r_[common, rare]},
                           y, proba, BINARY, min_group_size=20)
    assert write_plots(tmp_path, groups=groups) == ["groups.png"]
    width, height = png_size(tmp_path / "groups.png")
    assert width <= 1000 and height <= 3000, (width, height)


# --- a real evaluation ------------------------------------------------------------------------


def groups_table_sizes(report: str) -> dict[str, list[str]]:
    """The n column of each sensitive column's table in report.md."""
    sizes: dict[str, list[str]] = {}
    column = None
    for line in report.splitlines():
        heading = re.match(r"### `(.+)`", line)
        if heading:
            column = heading.group(1)
        elif line.startswith("## "):
            column = None
        elif column and line.startswith("| ") and not line.startswith("| Group"):
            sizes.setdefault(column, []).append(line.split(" | ")[1])
    return sizes


def test_evaluate_bins_sensitive_numbers_and_publishes_no_small_count(
        tmp_path: Path, small_csv: Path, key_env: Any, cli: Any) -> None:
    config = config_with(tmp_path, small_csv, sensitive())
    root = tmp_path / "a"
    for stage in ("collect", "clean", "train"):
        assert cli("--quiet", "--config", config, "--artifacts", root, stage).code == 0
    result = cli("--json", "--config", config, "--artifacts", root, "evaluate")
    assert result.code == 0, result.stderr
    out = Path(result.json()["path"])
    metrics = json.loads((out / "metrics.json").read_text())
    groups = metrics["groups"]

    age = groups["age"]
    assert list(age["groups"]) == ["[17, 31.6)", "[31.6, 46.2)", "[46.2, 60.8)",
                                   "[60.8, 75.4)", "[75.4, 90]"]
    assert age["grouping"]["edges"] == [17.0, 31.6, 46.2, 60.8, 75.4, 90.0]
    assert len(groups["collected_at"]["groups"]) == 5
    assert len(groups["native_country"]["groups"]) >= 41
    reported = 0
    for column, entry in groups.items():
        for label, figures in entry["groups"].items():
            if figures.get("suppressed"):
                assert "n" not in figures, (column, label)
            else:
                assert figures["n"] >= 20, (column, label)
                reported += figures["n"]
    assert reported > 0
    # 100 test people: the United States is the only country with 20 of them, so no gap
    assert all(gap is None for gap in groups["native_country"]["gaps"].values())

    report = (out / "report.md").read_text()
    for column, sizes in groups_table_sizes(report).items():
        for size in sizes:
            assert size == "< 20" or int(size) >= 20, (column, size)
    for line in result.stderr.splitlines():
        assert not re.search(r"\bn=([0-9]|1[0-9])\b", line), line

    width, height = png_size(out / "groups.png")
    assert width <= 1000 and height <= 3000, (width, height)

    # the threshold is a config key: raising it suppresses more, and re-evaluates
    stricter = config_with(tmp_path, small_csv, sensitive(evaluate="min_group_size = 40"),
                           "strict.toml")
    again = cli("--json", "--config", stricter, "--artifacts", root, "evaluate")
    assert again.code == 0, again.stderr
    strict = json.loads((Path(again.json()["path"]) / "metrics.json").read_text())["groups"]
    suppressed = {c: {g for g, f in e["groups"].items() if f.get("suppressed")}
                  for c, e in groups.items()}
    strict_suppressed = {c: {g for g, f in e["groups"].items() if f.get("suppressed")}
                         for c, e in strict.items()}
    assert strict["age"]["min_group_size"] == 40
    assert all(suppressed[c] <= strict_suppressed[c] for c in groups)
    assert strict_suppressed != suppressed
    for entry in strict.values():
        assert all(f.get("suppressed") or f["n"] >= 40 for f in entry["groups"].values())
