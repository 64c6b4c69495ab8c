"""Shared fixtures: a real key, a tiny real sample of the bundled data, a config, the CLI."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from personanet.cli import run_cli
from personanet.store.keys import MasterKey

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "persona.csv.gz"
CONFIG = ROOT / "configs" / "persona.toml"


def sample_lines(rows: int, *, split: str | None = None) -> str:
    """The header and the first `rows` records of the bundled sample (optionally one split)."""
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as fh:
        header = fh.readline()
        out = [header]
        for line in fh:
            if split is None or line.rstrip("\n").endswith("," + split):
                out.append(line)
                if len(out) > rows:
                    break
    return "".join(out)


def write_config(path: Path, source: Path, *, overrides: str = "") -> Path:
    """configs/persona.toml pointed at `source`, with extra TOML appended per section.

    `overrides` is TOML of whole tables ([train] epochs = 1 ...) that replace the same keys.
    """
    import tomllib

    base = tomllib.loads(CONFIG.read_text())
    extra = tomllib.loads(overrides) if overrides else {}
    for section, values in extra.items():
        if isinstance(values, dict) and section != "columns":
            base.setdefault(section, {}).update(values)
        elif section == "columns":
            for col, spec in values.items():
                base["columns"].setdefault(col, {}).update(spec)
    base["dataset"]["source"] = str(source)
    if "source" in base.get("predict", {}):
        base["predict"]["source"] = str((CONFIG.parent / base["predict"]["source"]).resolve())
    path.write_text(_dump_toml(base))
    return path


def _dump_toml(data: dict) -> str:
    lines: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):  # an inline table (columns' aliases)
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    for section, table in data.items():
        if section == "columns":
            for col, spec in table.items():
                lines.append(f"[columns.{json.dumps(col)}]")
                lines += [f"{k} = {value(v)}" for k, v in spec.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def key_env(key: MasterKey, monkeypatch: pytest.MonkeyPatch) -> MasterKey:
    """The key exported the way users do it (PERSONANET_KEY)."""
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    monkeypatch.setenv("PERSONANET_KEY", key.to_base64())
    return key


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    """400 real records (300 train, 100 test) from the bundled sample, as a plain CSV."""
    train = sample_lines(300, split="train")
    test = sample_lines(100, split="test").split("\n", 1)[1]
    path = tmp_path / "persona_small.csv"
    path.write_text(train + test, encoding="utf-8")
    return path


@pytest.fixture
def small_config(tmp_path: Path, small_csv: Path) -> Path:
    return write_config(tmp_path / "persona.toml", small_csv,
                        overrides="[train]\nepochs = 1\nbatch_size = 64\n")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {self.stdout!r}"
        return json.loads(lines[0])


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run `personanet ARGS` in-process (real CLI parsing and exit codes)."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        code = run_cli([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return invoke


def run_subprocess(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m personanet ARGS` in a real child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "personanet", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout, check=False)


def all_bytes_under(root: Path) -> bytes:
    buffer = io.BytesIO()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            buffer.write(path.read_bytes())
    return buffer.getvalue()


def ledger_config(tmp_path: Path, *, epsilon: float, delta: float = 1e-4):
    """The smallest valid config around a budget: what ledger tests need and nothing more."""
    from personanet.config import parse_config

    raw = {
        "dataset": {"name": "people", "target": "y", "privacy_unit": "id"},
        "columns": {"id": {"role": "identifier"}, "x": {"type": "numeric", "bounds": [0, 1]},
                    "y": {"role": "target", "categories": ["a", "b"]}},
        "budget": {"epsilon": epsilon, "delta": delta},
    }
    return parse_config(raw, path=tmp_path / "c.toml")
