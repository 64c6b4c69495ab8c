"""The command line as users and schedulers see it: exit codes, stdout/stderr, fast start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from personanet.cli import hoist_global_options

HEAVY = ("torch", "opacus", "polars")


def _imported_modules(*args: str, cwd: Path, env: dict[str, str] | None = None) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "personanet", *args],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("args", [("--help",), ("artifacts", "list"), ("collect", "--help")])
def test_fast_paths_import_no_torch_opacus_or_polars(args: tuple[str, ...], tmp_path: Path
                                                     ) -> None:
    loaded = _imported_modules(*args, cwd=tmp_path)
    assert "personanet" in loaded  # the measurement itself works
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_global_options_are_hoisted_from_after_the_command() -> None:
    assert hoist_global_options(["collect", "--json", "--config", "c.toml", "--force"]) == [
        "--json", "--config", "c.toml", "collect", "--force"]
    assert hoist_global_options(["keys", "generate", "k", "--artifacts=x"]) == [
        "--artifacts=x", "keys", "generate", "k"]


def test_unknown_option_is_usage_error_2(cli) -> None:
    result = cli("collect", "--frobnicate")
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--frobnicate" in result.stderr


def test_error_with_json_prints_one_object_on_stdout(cli, tmp_path: Path) -> None:
    result = cli("--json", "--config", tmp_path / "absent.toml", "collect")
    assert result.code == 78
    assert result.json() == {"stage": "collect", "error": result.json()["error"],
                             "exit_code": 78}
    assert "absent.toml" in result.json()["error"]


def test_json_log_format_gives_one_object_per_line(cli, tmp_path: Path) -> None:
    result = cli("--log-format", "json", "--config", tmp_path / "absent.toml", "collect")
    assert result.code == 78
    lines = result.stderr.strip().splitlines()
    assert [json.loads(line)["level"] for line in lines] == ["error"]


def test_keys_generate_writes_0600_and_refuses_overwrite(cli, tmp_path: Path) -> None:
    result = cli("--json", "keys", "generate", tmp_path / "k.key")
    assert result.code == 0
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600
    assert len(result.json()["key_id"]) == 16
    again = cli("keys", "generate", tmp_path / "k.key")
    assert again.code == 73


def test_quiet_keeps_stderr_empty_on_success(cli, key_env, small_config: Path) -> None:
    result = cli("--quiet", "--config", small_config, "collect")
    assert result.code == 0 and result.stderr == ""
    assert result.stdout.startswith("collect ")


def test_version_flag(cli) -> None:
    result = cli("--version")
    assert result.code == 0 and result.stdout.startswith("personanet ")
