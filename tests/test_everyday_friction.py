"""Everyday friction found by new users: --quiet, --set, hints, ambiguous versions, packaging."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from personanet.config import load_config

ROOT = Path(__file__).resolve().parent.parent


# A real process: pytest replaces `warnings.showwarning`, which would hide the behaviour.
_WARN_AFTER_CLI = """
import sys, warnings
from personanet.cli import run_cli
assert run_cli(sys.argv[1:]) == 0
warnings.simplefilter("always")
warnings.warn("divide by zero encountered in log", RuntimeWarning, stacklevel=1)
"""


def _stderr_after_a_library_warning(*args: str | Path) -> str:
    done = subprocess.run([sys.executable, "-c", _WARN_AFTER_CLI, *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stderr


def test_quiet_silences_library_warnings(small_config: Path) -> None:
    # Opacus' PRV emits RuntimeWarnings through `warnings`; --quiet means errors only.
    assert _stderr_after_a_library_warning("--quiet", "--config", small_config,
                                           "--artifacts", small_config.parent / "a",
                                           "budget", "show") == ""


def test_without_quiet_library_warnings_reach_stderr_in_the_log_format(small_config: Path
                                                                        ) -> None:
    err = _stderr_after_a_library_warning("--config", small_config, "--artifacts",
                                          small_config.parent / "a", "budget", "show")
    assert "personanet: warning:" in err and "divide by zero" in err


def test_set_overrides_a_key_typed_by_the_schema(small_config: Path) -> None:
    config = load_config(small_config, ["train.epsilon=3", "columns.age.sensitive=true",
                                        "clean.seed=7", "dataset.name=other-name"])
    assert config.train.epsilon == 3.0 and isinstance(config.train.epsilon, float)
    assert config.columns["age"].sensitive is True
    assert config.clean.seed == 7
    assert config.dataset.name == "other-name"


def test_set_works_after_any_command_and_reaches_the_stage(cli, small_config: Path) -> None:
    shown = cli("--config", small_config, "budget", "show", "--json",
                "--set", "budget.epsilon=4.5")
    assert shown.code == 0, shown.stderr
    assert shown.json()["budget_epsilon"] == 4.5


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=x", "train.epochs must be an integer"),
    ("train.epsilonn=3", "did you mean 'epsilon'"),
    ("trainepsilon", "--set SECTION.KEY=VALUE"),
    ("train.epsilon", "--set SECTION.KEY=VALUE"),
])
def test_bad_set_is_a_config_error_naming_the_key(cli, small_config: Path, override: str,
                                                  message: str) -> None:
    result = cli("--config", small_config, "budget", "show", "--set", override)
    assert result.code == 78
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_config_key_used_as_an_option_points_at_set(cli, small_config: Path) -> None:
    result = cli("--config", small_config, "train", "--epsilon", "3")
    assert result.code == 2
    assert "--set train.epsilon=VALUE" in result.stderr


def test_privacy_unit_close_to_a_column_gets_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[dataset]\nname = "loans"\ntarget = "y"\nprivacy_unit = "applicant"\n'
        '[columns.applicant_id]\nrole = "identifier"\n'
        '[columns.y]\nrole = "target"\ncategories = ["0", "1"]\n'
        '[columns.f]\ncategories = ["a", "b"]\n')
    from personanet.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'applicant_id'"):
        load_config(config)


def test_ambiguous_version_prefix_lists_the_candidates(cli, small_config: Path, key_env) -> None:
    first = cli("--config", small_config, "--json", "collect")
    second = cli("--config", small_config, "--json", "collect", "--force")
    assert first.code == 0 and second.code == 0, second.stderr
    versions = [first.json()["version"], second.json()["version"]]
    result = cli("--config", small_config, "artifacts", "show", versions[0][:4])
    assert result.code == 2
    for version in versions:
        assert version in result.stderr


def test_license_is_an_spdx_string_so_setuptools_stays_quiet() -> None:
    # `license = { text = ... }` makes setuptools print ~60 lines of deprecation warnings.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert "scikit-learn" in dev  # the metrics cross-check must run, not skip


def test_quiet_json_run_prints_only_json(cli, small_config: Path, key_env) -> None:
    result = cli("--quiet", "--json", "--config", small_config, "collect")
    assert result.code == 0
    assert result.stderr == ""
    assert json.loads(result.stdout)["stage"] == "collect"


def test_evaluate_with_an_empty_test_split_is_bad_input_not_a_crash(cli, tmp_path: Path,
                                                                     key_env) -> None:
    from tests.conftest import sample_lines, write_config

    source = tmp_path / "train_only.csv"
    source.write_text(sample_lines(300, split="train"), encoding="utf-8")
    config = write_config(tmp_path / "c.toml", source,
                          overrides="[train]\nepochs = 1\nbatch_size = 64\n")
    for stage in ("collect", "clean", "train"):
        assert cli("--config", config, stage).code == 0
    result = cli("--config", config, "evaluate")
    assert result.code == 65, result.stderr
    assert "no labelled test rows" in result.stderr
    assert "internal error" not in result.stderr
