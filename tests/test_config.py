"""Config loading: every mistake names its key and exits 78 (README: Configuration reference)."""

from __future__ import annotations

from pathlib import Path

import pytest

from personanet.config import load_config, parse_config
from personanet.errors import ConfigError

from .conftest import CONFIG

MINIMAL = {
    "dataset": {"name": "d", "target": "y", "privacy_unit": "email"},
    "columns": {
        "email": {"role": "identifier"},
        "age": {"type": "numeric", "bounds": [17, 90]},
        "y": {"categories": ["no", "yes"]},
    },
}


def _with(**changes: dict) -> dict:
    raw = {k: {**v} for k, v in MINIMAL.items()}
    raw["columns"] = {k: {**v} for k, v in MINIMAL["columns"].items()}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_bundled_config_loads_with_public_domains() -> None:
    config = load_config(CONFIG)
    assert config.dataset.name == "persona"
    assert config.target_column.role == "target"
    assert config.columns["age"].bounds == (17.0, 90.0)
    # a bare date as the upper bound keeps its whole day
    assert config.columns["collected_at"].bounds == ("2024-01-01T00:00:00Z",
                                                     "2026-12-31T23:59:59Z")
    assert [c.name for c in config.identifiers()] == ["name", "email"]
    assert config.train.epsilon == 1.0 and config.budget.epsilon == 10.0


def test_defaults_are_filled_in() -> None:
    config = parse_config(_with())
    assert config.clean.max_rows_per_unit == 1
    assert config.train.optimizer == "adam"
    assert config.columns["age"].impute_rule == "midpoint"
    assert config.columns["y"].kind == "categorical"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_with(train={"epocs": 3}), "train.epocs; did you mean 'epochs'"),
        (_with(trian={}), "[trian]"),
        (_with(train={"epochs": "ten"}), "train.epochs must be an integer"),
        (_with(train={"optimizer": "adagrad"}), "train.optimizer = 'adagrad' is not allowed"),
        (_with(train={"epsilon": 0}), "train.epsilon must be greater than 0"),
        (_with(dataset={"target": "income"}), "dataset.target = 'income' is not a column"),
        (_with(dataset={"privacy_unit": "ssn"}), "dataset.privacy_unit = 'ssn' is not a column"),
        (_with(clean={"dedupe_keep": "newest"}), "needs clean.timestamp_column"),
        (_with(clean={"test_fraction": 1.5}), "clean.test_fraction"),
        (_with(dataset={"name": "../escape"}), "dataset.name"),
    ],
)
def test_bad_config_names_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert expected in str(err.value)
    assert err.value.exit_code == 78


def test_numeric_feature_without_bounds_is_refused() -> None:
    raw = _with()
    raw["columns"]["age"] = {"type": "numeric"}
    with pytest.raises(ConfigError, match=r"columns\.age is a numeric feature without bounds"):
        parse_config(raw)


def test_categorical_feature_without_categories_is_refused() -> None:
    raw = _with()
    raw["columns"]["sex"] = {}
    with pytest.raises(ConfigError, match=r"columns\.sex is a categorical feature without "):
        parse_config(raw)


def test_unknown_column_key_is_refused() -> None:
    raw = _with()
    raw["columns"]["age"]["bound"] = [1, 2]
    with pytest.raises(ConfigError, match=r"columns\.age\.bound; did you mean 'bounds'"):
        parse_config(raw)


def test_inverted_bounds_are_refused() -> None:
    raw = _with()
    raw["columns"]["age"]["bounds"] = [90, 17]
    with pytest.raises(ConfigError, match="low < high"):
        parse_config(raw)


def test_free_text_is_never_a_feature() -> None:
    raw = _with()
    raw["columns"]["notes"] = {"type": "text"}
    with pytest.raises(ConfigError, match="free text"):
        parse_config(raw)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dataset\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_section_hash_changes_only_with_its_section() -> None:
    a = parse_config(_with())
    b = parse_config(_with(train={"epochs": 3}))
    assert a.section_hash("columns", "clean") == b.section_hash("columns", "clean")
    assert a.section_hash("train") != b.section_hash("train")


def test_cli_bad_config_exits_78_with_one_line(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.read_text().replace("max_grad_norm = 1.0",
                                              "max_grad_norm = 1.0\nepohcs = 2"))
    result = cli("--config", bad, "collect")
    assert result.code == 78
    assert result.stderr.strip().count("\n") == 0
    assert "train.epohcs" in result.stderr and "Traceback" not in result.stderr


def test_readme_documents_every_config_key() -> None:
    import dataclasses

    from personanet import config as cfg

    readme = (CONFIG.parent.parent / "README.md").read_text()
    sections = {"dataset": cfg.DatasetConfig, "columns.NAME": cfg.ColumnConfig,
                "clean": cfg.CleanConfig, "train": cfg.TrainConfig, "budget": cfg.BudgetConfig,
                "evaluate": cfg.EvaluateConfig, "predict": cfg.PredictConfig}
    missing = []
    for section, cls in sections.items():
        start = readme.index(f"### `[{section}]`")
        end = readme.find("\n### ", start + 1)
        text = readme[start:end if end > 0 else None]
        missing += [f"{section}.{f.name}" for f in dataclasses.fields(cls)
                    if f.name != "name" or section == "dataset"
                    if f"`{f.name}`" not in text]
    assert missing == []
