"""The budget is pinned in the ledger: a second config cannot spend past the first one's.

The ledger (`<root>/<dataset>/budget.json`) pins the (epsilon, delta) budget at its
first charge. A config asking for more is refused (exit 69) until a key holder raises
the pin with `personanet budget set --epsilon X --reason TEXT`, which is logged with
time and key id; a config asking for less is honoured (the stricter figure applies).
The ledger is sealed (HMAC under its own HKDF purpose of the master key): an edited
ledger is refused (exit 65). Real ledgers in tmp_path, real keys, real (tiny) training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from personanet.errors import (
    BudgetExhaustedError,
    IntegrityError,
    KeyAccessError,
    UsageError,
)
from personanet.privacy.ledger import Ledger, budget_summary
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey, write_key_file

from .conftest import ledger_config, write_config

# ----------------------------------------------------------------------- helpers


def _config(tmp_path: Path, *, epsilon: float, delta: float = 1e-4):
    return ledger_config(tmp_path, epsilon=epsilon, delta=delta)


def _store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", "people")


def _charge(ledger: Ledger, *, epsilon: float = 1.0, budget: tuple[float, float] = (3.0, 1e-4),
            spent: float | None = None) -> dict:
    """A run that reserves `epsilon` under a config's `budget` and settles at `spent`."""
    entry = ledger.reserve(epsilon=epsilon, delta=1e-5, budget_epsilon=budget[0],
                           budget_delta=budget[1], accountant="prv")
    if spent is not None:
        ledger.settle(entry["run_id"], epsilon=spent, delta=1e-5)
    return entry


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MasterKey:
    key = MasterKey.generate()
    path = tmp_path / "master.key"
    write_key_file(path, key)
    monkeypatch.delenv("PERSONANET_KEY", raising=False)
    monkeypatch.setenv("PERSONANET_KEY_FILE", str(path))
    return key


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("personanet")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


# ----------------------------------------------------------------------- end to end


def test_second_config_with_a_higher_budget_is_refused_until_budget_set_raises_it(
        cli, key_file: MasterKey, tmp_path: Path, small_csv: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    first = write_config(tmp_path / "first.toml", small_csv, overrides=(
        "[train]\nepochs = 1\nbatch_size = 64\nepsilon = 1.0\n[budget]\nepsilon = 3.0\n"))
    # Same dataset, three times the budget, and another epsilon (so no reuse).
    second = write_config(tmp_path / "second.toml", small_csv, overrides=(
        "[train]\nepochs = 1\nbatch_size = 64\nepsilon = 1.5\n[budget]\nepsilon = 9.0\n"))
    for stage in ("collect", "clean"):
        assert cli("--config", first, stage).code == 0
    assert cli("--config", first, "train", "--device", "cpu").code == 0
    ledger_file = tmp_path / "artifacts" / "persona" / "budget.json"
    pinned = json.loads(ledger_file.read_text())["budget"]
    assert (pinned["epsilon"], pinned["delta"]) == (3.0, 1e-4)
    before = ledger_file.read_bytes()

    refused = cli("--config", second, "train", "--device", "cpu")
    assert refused.code == 69, refused.stderr
    (message,) = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert "budget.epsilon = 9" in message and "pinned" in message and "3" in message
    assert "personanet budget set --epsilon 9" in message
    assert ledger_file.read_bytes() == before, "a refused run must spend nothing"

    no_reason = cli("--config", second, "budget", "set", "--epsilon", "9")
    assert no_reason.code == 2 and "--reason" in no_reason.stderr
    assert ledger_file.read_bytes() == before

    raised = cli("--config", second, "budget", "set", "--epsilon", "9", "--reason",
                 "DPO approved a second study, ticket 1234")
    assert raised.code == 0, raised.stderr

    shown = cli("--json", "--config", second, "budget", "show").json()
    assert shown["pinned"] is True and shown["authenticated"] is True
    assert shown["pinned_epsilon"] == 9.0 and shown["budget_epsilon"] == 9.0
    pin, raise_ = shown["budget_history"]
    assert pin["action"] == "pinned" and pin["source"] == "config" and pin["epsilon"] == 3.0
    assert raise_["action"] == "raised" and raise_["source"] == "budget set"
    assert (raise_["previous_epsilon"], raise_["epsilon"]) == (3.0, 9.0)
    assert raise_["reason"] == "DPO approved a second study, ticket 1234"
    assert raise_["key_id"] == key_file.key_id and raise_["at"]

    text = cli("--config", second, "budget", "show")
    assert text.code == 0
    assert "raised" in text.stdout and "DPO approved a second study, ticket 1234" in text.stdout
    assert key_file.key_id in text.stdout

    trained = cli("--json", "--config", second, "train", "--device", "cpu")
    assert trained.code == 0, trained.stderr
    assert json.loads(ledger_file.read_text())["budget"]["epsilon"] == 9.0


def test_budget_show_piped_keeps_whole_values(cli, key_file: MasterKey, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # stdout is not a terminal here (captured), as in `budget show | less` or a cron log:
    # rich would lay the table out in 80 columns and cut run ids and versions.
    monkeypatch.delenv("COLUMNS", raising=False)
    config = write_config(tmp_path / "persona.toml", tmp_path / "none.csv")
    store = ArtifactStore(tmp_path / "artifacts", "persona")
    ledger = Ledger(store, key_file)
    entry = _charge(ledger, spent=0.97, budget=(10.0, 1e-4))
    ledger.update(entry["run_id"], version="20261130T064747.417720Z-3e0b7a",
                  steps=4, steps_planned=4)
    shown = cli("--config", config, "budget", "show")
    assert shown.code == 0, shown.stderr
    assert entry["run_id"] in shown.stdout
    assert "20261130T064747.417720Z-3e0b7a" in shown.stdout
    assert "…" not in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) > 80


def test_budget_set_needs_the_key(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERSONANET_KEY", raising=False)
    monkeypatch.delenv("PERSONANET_KEY_FILE", raising=False)
    config = write_config(tmp_path / "persona.toml", tmp_path / "none.csv")
    result = cli("--config", config, "budget", "set", "--epsilon", "50", "--reason", "x")
    assert result.code == 77
    assert not (tmp_path / "artifacts" / "persona" / "budget.json").exists()


# ----------------------------------------------------------------------- the ledger


def test_config_below_the_pin_is_honoured_as_the_stricter_budget(
        tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    store, key = _store(tmp_path), MasterKey.generate()
    ledger = Ledger(store, key)
    _charge(ledger, spent=1.0, budget=(3.0, 1e-4))  # pins 3
    with pytest.raises(BudgetExhaustedError) as refused:
        _charge(ledger, epsilon=0.5, budget=(1.2, 1e-4))
    assert "remaining 0.2 of 1.2" in str(refused.value)
    assert "stricter figures apply" in log.text
    _charge(ledger, epsilon=0.2, budget=(1.2, 1e-4))  # what the stricter budget leaves fits
    summary = budget_summary(_config(tmp_path, epsilon=1.2), store, key)
    assert summary["pinned_epsilon"] == 3.0 and summary["budget_epsilon"] == 1.2
    assert summary["remaining_epsilon"] == pytest.approx(0.0)


def test_higher_config_delta_is_refused_too(tmp_path: Path) -> None:
    ledger = Ledger(_store(tmp_path), MasterKey.generate())
    _charge(ledger, budget=(3.0, 1e-4))
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExhaustedError, match="budget.delta = 0.001") as refused:
        _charge(ledger, budget=(3.0, 1e-3))
    assert refused.value.exit_code == 69
    assert ledger.path.read_bytes() == before


def test_lowering_needs_no_reason_raising_does(tmp_path: Path) -> None:
    store, key = _store(tmp_path), MasterKey.generate()
    ledger = Ledger(store, key)
    _charge(ledger, spent=1.0, budget=(3.0, 1e-4))
    lowered = ledger.set_budget(epsilon=2.0, config_epsilon=3.0, config_delta=1e-4)
    assert lowered["action"] == "lowered" and lowered["reason"] is None
    assert lowered["key_id"] == key.key_id
    with pytest.raises(UsageError, match="--reason"):
        ledger.set_budget(epsilon=2.5, config_epsilon=3.0, config_delta=1e-4)
    with pytest.raises(UsageError, match="--reason"):  # delta counts as a raise too
        ledger.set_budget(epsilon=2.0, delta=2e-4, config_epsilon=3.0, config_delta=1e-4)
    # The config (3) is now above the lowered pin (2): refused until lowered or raised.
    with pytest.raises(BudgetExhaustedError, match="pinned"):
        _charge(ledger, epsilon=0.5, budget=(3.0, 1e-4))
    _charge(ledger, epsilon=0.5, budget=(2.0, 1e-4))
    doc = json.loads(ledger.path.read_text())
    assert [c["action"] for c in doc["budget_history"]] == ["pinned", "lowered"]


def test_ledger_of_the_previous_format_is_pinned_at_its_next_charge(
        tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    store, key = _store(tmp_path), MasterKey.generate()
    store.dataset_dir.mkdir(parents=True)
    old = {"format": "personanet.budget/1", "dataset": "people", "entries": [
        {"run_id": "r1", "status": "settled", "private": True, "epsilon": 1.0, "delta": 1e-5,
         "epsilon_spent": 0.98, "delta_spent": 1e-5}]}
    (store.dataset_dir / "budget.json").write_text(json.dumps(old))
    ledger = Ledger(store, key)
    assert budget_summary(_config(tmp_path, epsilon=5.0), store, key)["pinned"] is False
    _charge(ledger, budget=(5.0, 1e-4))
    doc = json.loads(ledger.path.read_text())
    assert doc["format"] == "personanet.budget/2" and doc["seal"]["key_id"] == key.key_id
    assert doc["budget"]["epsilon"] == 5.0
    (pin,) = doc["budget_history"]
    assert pin["action"] == "pinned" and "before budgets were pinned" in pin["reason"]
    assert "pinned in the ledger at epsilon 5" in log.text
    assert [e["run_id"] for e in doc["entries"]][0] == "r1"  # nothing forgotten


@pytest.mark.parametrize("edit", ["lower spent", "raise pin", "drop seal"])
def test_edited_ledger_is_refused_with_65(tmp_path: Path, edit: str) -> None:
    store, key = _store(tmp_path), MasterKey.generate()
    ledger = Ledger(store, key)
    _charge(ledger, spent=2.5, budget=(3.0, 1e-4))
    doc = json.loads(ledger.path.read_text())
    if edit == "lower spent":
        doc["entries"][0]["epsilon_spent"] = 0.1
    elif edit == "raise pin":
        doc["budget"]["epsilon"] = 100.0
    else:
        del doc["seal"]
    ledger.path.write_text(json.dumps(doc, indent=2))
    with pytest.raises(IntegrityError) as refused:
        _charge(ledger, epsilon=0.4, budget=(100.0, 1e-4))
    assert refused.value.exit_code == 65
    with pytest.raises(IntegrityError):
        budget_summary(_config(tmp_path, epsilon=3.0), store, key)


def test_edited_ledger_makes_budget_show_exit_65(cli, key_file: MasterKey,
                                                  tmp_path: Path) -> None:
    config = write_config(tmp_path / "persona.toml", tmp_path / "none.csv")
    ledger = Ledger(ArtifactStore(tmp_path / "artifacts", "persona"), key_file)
    _charge(ledger, spent=2.5, budget=(10.0, 1e-4))
    doc = json.loads(ledger.path.read_text())
    doc["entries"][0]["epsilon_spent"] = 0.5
    ledger.path.write_text(json.dumps(doc))
    shown = cli("--config", config, "budget", "show")
    assert shown.code == 65 and "changed outside personanet" in shown.stderr


def test_ledger_sealed_under_another_key_is_77_until_resealed(tmp_path: Path) -> None:
    store, old, new = _store(tmp_path), MasterKey.generate(), MasterKey.generate()
    _charge(Ledger(store, old), spent=1.0)
    with pytest.raises(KeyAccessError) as refused:
        Ledger(store, new).read()
    assert refused.value.exit_code == 77
    Ledger(store, old).reseal(new)  # what `keys rotate` does
    Ledger(store, old).reseal(new)  # an interrupted rotation runs again: no change
    assert Ledger(store, new).totals()["settled_epsilon"] == 1.0
    with pytest.raises(KeyAccessError):
        Ledger(store, old).read()


def test_ledger_without_a_key_can_be_read_but_not_changed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _charge(Ledger(store, MasterKey.generate()), spent=1.0)
    before = (store.dataset_dir / "budget.json").read_bytes()
    unkeyed = Ledger(store)
    assert unkeyed.totals()["settled_epsilon"] == 1.0 and not unkeyed.authenticated
    with pytest.raises(KeyAccessError):
        _charge(unkeyed)
    assert (store.dataset_dir / "budget.json").read_bytes() == before


def test_keys_rotate_reseals_the_ledger(cli, key_file: MasterKey, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path / "persona.toml", tmp_path / "none.csv")
    _charge(Ledger(ArtifactStore(tmp_path / "artifacts", "persona"), key_file), spent=1.5,
            budget=(10.0, 1e-4))
    new = MasterKey.generate()
    write_key_file(tmp_path / "new.key", new)
    rotated = cli("--config", config, "keys", "rotate", "--new-key-file", tmp_path / "new.key")
    assert rotated.code == 0, rotated.stderr
    monkeypatch.setenv("PERSONANET_KEY_FILE", str(tmp_path / "new.key"))
    shown = cli("--json", "--config", config, "budget", "show")
    assert shown.code == 0, shown.stderr
    assert shown.json()["authenticated"] is True and shown.json()["spent_epsilon"] == 1.5
    monkeypatch.setenv("PERSONANET_KEY_FILE", str(tmp_path / "master.key"))
    assert cli("--config", config, "budget", "show").code == 77  # the old key opens nothing


def test_older_genuine_ledger_put_back_is_refused_with_65(cli, key_file: MasterKey,
                                                          tmp_path: Path,
                                                          small_csv: Path) -> None:
    # The seal stops edits; a sealed copy from before the last run is stopped by the
    # sealed manifests of the models it does not know about.
    config = write_config(tmp_path / "persona.toml", small_csv, overrides=(
        "[train]\nepochs = 1\nbatch_size = 64\n"))
    for stage in ("collect", "clean"):
        assert cli("--config", config, stage).code == 0
    assert cli("--config", config, "train", "--device", "cpu").code == 0
    ledger_file = tmp_path / "artifacts" / "persona" / "budget.json"
    backup = ledger_file.read_bytes()
    assert cli("--config", config, "train", "--device", "cpu", "--force").code == 0
    ledger_file.write_bytes(backup)  # one run's epsilon forgotten
    again = cli("--config", config, "train", "--device", "cpu", "--force")
    assert again.code == 65, again.stderr
    assert "older copy was put back" in again.stderr
    assert ledger_file.read_bytes() == backup


def test_artifacts_verify_checks_the_ledger_seal(cli, key_file: MasterKey,
                                                 tmp_path: Path) -> None:
    config = write_config(tmp_path / "persona.toml", tmp_path / "none.csv")
    ledger = Ledger(ArtifactStore(tmp_path / "artifacts", "persona"), key_file)
    _charge(ledger, spent=2.5, budget=(10.0, 1e-4))
    assert cli("--config", config, "artifacts", "verify").code == 0
    doc = json.loads(ledger.path.read_text())
    doc["budget"]["epsilon"] = 1000.0
    ledger.path.write_text(json.dumps(doc))
    verified = cli("--config", config, "artifacts", "verify")
    assert verified.code == 65 and "budget ledger" in verified.stderr
