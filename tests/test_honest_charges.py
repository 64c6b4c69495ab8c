"""Honest charges: budget is spent only on a run that can finish, and at the person's figure.

- `personanet run` refuses before train (exit 65, nothing charged) when clean leaves no
  training or no test rows: evaluate would refuse the model anyway.
- A row-level run where a person may have k > 1 rows is charged its per-person epsilon
  (group privacy of its RDP curve), planned before the first step and settled at the
  same figure from the final history; one whose bound does not fit exits 69 untrained.
  The entry composes by addition, never as the Gaussian it was derived from.

Person-level and k = 1 runs are charged as before: `test_accounting.py`'s
`test_train_artifact_epsilon_matches_dp_accounting_recomputed` pins k = 1 (the ledger's
``epsilon_spent`` is privacy.json's epsilon), and the person-level run below does k > 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from personanet.privacy import composition
from personanet.privacy.units import group_privacy
from personanet.reporting.report import privacy_sentence
from tests.conftest import sample_lines, write_config
from tests.test_person_level import panel_csv


def _ledger_bytes(root: Path) -> bytes | None:
    path = root / "persona" / "budget.json"
    return path.read_bytes() if path.exists() else None


def _entries(root: Path) -> list[dict]:
    return json.loads((root / "persona" / "budget.json").read_text())["entries"]


def _privacy(result: dict) -> dict:
    return json.loads((Path(result["path"]) / "privacy.json").read_text())


# ---------------------------------------------------------------- run: nothing to evaluate


def test_run_with_no_test_rows_exits_65_before_train_and_charges_nothing(
        cli, key_env, tmp_path: Path, small_config: Path) -> None:
    root = tmp_path / "root"
    for stage in ("collect", "clean", "train"):  # an earlier private run of the dataset
        done = cli("--config", small_config, "--artifacts", root, stage)
        assert done.code == 0, done.stderr
    before = _ledger_bytes(root)
    assert before is not None and len(_entries(root)) == 1
    # A new export of the same dataset whose split column says "train" on every row
    source = tmp_path / "train_only.csv"
    source.write_text(sample_lines(120, split="train"), encoding="utf-8")
    config = write_config(tmp_path / "train_only.toml", source,
                          overrides="[train]\nepochs = 1\nbatch_size = 64\n")
    trained = {a.name for a in (root / "persona" / "train").iterdir()}
    result = cli("--json", "--config", config, "--artifacts", root, "run")
    assert result.code == 65, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert re.search(r"left \d+ train and 0 test rows", message), message
    assert "no privacy budget was spent" in message
    assert "clean.split_column" in message and "'test'" in message
    assert _ledger_bytes(root) == before
    assert {a.name for a in (root / "persona" / "train").iterdir()} == trained
    payload = json.loads(result.stdout)
    assert [s["stage"] for s in payload["stages"]] == ["collect", "clean"]


def test_run_with_no_train_rows_exits_65_and_bare_train_too(cli, key_env,
                                                            tmp_path: Path) -> None:
    source = tmp_path / "test_only.csv"
    source.write_text(sample_lines(60, split="test"), encoding="utf-8")
    config = write_config(tmp_path / "c.toml", source,
                          overrides="[train]\nepochs = 1\nbatch_size = 64\n")
    root = tmp_path / "root"
    result = cli("--config", config, "--artifacts", root, "run")
    assert result.code == 65, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "left 0 train and 60 test rows" in message and "'train'" in message
    # `train` alone: refused on reading, before any reservation
    result = cli("--config", config, "--artifacts", root, "train")
    assert result.code == 65, result.stderr
    assert "no labelled training rows (the train split is empty" in result.stderr
    assert _ledger_bytes(root) is None
    assert not (root / "persona" / "train").exists()


def test_run_with_a_hash_split_too_small_names_test_fraction(cli, key_env,
                                                            tmp_path: Path) -> None:
    source = tmp_path / "few.csv"
    source.write_text(sample_lines(5, split="train"), encoding="utf-8")
    config = write_config(tmp_path / "c.toml", source,
                          overrides="[clean]\ntest_fraction = 0.000001\n")
    config.write_text(config.read_text().replace('split_column = "split"\n', ""))
    result = cli("--config", config, "--artifacts", tmp_path / "root", "run")
    assert result.code == 65, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "left 5 train and 0 test rows" in message
    assert "raise clean.test_fraction (now 1e-06)" in message
    assert _ledger_bytes(tmp_path / "root") is None


# ---------------------------------------------------------------- row level, k > 1


def _panel(tmp_path: Path, name: str, *, level: str, k: int = 6, budget: float = 30.0
           ) -> Path:
    return write_config(tmp_path / f"{name}.toml", panel_csv(tmp_path / "panel.csv"),
                        overrides=(f"[clean]\nmax_rows_per_unit = {k}\n"
                                   "dedupe_key = [\"email\", \"collected_at\"]\n"
                                   f"[train]\nepochs = 1\nbatch_size = 16\n"
                                   f"privacy_unit_level = \"{level}\"\n"
                                   f"[budget]\nepsilon = {budget}\n"))


def _train(cli, config: Path, root: Path):
    for stage in ("collect", "clean"):
        done = cli("--config", config, "--artifacts", root, stage)
        assert done.code == 0, done.stderr
    return cli("--json", "--config", config, "--artifacts", root, "train")


def test_row_level_run_is_charged_its_per_person_bound_composed_by_addition(
        cli, key_env, tmp_path: Path) -> None:
    root = tmp_path / "root"
    trained = _train(cli, _panel(tmp_path, "row", level="row"), root)
    assert trained.code == 0, trained.stderr
    privacy = _privacy(trained.json())
    level = privacy["unit_level"]
    (entry,) = _entries(root)
    bound = group_privacy(history=[tuple(p) for p in privacy["accountant_history"]], rows=6,
                          delta=privacy["delta"])
    # settled at the per-person bound from the final history, planned at the same figure
    assert entry["status"] == "settled" and entry["epsilon_spent"] == bound.epsilon
    assert entry["epsilon"] == pytest.approx(bound.epsilon, rel=1e-9)
    assert entry["delta_spent"] == privacy["delta"] == level["person_delta"]
    assert entry["epsilon_spent"] > 6 * privacy["epsilon"]
    # which figure was charged, and the row epsilon beside it under its own name
    assert entry["mechanism"] == "group-privacy" and entry["charged"] == "person_epsilon"
    assert entry["row_epsilon_spent"] == privacy["epsilon"] == level["row_epsilon"]
    assert level["person_epsilon"] == entry["epsilon_spent"]
    assert level["ledger_charged"] == "person_epsilon"
    sentence = privacy_sentence({"private": True, "epsilon": privacy["epsilon"],
                                 "delta": privacy["delta"], "unit_level": level})
    assert "budget was charged that per-person figure" in sentence
    # budget show's next run: another like it adds its per-person bound, not the row figure
    shown = cli("--json", "--config", _panel(tmp_path, "row", level="row"), "--artifacts",
                root, "budget", "show")
    assert shown.code == 0, shown.stderr
    nxt = shown.json()["next_run"]
    assert nxt["mechanism"] == "group-privacy" and nxt["like_run"] == entry["run_id"]
    assert nxt["epsilon"] == pytest.approx(entry["epsilon_spent"], rel=1e-9)
    text = cli("--config", _panel(tmp_path, "row", level="row"), "--artifacts", root,
               "budget", "show")
    assert "charged its per-person epsilon" in " ".join(text.stdout.split())

    # One more run, person level (DP-SGD, composed tightly at what delta is left)
    person = _train(cli, _panel(tmp_path, "person", level="person"), root)
    assert person.code == 0, person.stderr
    person_privacy = _privacy(person.json())
    group, dpsgd = _entries(root)
    assert "mechanism" not in dpsgd  # charged exactly as before this change
    assert dpsgd["epsilon"] == 1.0 and dpsgd["epsilon_spent"] == person_privacy["epsilon"]
    shown = cli("--json", "--config", _panel(tmp_path, "person", level="person"),
                "--artifacts", root, "budget", "show")
    assert shown.code == 0, shown.stderr
    summary = shown.json()
    budget_delta = summary["budget_delta"]
    alone = composition.compose([dpsgd], delta=budget_delta - group["delta_spent"])
    assert summary["composed_epsilon"] == pytest.approx(alone.epsilon + group["epsilon_spent"],
                                                        rel=1e-9)
    assert summary["added_epsilon"] == pytest.approx(
        group["epsilon_spent"] + dpsgd["epsilon_spent"], rel=1e-12)
    assert summary["spent_epsilon"] == summary["added_epsilon"]
    assert summary["remaining_epsilon"] == pytest.approx(30.0 - summary["composed_epsilon"])


def test_row_level_run_whose_per_person_bound_does_not_fit_exits_69_untrained(
        cli, key_env, tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = _train(cli, _panel(tmp_path, "person", level="person", budget=10.0), root)
    assert first.code == 0, first.stderr
    before = _ledger_bytes(root)
    models = {a.name for a in (root / "persona" / "train").iterdir()}

    refused = _train(cli, _panel(tmp_path, "row20", level="row", k=20, budget=10.0), root)
    assert refused.code == 69, refused.stderr
    message = refused.stderr.strip().splitlines()[-1]
    found = re.search(r"charged its per-person epsilon ([0-9.e+]+) at delta 1e-05", message)
    assert found, message
    assert float(found.group(1)) > 10  # what was checked: far above the row epsilon of 1
    assert "up to 20 rows a person" in message
    assert 'train.privacy_unit_level = "person" (the default)' in message
    assert _ledger_bytes(root) == before
    assert {a.name for a in (root / "persona" / "train").iterdir()} == models
    assert not any((root / "persona" / "checkpoints").glob("*"))
