"""`personanet tune`: a private search charged to the budget as one repeat-and-select run.

Real dp-accounting, Opacus, encryption and (tiny) training: a few hundred people of the
bundled sample, one or two epochs a trial. The charge is checked against dp-accounting's
own `RepeatAndSelectDpEvent` figure, recomputed here from what the ledger records.
Mutations seen caught: every trial given the reference's noise whatever its batch and
epochs; a stopped search always released; tune reading the test table; the chain's
`tune.use_in_chain` hook removed; a score counted on the trials' own people left out of
their cost (`selection.trial_event` ignoring `score_noise`).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import dp_accounting
import polars as pl
import pytest
from dp_accounting.dp_event import RepeatAndSelectDpEvent
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from personanet.cleaning.values import UNIT
from personanet.config import Config, load_config
from personanet.errors import BudgetExhaustedError, ConfigError
from personanet.privacy import selection
from personanet.privacy.ledger import Ledger, budget_summary
from personanet.stages import tune_trials
from personanet.stages.base import require_key
from personanet.stages.tune import tune
from personanet.store import crypto, tables
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey
from tests.conftest import SAMPLE, write_config

TUNE = """
[train]
epochs = 1
batch_size = 64
[tune]
epsilon = 2.0
trials_mean = 2.0
epochs = [1, 2]
batch_size = [32, 64]
hidden_sizes = ["auto", [8]]
[budget]
epsilon = 10.0
"""


def with_budget(epsilon: float) -> str:
    return TUNE.replace("[budget]\nepsilon = 10.0", f"[budget]\nepsilon = {epsilon}")


def _clean_frame(config: Config, raw: pl.DataFrame) -> pl.DataFrame:
    """`raw` text rows in clean's output schema (the person's column doubles as UNIT)."""
    exprs = []
    for col in config.columns.values():
        if col.role == "ignore":
            continue
        value = pl.col(col.name)
        if col.kind == "numeric":
            exprs.append(value.cast(pl.Float64))
        elif col.role in ("identifier", "target"):
            exprs.append(value)
        else:
            cats = list(col.categories or ())
            exprs.append(pl.when(value.is_in(cats)).then(value)
                         .otherwise(pl.lit("__other__")).alias(col.name))
    exprs.append(pl.col(config.dataset.privacy_unit).alias(UNIT))
    return raw.select(exprs)


class Setup:
    def __init__(self, tmp_path: Path, *, overrides: str = TUNE, train_rows: int = 400,
                 key: MasterKey | None = None) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config_path = write_config(tmp_path / "persona.toml", SAMPLE, overrides=overrides)
        self.config = load_config(self.config_path)
        self.root = tmp_path / "artifacts"
        self.store = ArtifactStore(self.root, self.config.dataset.name)
        self.key = key or MasterKey.generate()
        raw = pl.read_csv(SAMPLE, infer_schema=False, n_rows=3000)
        people = _clean_frame(self.config, raw.filter(pl.col("split") == "train"))
        # the test people: other rows of the same split (the UCI test file's labels end in
        # a period that only the real clean stage maps)
        self.train, self.test = people.head(train_rows), people.slice(train_rows, 200)
        require_key(self.store, self.key)
        with self.store.lock():
            writer = self.store.create("clean", fingerprint=f"test-{time.time_ns()}",
                                       inputs=[], config={}, config_hash="test")
            for name, frame in (("train.parquet.enc", self.train),
                                ("test.parquet.enc", self.test)):
                tables.write_encrypted_parquet(writer.path(name), frame, self.key)
                writer.add(name, rows=frame.height, encrypted=True, key_id=self.key.key_id)
            self.clean = writer.commit()

    def tune(self, config: Config | None = None, **options):
        return tune(config or self.config, self.store, self.key,
                    input_version=self.clean.version, **options)

    def entries(self) -> list[dict]:
        return Ledger(self.store, self.key).entries


def dp_accounting_figure(entry: dict) -> float:
    """dp-accounting's epsilon for the search the ledger entry records, from scratch."""
    search = entry["search"]
    trials = search["trials"]
    shape = math.inf if trials["distribution"] == "poisson" else trials["shape"]
    trial = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        search["sample_rate"], dp_accounting.GaussianDpEvent(search["noise_multiplier"])),
        search["steps"])
    if search.get("score", "").startswith("composed"):
        # scored on its own training people: the count's Gaussian is part of each trial
        trial = dp_accounting.ComposedDpEvent(
            [trial, dp_accounting.GaussianDpEvent(search["score_noise_multiplier"])])
    accountant = RdpAccountant([o for o in DEFAULT_RDP_ORDERS if o < search["max_order"]])
    accountant.compose(RepeatAndSelectDpEvent(trial, trials["mean"], shape))
    return accountant.get_epsilon(search["delta"])


def draw_always(count: int):
    return lambda self, rng: count


# ----------------------------------------------------------------------- the charge


def test_charged_epsilon_is_dp_accountings_repeat_and_select_figure(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    result = s.tune()
    [entry] = s.entries()
    assert entry["mechanism"] == "repeat-and-select" and entry["status"] == "settled"
    expected = dp_accounting_figure(entry)
    assert entry["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert entry["epsilon_spent"] == pytest.approx(expected, rel=1e-9)
    # calibrated to the target: at most tune.epsilon, and not needlessly below it
    assert 2.0 * (1 - 1e-3) <= entry["epsilon"] <= 2.0
    privacy = json.loads((result.path / "privacy.json").read_text())
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert privacy["private"] is True and "tuned" in privacy["tuning"]["note"]
    assert result.figures["tuned"] is True and result.stage == "train"
    # the search is added to the other runs, never composed as one DP-SGD run
    summary = budget_summary(s.config, s.store, s.key)
    assert summary["composed_epsilon"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("distribution,shape", [("poisson", 0.0),
                                                ("truncated_negative_binomial", 0.0),
                                                ("truncated_negative_binomial", 1.0)])
def test_plan_meets_the_target_by_dp_accounting(distribution: str, shape: float) -> None:
    trials = selection.Trials.of(distribution, mean=3.0, shape=shape)
    plan = selection.plan_search(target_epsilon=1.5, delta=1e-5, sample_rate=1 / 32, steps=320,
                                 trials=trials)
    entry = {"search": plan.to_json()}
    assert plan.epsilon == pytest.approx(dp_accounting_figure(entry), rel=1e-9)
    assert 1.5 * (1 - 1e-3) <= plan.epsilon <= 1.5
    # a little less noise would overshoot: the calibration is tight
    less = selection.search_epsilon(noise_multiplier=plan.noise_multiplier * 0.995,
                                    sample_rate=1 / 32, steps=320, trials=trials, delta=1e-5)
    assert less > 1.5


def test_a_score_counted_on_the_training_people_is_charged_with_every_trial() -> None:
    trials = selection.Trials.of("truncated_negative_binomial", mean=2.0)
    plan = selection.plan_search(target_epsilon=2.0, delta=1e-5, sample_rate=1 / 32,
                                 steps=480, trials=trials, composed_score_noise=10.0)
    assert plan.score_composed and plan.score_noise_multiplier == 10.0
    assert plan.epsilon == pytest.approx(dp_accounting_figure({"search": plan.to_json()}),
                                         rel=1e-9)
    assert 2.0 * (1 - 1e-3) <= plan.epsilon <= 2.0
    # the score costs something: without it the same noise would be cheaper, and a search
    # scored on other people affords less noise at the same sample rate and steps
    free = {"search": {**plan.to_json(), "score": "parallel"}}
    assert dp_accounting_figure(free) < plan.epsilon * 0.99
    parallel = selection.plan_search(target_epsilon=2.0, delta=1e-5, sample_rate=1 / 32,
                                     steps=480, trials=trials)
    assert parallel.noise_multiplier < plan.noise_multiplier


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_trials_train_on_everyone_or_leave_the_validation_people_out(tmp_path: Path,
                                                                     fraction: float) -> None:
    s = Setup(tmp_path, overrides=TUNE.replace(
        "trials_mean = 2.0", f"trials_mean = 2.0\nvalidation_fraction = {fraction}\n"
        "score_noise_multiplier = 8.0"))
    result = s.tune()
    [entry] = s.entries()
    assert entry["epsilon"] == pytest.approx(dp_accounting_figure(entry), rel=1e-9)
    assert 2.0 * (1 - 1e-3) <= entry["epsilon"] <= 2.0
    if fraction == 0:  # scored on the trial's own people: the count is charged, z as set
        assert entry["search"]["score"].startswith("composed")
        assert entry["search"]["score_noise_multiplier"] == 8.0
        assert (result.figures["train_rows"], result.figures["validation_rows"]) == (
            s.train.height, 0)
    else:  # scored on held-out people: free, z from the reference
        assert entry["search"]["score"].startswith("parallel")
        assert entry["search"]["score_noise_multiplier"] != 8.0
        assert 0 < result.figures["validation_rows"] < s.train.height * 0.4
        assert result.figures["train_rows"] + result.figures["validation_rows"] == (
            s.train.height)


@pytest.mark.parametrize("sample_rate,steps", [(1 / 64, 640), (1 / 16, 160), (1 / 32, 480),
                                               (1 / 64, 320)])
def test_each_trial_is_covered_by_the_reference_at_every_order(sample_rate: float,
                                                               steps: int) -> None:
    plan = selection.plan_search(target_epsilon=2.0, delta=1e-5, sample_rate=1 / 32, steps=320,
                                 trials=selection.Trials.of("poisson", mean=3.0))
    reference = plan.reference_rdp()
    sigma = selection.trial_noise(plan, sample_rate=sample_rate, steps=steps)
    rdp = selection.trial_rdp(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
    assert (rdp <= reference).all()
    less = selection.trial_rdp(noise_multiplier=sigma * 0.99, sample_rate=sample_rate,
                               steps=steps)
    assert (less > reference).any()  # the least such noise, not just some noise
    # the validation count's Gaussian is under the reference too (parallel composition)
    orders = selection.orders()
    z = plan.score_noise_multiplier
    assert all(order / (2 * z * z) <= r for order, r in zip(orders, reference, strict=True))


def test_number_of_trials_follows_its_distribution() -> None:
    rng = random.Random(7)
    for distribution, shape in (("poisson", 0.0), ("truncated_negative_binomial", 0.0),
                                ("truncated_negative_binomial", 1.0)):
        trials = selection.Trials.of(distribution, mean=3.0, shape=shape)
        draws = [trials.draw(rng) for _ in range(20_000)]
        assert sum(draws) / len(draws) == pytest.approx(3.0, rel=0.05)
        if distribution != "poisson":
            assert min(draws) >= 1  # truncated: always at least one trial


# ----------------------------------------------------------------------- the ledger


def test_reservation_exists_before_the_first_trial_and_a_killed_search_stays_charged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup(tmp_path)
    real = tune_trials.run_trial
    seen: list[list[dict]] = []

    def failing_on_trial_2(number, settings, **kwargs):
        seen.append(s.entries())
        if number == 2:
            raise RuntimeError("killed during trial 2")
        return real(number, settings, **kwargs)

    monkeypatch.setattr(selection.Trials, "draw", draw_always(3))
    monkeypatch.setattr(tune_trials, "run_trial", failing_on_trial_2)
    with pytest.raises(RuntimeError, match="trial 2"):
        s.tune()
    [before_first] = seen[0]
    assert before_first["status"] == "reserved" and before_first["epsilon"] > 1.99
    [entry] = s.entries()
    assert entry["status"] == "reserved"
    assert entry["epsilon"] == pytest.approx(dp_accounting_figure(entry), rel=1e-9)
    assert budget_summary(s.config, s.store, s.key)["composed_epsilon"] == pytest.approx(
        entry["epsilon"], rel=1e-9)
    assert not s.store.versions("train")  # no model of a search that did not finish


def test_search_stopped_before_any_trial_trained_gives_its_charge_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("the network could not be built")

    monkeypatch.setattr(tune_trials, "run_trial", broken)
    with pytest.raises(RuntimeError):
        s.tune()
    [entry] = s.entries()
    assert entry["status"] == "released" and entry["epsilon_spent"] == 0.0


def test_search_that_does_not_fit_the_budget_is_refused_and_spends_nothing(
        tmp_path: Path, cli, key_env: MasterKey) -> None:
    s = Setup(tmp_path, overrides=with_budget(1.5))
    with pytest.raises(BudgetExhaustedError):
        s.tune()
    assert s.entries() == []
    # the same through the command line: exit 69
    s2 = Setup(tmp_path / "cli", overrides=with_budget(1.5), key=key_env)
    result = cli("--config", s2.config_path, "--artifacts", s2.root, "tune", "--input",
                 s2.clean.version)
    assert result.code == 69, result.stderr
    assert "exhausted" in result.stderr and s2.entries() == []


def test_second_search_that_fits_only_with_the_first_counted_is_refused(tmp_path: Path) -> None:
    s = Setup(tmp_path, overrides=with_budget(3.0))
    s.tune()
    with pytest.raises(BudgetExhaustedError):
        s.tune(force=True)
    assert [e["status"] for e in s.entries()] == ["settled"]


# ----------------------------------------------------------------------- the data


def test_test_split_is_never_read(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    (s.clean.path / "test.parquet.enc").write_bytes(b"poisoned: not even encrypted")
    result = s.tune()
    assert result.figures["train_rows"] + result.figures["validation_rows"] == s.train.height


def test_validation_people_are_chosen_by_person_and_kept_apart() -> None:
    units = pl.Series([f"person-{i}" for i in range(4000)])
    held = tune_trials.validation_mask(units, 0.2)
    assert 0.17 < held.mean() < 0.23
    again = tune_trials.validation_mask(units.reverse(), 0.2)[::-1]
    assert (held == again).all()  # a function of the person alone, not of the others


@pytest.mark.parametrize("override", ["tune.validation_fraction=-0.1",
                                      "tune.validation_fraction=1.0",
                                      "tune.score_noise_multiplier=0"])
def test_bad_score_settings_are_config_errors(tmp_path: Path, override: str) -> None:
    path = write_config(tmp_path / "persona.toml", SAMPLE, overrides=TUNE)
    assert load_config(path, ["tune.validation_fraction=0"]).tune.validation_fraction == 0
    with pytest.raises(ConfigError, match="tune\\."):
        load_config(path, [override])


# ----------------------------------------------------------------------- the output


def test_only_the_winner_is_written_and_the_report_is_encrypted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup(tmp_path)
    monkeypatch.setattr(selection.Trials, "draw", draw_always(3))
    result = s.tune()
    names = sorted(p.name for p in result.path.iterdir())
    assert names == ["encoder.json", "manifest.json", "model.json", "model.safetensors",
                     "privacy.json", "tuning.json.enc"]
    assert len(s.store.versions("train")) == 1
    checkpoints = s.store.dataset_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    sealed = (result.path / "tuning.json.enc").read_bytes()
    assert b"dp_score" not in sealed
    report = json.loads(crypto.decrypt_bytes(sealed, s.key))
    assert report["trials_run"] == 3 and len(report["trials"]) == 3
    best = max(report["trials"], key=lambda t: t["dp_score"])
    assert report["winner"] == best["trial"]
    assert result.figures["validation_score"] == pytest.approx(best["dp_score"])
    # privacy.json names the winner's own settings; nothing about the losers
    privacy = (result.path / "privacy.json").read_text()
    assert "dp_score" not in privacy and '"trials_run"' not in privacy


def test_identical_search_is_reused_and_spends_nothing(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    first = s.tune()
    again = s.tune()
    assert again.reused and again.version == first.version
    assert len(s.entries()) == 1


def test_tune_from_the_command_line_then_evaluate_and_predict_use_the_model(
        tmp_path: Path, cli, key_env: MasterKey) -> None:
    s = Setup(tmp_path, key=key_env)
    result = cli("--config", s.config_path, "--artifacts", s.root, "--json", "tune",
                 "--input", s.clean.version)
    assert result.code == 0, result.stderr
    out = result.json()
    assert out["stage"] == "train" and out["tuned"] is True
    assert out["epsilon"] == pytest.approx(dp_accounting_figure(s.entries()[0]), rel=1e-9)
    evaluated = cli("--config", s.config_path, "--artifacts", s.root, "--json", "evaluate",
                    "--model", out["version"], "--set", "evaluate.min_accuracy=0")
    assert evaluated.code in (0, 69), evaluated.stderr
    assert evaluated.json()["epsilon_claimed"] == pytest.approx(out["epsilon"])
    predicted = cli("--config", s.config_path, "--artifacts", s.root, "--json", "predict",
                    "--model", out["version"], "--clean", s.clean.version)
    assert predicted.code == 0, predicted.stderr
    again = cli("--config", s.config_path, "--artifacts", s.root, "tune", "--input",
                s.clean.version)  # the human summary, of the reused search
    assert again.code == 0, again.stderr
    assert out["version"] in again.stdout + again.stderr
    shown = cli("--config", s.config_path, "--artifacts", s.root, "--json", "budget", "show")
    assert shown.code == 0, shown.stderr
    assert shown.json()["composed_epsilon"] == pytest.approx(out["epsilon"], rel=1e-9)


def test_the_chain_uses_the_tuned_model_only_when_the_config_says_so(
        tmp_path: Path, cli, key_env: MasterKey) -> None:
    from tests.conftest import sample_lines

    csv = tmp_path / "persona_small.csv"
    csv.write_text(sample_lines(300, split="train")
                   + sample_lines(100, split="test").split("\n", 1)[1], encoding="utf-8")
    chained = write_config(tmp_path / "chained.toml", csv,
                           overrides=TUNE.replace("[tune]\n", "[tune]\nuse_in_chain = true\n"))
    for command in ("collect", "clean"):
        done = cli("--config", chained, command)
        assert done.code == 0, done.stderr
    tuned = cli("--config", chained, "--json", "tune")
    assert tuned.code == 0, tuned.stderr
    version = tuned.json()["version"]
    bare = cli("--config", chained, "--json", "evaluate", "--set", "evaluate.min_accuracy=0")
    assert bare.code == 0, bare.stderr
    assert f"model {version}" in bare.stderr
    # a config that does not ask for it never borrows the tuned model (its chain has none)
    other = cli("--config", chained, "--set", "tune.use_in_chain=false", "evaluate")
    assert other.code == 66, other.stderr


def test_sigkilled_search_stays_charged_in_full(tmp_path: Path) -> None:
    s = Setup(tmp_path, overrides=TUNE.replace("epochs = [1, 2]", "epochs = [400]"))
    env = {**os.environ, "PERSONANET_KEY": s.key.to_base64(), "OMP_NUM_THREADS": "1"}
    env.pop("PERSONANET_KEY_FILE", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "personanet", "--quiet", "--config", str(s.config_path),
         "--artifacts", str(s.root), "tune", "--input", s.clean.version],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ledger = s.root / "persona" / "budget.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if ledger.exists() and '"reserved"' in ledger.read_text():
                break
            time.sleep(0.05)
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        time.sleep(1.0)  # into the first trial (400 epochs: many seconds)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    [entry] = s.entries()
    assert entry["status"] == "reserved"
    assert entry["epsilon"] == pytest.approx(dp_accounting_figure(entry), rel=1e-9)
    assert budget_summary(s.config, s.store, s.key)["composed_epsilon"] >= entry["epsilon"]
    assert not s.store.versions("train")
