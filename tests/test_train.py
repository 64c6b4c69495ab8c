"""Behaviour of the train stage (docs/training.md): DP-SGD, the ledger, resume.

Real Opacus, real encryption, real (tiny) training: a few hundred rows of the bundled
sample, one or two epochs. Clean artifacts are written directly through the store API
in the clean stage's schema, so these tests do not depend on collect/clean internals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from personanet.config import Config, load_config
from personanet.errors import BudgetExhaustedError, ConfigError, InputMissingError
from personanet.privacy.accounting import compute_epsilon
from personanet.privacy.ledger import Ledger, budget_summary
from personanet.stages.base import require_key
from personanet.stages.train import train as train_stage
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey
from personanet.training.devices import resolve_device
from tests.conftest import ROOT, SAMPLE, _dump_toml, write_config

# ----------------------------------------------------------------------- helpers


@cache
def _sample() -> pl.DataFrame:
    return pl.read_csv(SAMPLE, infer_schema=False)


def clean_schema(config: Config, raw: pl.DataFrame) -> pl.DataFrame:
    """`raw` text columns in the clean stage's output schema (see personanet/clean.py)."""
    exprs = []
    for col in config.columns.values():
        if col.role == "ignore" or col.name not in raw.columns:
            continue
        value = pl.col(col.name)
        if col.role == "identifier":
            exprs.append(value)
        elif col.kind == "numeric":
            exprs.append(value.cast(pl.Float64))
        elif col.role == "target":
            exprs.append(value)
        else:
            cats = list(col.categories or ())
            exprs.append(pl.when(value.is_null() | (value == "")).then(pl.lit("__missing__"))
                         .when(value.is_in(cats)).then(value).otherwise(pl.lit("__other__"))
                         .alias(col.name))
    return raw.select(exprs)


def sample_frames(config: Config, *, train_rows: int | None, test_rows: int | None
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    raw = _sample()
    train_part = raw.filter(pl.col("split") == "train")
    test_part = raw.filter(pl.col("split") == "test")
    if train_rows is not None:
        train_part = train_part.head(train_rows)
    if test_rows is not None:
        test_part = test_part.head(test_rows)
    return clean_schema(config, train_part), clean_schema(config, test_part)


def make_clean_artifact(store: ArtifactStore, key: MasterKey, train_frame: pl.DataFrame,
                        test_frame: pl.DataFrame) -> str:
    require_key(store, key)  # the store seals the manifest, as a stage's does
    with store.lock():
        writer = store.create("clean", fingerprint=f"test-{time.time_ns()}", inputs=[],
                              config={}, config_hash="test")
        for name, frame in (("train.parquet.enc", train_frame), ("test.parquet.enc", test_frame)):
            tables.write_encrypted_parquet(writer.path(name), frame, key)
            writer.add(name, rows=frame.height, encrypted=True, key_id=key.key_id)
        return writer.commit().version


def train(config: Config, store: ArtifactStore, key: MasterKey, **options):
    """The train stage on the newest clean artifact, named: the hand-made clean artifacts
    here belong to no config's chain (collect -> clean), which the stage follows by default.
    """
    if "input_version" not in options and store.versions("clean"):
        options["input_version"] = store.versions("clean")[-1].version
    return train_stage(config, store, key, **options)


def merged_toml(*parts: str) -> str:
    """TOML snippets merged table by table (later keys win)."""
    merged: dict = {}
    for part in parts:
        for section, table in tomllib.loads(part).items():
            if isinstance(table, dict):
                target = merged.setdefault(section, {})
                for name, value in table.items():
                    if isinstance(value, dict):
                        target.setdefault(name, {}).update(value)
                    else:
                        target[name] = value
            else:
                merged[section] = table
    return _dump_toml(merged) if merged else ""


@dataclasses.dataclass
class Setup:
    config: Config
    config_path: Path
    store: ArtifactStore
    key: MasterKey
    root: Path
    test_frame: pl.DataFrame


def setup(tmp_path: Path, *, overrides: str = "", train_rows: int = 400,
          test_rows: int = 100) -> Setup:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "persona.toml", SAMPLE,
                        overrides=merged_toml("[train]\nepochs = 2\nbatch_size = 64\n", overrides))
    config = load_config(path)
    root = tmp_path / "artifacts"
    store = ArtifactStore(root, config.dataset.name)
    key = MasterKey.generate()
    train_frame, test_frame = sample_frames(config, train_rows=train_rows, test_rows=test_rows)
    make_clean_artifact(store, key, train_frame, test_frame)
    return Setup(config, path, store, key, root, test_frame)


def privacy_of(result) -> dict:
    return json.loads((result.path / "privacy.json").read_text())


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture):
    """The "personanet" logger's records, even after the CLI stopped its propagation."""
    logger = logging.getLogger("personanet")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caplog's root handler would see each record twice
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


# ----------------------------------------------------------------------- outputs


def test_private_run_writes_model_encoder_privacy_and_loss_curve(tmp_path: Path) -> None:
    s = setup(tmp_path)
    result = train(s.config, s.store, s.key)
    names = {o["name"] for o in json.loads((result.path / "manifest.json").read_text())["outputs"]}
    assert names == {"model.safetensors", "model.json", "encoder.json", "privacy.json"}
    privacy = privacy_of(result)
    for field in ("accountant", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                  "max_grad_norm"):
        assert privacy[field] is not None
    assert privacy["private"] is True and privacy["accountant"] == "prv"
    figures = result.figures
    assert figures["private"] is True and figures["device"] == "cpu"
    assert len(figures["loss_curve"]) == 2 and all(v > 0 for v in figures["loss_curve"])
    assert figures["epsilon_curve"][-1] == pytest.approx(privacy["epsilon"], abs=1e-6)
    assert figures["grad_sample_mode"] == "ghost-bookkeeping"
    for field in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "epochs",
                  "accountant", "train_rows", "final_loss", "wall_seconds"):
        assert field in figures
    assert not (s.store.dataset_dir / "checkpoints" / figures["run_id"]).exists()


def test_epsilon_in_privacy_json_is_what_opacus_recomputes_and_within_target(
        tmp_path: Path) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    s = setup(tmp_path, overrides="[train]\nepsilon = 2.0\n")
    privacy = privacy_of(train(s.config, s.store, s.key))
    independent = PRVAccountant()
    for _ in range(privacy["steps"]):
        independent.step(noise_multiplier=privacy["noise_multiplier"],
                         sample_rate=privacy["sample_rate"])
    assert privacy["epsilon"] == pytest.approx(independent.get_epsilon(delta=privacy["delta"]),
                                               rel=1e-9)
    assert privacy["epsilon"] <= 2.0
    assert privacy["steps"] == 2 * int(1 / privacy["sample_rate"])
    # The looser RDP bound of the same run is above PRV's, as it should be.
    rdp = RDPAccountant()
    rdp.history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
    assert rdp.get_epsilon(delta=privacy["delta"]) >= privacy["epsilon"]


def test_rdp_takes_over_when_prv_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       log: pytest.LogCaptureFixture) -> None:
    from opacus.accountants import PRVAccountant

    def broken(self, delta, **kwargs):
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", broken)
    from personanet.privacy import accounting

    accounting._epsilon.cache_clear()  # answers cached by earlier tests would hide the failure
    s = setup(tmp_path)
    privacy = privacy_of(train(s.config, s.store, s.key))
    assert privacy["accountant"] == "rdp"
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(
        accountant="rdp", noise_multiplier=privacy["noise_multiplier"],
        sample_rate=privacy["sample_rate"], steps=privacy["steps"], delta=privacy["delta"]))
    assert privacy["epsilon"] <= 1.0
    assert "falling back to RDP" in log.text


def test_calibration_uses_the_steps_the_sampler_really_takes(tmp_path: Path) -> None:
    # 600 rows at batch 8 is q = 1/75: Opacus calibrates for int(3 / q) = 224 steps while
    # its sampler takes 3 * 75 = 225; the plan must cover the 225th step too.
    assert int(3 / (1 / 75)) == 224
    s = setup(tmp_path, overrides="[train]\nepochs = 3\nbatch_size = 8\nhidden_sizes = [8]\n",
              train_rows=600)
    privacy = privacy_of(train(s.config, s.store, s.key))
    assert privacy["steps"] == 225
    assert privacy["epsilon"] <= 1.0


def test_progress_reports_epoch_loss_and_epsilon(tmp_path: Path,
                                                 log: pytest.LogCaptureFixture) -> None:
    s = setup(tmp_path)
    train(s.config, s.store, s.key)
    records = [r for r in log.records if r.getMessage().startswith("epoch ")]
    assert len(records) == 2
    assert "loss" in records[0].getMessage() and "epsilon" in records[0].getMessage()
    assert set(records[1].fields) == {"epoch", "epochs", "loss", "epsilon", "delta"}


def test_model_loads_back_and_predicts_like_in_training(tmp_path: Path) -> None:
    from personanet.models import load_model, predict_frame

    s = setup(tmp_path, overrides="[train]\nepochs = 1\n")
    result = train(s.config, s.store, s.key)
    model, encoder = load_model(result.path)
    probabilities = predict_frame(model, encoder, s.test_frame)
    assert probabilities.shape == (s.test_frame.height, 2)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert encoder.target_classes == ["<=50K", ">50K"]


# ----------------------------------------------------------------------- budget


def test_second_forced_run_past_the_budget_exits_69_and_spends_nothing(tmp_path: Path) -> None:
    # One run at epsilon 1 (delta 1e-5) composes to about 0.81 at the budget's delta 1e-4,
    # two to about 1.14 by PRV (2 by addition): a budget of 1.1 takes one run, not two.
    s = setup(tmp_path, overrides="[budget]\nepsilon = 1.1\n[train]\nepsilon = 1.0\n")
    first = train(s.config, s.store, s.key)
    ledger_before = (s.store.dataset_dir / "budget.json").read_bytes()
    with pytest.raises(BudgetExhaustedError) as refused:
        train(s.config, s.store, s.key, force=True)
    assert refused.value.exit_code == 69
    message = str(refused.value)
    spent = budget_summary(s.config, s.store)["composed_epsilon"]
    assert spent < privacy_of(first)["epsilon"]  # tighter than the run's own figure
    assert "\n" not in message
    assert f"spent epsilon {spent:.4g} composed by prv" in message
    assert "this run would add" in message and f"remaining {1.1 - spent:.4g}" in message
    assert (s.store.dataset_dir / "budget.json").read_bytes() == ledger_before
    assert [a.version for a in s.store.versions("train")] == [first.version]
    assert not any((s.store.dataset_dir / "checkpoints").glob("*"))


def test_identical_run_is_reused_and_spends_nothing(tmp_path: Path) -> None:
    s = setup(tmp_path)
    first = train(s.config, s.store, s.key)
    again = train(s.config, s.store, s.key)
    assert again.reused and again.version == first.version
    assert len(Ledger(s.store).entries) == 1


def test_run_failing_before_its_first_step_gives_its_reservation_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import personanet.stages.train as train_module

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_module, "run_epochs", fail)
    s = setup(tmp_path)
    with pytest.raises(RuntimeError):
        train(s.config, s.store, s.key)
    summary = budget_summary(s.config, s.store)
    assert summary["entries"][0]["status"] == "released"
    assert summary["reserved_epsilon"] == 0 and summary["spent_epsilon"] == 0


def test_run_failing_after_steps_stays_counted(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import personanet.stages.train as train_module

    real_save = train_module.save_checkpoint

    def crash_after_first_epoch(run_dir, *, epoch, **kwargs):
        real_save(run_dir, epoch=epoch, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_epoch)
    s = setup(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(s.config, s.store, s.key)
    summary = budget_summary(s.config, s.store)
    assert summary["entries"][0]["status"] == "reserved"
    assert summary["reserved_epsilon"] == 1.0
    # The killed run counts its full plan (epsilon 1), composed at the budget's delta.
    assert summary["reserved_epsilon"] == pytest.approx(1.0)
    assert summary["remaining_epsilon"] == pytest.approx(
        s.config.budget.epsilon - summary["composed_epsilon"])
    assert 0 < summary["composed_epsilon"] <= 1.0 + 1e-9


# ----------------------------------------------------------------------- modes


def test_no_dp_says_private_false_everywhere_and_is_not_charged(tmp_path: Path) -> None:
    s = setup(tmp_path)
    result = train(s.config, s.store, s.key, no_dp=True)
    privacy = privacy_of(result)
    assert privacy["private"] is False and privacy["epsilon"] is None
    assert result.figures["private"] is False and result.figures["epsilon"] is None
    assert result.to_json()["private"] is False
    assert any("WITHOUT differential privacy" in w for w in result.warnings)
    summary = budget_summary(s.config, s.store)
    assert summary["non_private_runs"] == 1 and summary["spent_epsilon"] == 0
    assert summary["entries"][0]["private"] is False
    # A private run of the same data is a different artifact, not a reuse.
    private = train(s.config, s.store, s.key)
    assert not private.reused and privacy_of(private)["private"] is True


def test_lbfgs_is_refused_under_dp_and_allowed_without(tmp_path: Path) -> None:
    s = setup(tmp_path, overrides="[train]\noptimizer = \"lbfgs\"\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError) as refused:
        train(s.config, s.store, s.key)
    assert refused.value.exit_code == 78
    assert "per" in str(refused.value) and "--no-dp" in str(refused.value)
    assert not (s.store.dataset_dir / "budget.json").exists()
    result = train(s.config, s.store, s.key, no_dp=True)
    assert result.figures["optimizer"] == "lbfgs"
    assert np.isfinite(result.figures["final_loss"])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sgd_and_adamw_train_privately(tmp_path: Path, optimizer: str) -> None:
    s = setup(tmp_path, overrides=f"[train]\noptimizer = \"{optimizer}\"\nepochs = 1\n")
    result = train(s.config, s.store, s.key)
    assert result.figures["optimizer"] == optimizer and privacy_of(result)["epsilon"] <= 1.0


@pytest.mark.parametrize("grad_sample_mode, bookkeeping, expected", [
    ("hooks", True, "hooks"),
    ("ghost", False, "ghost"),
])
def test_opacus_clipping_modes_remain_available(tmp_path: Path, grad_sample_mode: str,
                                                bookkeeping: bool, expected: str) -> None:
    flag = "true" if bookkeeping else "false"
    s = setup(tmp_path, overrides=f"[train]\nepochs = 1\ngrad_sample_mode = \"{grad_sample_mode}\""
                                  f"\nbookkeeping = {flag}\n")
    result = train(s.config, s.store, s.key)
    assert result.figures["grad_sample_mode"] == expected
    assert privacy_of(result)["epsilon"] <= 1.0


@pytest.mark.parametrize("variant", [
    "categorical_encoding = \"embedding\"\nnorm = \"layernorm\"\ndropout = 0.1\n",
    "norm = \"groupnorm\"\nactivation = \"tempered_sigmoid\"\n",
])
def test_normalised_variants_train_with_bookkeeping(tmp_path: Path, variant: str) -> None:
    s = setup(tmp_path, overrides="[train]\nepochs = 1\n" + variant)
    result = train(s.config, s.store, s.key)
    assert result.figures["grad_sample_mode"] == "ghost-bookkeeping"


def test_multiclass_and_regression_targets(tmp_path: Path) -> None:
    multi = setup(tmp_path / "multi", overrides=(
        "[dataset]\ntarget = \"race\"\n[columns.race]\nrole = \"target\"\n"
        "[columns.income]\nrole = \"ignore\"\n[train]\nepochs = 1\n"))
    result = train(multi.config, multi.store, multi.key)
    assert json.loads((result.path / "model.json").read_text())["n_outputs"] == 5
    regression = setup(tmp_path / "reg", overrides=(
        "[dataset]\ntarget = \"age\"\n[columns.age]\nrole = \"target\"\n"
        "[columns.income]\nrole = \"ignore\"\n[train]\nepochs = 1\n"))
    result = train(regression.config, regression.store, regression.key)
    from personanet.models import load_model, predict_frame

    model, encoder = load_model(result.path)
    assert encoder.task == "regression"
    predicted = predict_frame(model, encoder, regression.test_frame)
    assert predicted.shape == (regression.test_frame.height,)
    assert ((predicted >= 17) & (predicted <= 90)).all()


def test_physical_batches_are_capped_without_changing_the_logical_steps(tmp_path: Path) -> None:
    s = setup(tmp_path, overrides="[train]\nepochs = 1\nmax_physical_batch_size = 16\n")
    capped = privacy_of(train(s.config, s.store, s.key))
    assert capped["steps"] == int(1 / capped["sample_rate"])
    assert capped["expected_batch_size"] > 16
    plain = train(s.config, s.store, s.key, no_dp=True)
    assert privacy_of(plain)["steps"] == capped["steps"]


def test_faster_gradient_sum_gives_opacus_numbers() -> None:
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from personanet.training.private import clone_instead_of_deepcopy

    def run(patched: bool) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD([weight], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
            expected_batch_size=4)
        if patched:
            clone_instead_of_deepcopy(optimizer)
        for skip, grad in ((True, [1.0, 2.0, 3.0]), (False, [0.5, 0.5, 0.5])):
            weight.grad = torch.tensor(grad)  # two physical batches, one logical step
            optimizer.signal_skip_step(do_skip=skip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return weight.detach().clone()

    assert torch.equal(run(patched=True), run(patched=False))


# ----------------------------------------------------------------------- devices


def test_absent_device_exits_78_and_lists_what_exists() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    absent = [d for d in ("cuda", "cuda:7", "mps")
              if not (d.startswith("cuda") and torch.cuda.device_count() > 7)
              and not (d == "cuda" and torch.cuda.is_available())
              and not (d == "mps" and torch.backends.mps.is_available())]
    for name in absent:
        with pytest.raises(ConfigError) as missing:
            resolve_device(name)
        assert missing.value.exit_code == 78 and "available: cpu" in str(missing.value)
    with pytest.raises(ConfigError):
        resolve_device("tpu")


def test_cuda_under_a_launcher_means_this_process_s_own_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import personanet.training.devices as devices

    four_gpus = ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    monkeypatch.setattr(devices, "available_devices", lambda: four_gpus)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "2")  # as torchrun sets it for its third process
    assert resolve_device("cuda") == torch.device("cuda:2")
    assert resolve_device("auto") == torch.device("cuda:2")
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # a named GPU stays named
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "7")
    with pytest.raises(ConfigError, match="LOCAL_RANK = 7"):
        resolve_device("cuda")


def test_device_used_is_in_the_manifest(tmp_path: Path) -> None:
    s = setup(tmp_path, overrides="[train]\nepochs = 1\n")
    result = train(s.config, s.store, s.key, device="cpu")
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["figures"]["device"] == "cpu"
    if not torch.cuda.is_available():  # even a reusable model does not hide an absent device
        with pytest.raises(ConfigError):
            train(s.config, s.store, s.key, device="cuda")


# ----------------------------------------------------------------------- kill, resume

KILLABLE = r"""
import os, sys, time
from pathlib import Path
import personanet.stages.train as t
from personanet.store.artifacts import ArtifactStore
from personanet.config import load_config
from personanet.store.keys import MasterKey

config = load_config(sys.argv[1])
store = ArtifactStore(sys.argv[2], config.dataset.name)
marker = Path(sys.argv[3])
real_save = t.save_checkpoint

def save_then_hang(run_dir, *, epoch, **kwargs):
    real_save(run_dir, epoch=epoch, **kwargs)
    if epoch == 1:
        marker.write_text(str(run_dir))
        time.sleep(600)

t.save_checkpoint = save_then_hang
t.train(config, store, MasterKey.from_base64(os.environ["PERSONANET_KEY"]),
        input_version=store.versions("clean")[-1].version)
"""


def _train_until_killed(s: Setup, tmp_path: Path) -> Path:
    marker = tmp_path / "first-checkpoint"
    env = {**os.environ, "PERSONANET_KEY": s.key.to_base64()}
    child = subprocess.Popen([sys.executable, "-c", KILLABLE, str(s.config_path), str(s.root),
                              str(marker)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"trainer exited early: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 120 s")
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stderr.close()
    return Path(marker.read_text())


@pytest.mark.slow
def test_sigkilled_run_stays_counted_and_resume_ends_like_an_uninterrupted_run(
        tmp_path: Path, cli) -> None:
    s = setup(tmp_path)
    run_dir = _train_until_killed(s, tmp_path)

    summary = budget_summary(s.config, s.store)
    assert [e["status"] for e in summary["entries"]] == ["reserved"]
    assert summary["reserved_epsilon"] == 1.0
    # The killed run counts its full plan (epsilon 1), composed at the budget's delta.
    assert summary["reserved_epsilon"] == pytest.approx(1.0)
    assert summary["remaining_epsilon"] == pytest.approx(
        s.config.budget.epsilon - summary["composed_epsilon"])
    assert 0 < summary["composed_epsilon"] <= 1.0 + 1e-9
    shown = cli("--config", s.config_path, "--artifacts", s.root, "--json", "budget", "show")
    assert shown.code == 0 and shown.json()["reserved_epsilon"] == 1.0

    # The checkpoint holds nothing that needs unpickling, and no DP randomness.
    checkpoint = next(run_dir.glob("epoch-*"))
    assert {p.name for p in checkpoint.iterdir()} == {
        "model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"}
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    from safetensors.torch import load_file

    assert set(load_file(str(checkpoint / "rng.safetensors"))) == {"torch"}

    resumed = train(s.config, s.store, s.key, resume=True)
    assert resumed.figures["resumed"] is True
    uninterrupted = train(s.config, s.store, s.key, force=True)
    a, b = privacy_of(resumed), privacy_of(uninterrupted)
    for field in ("steps", "epsilon", "noise_multiplier", "sample_rate", "accountant",
                  "accountant_history", "delta"):
        assert a[field] == b[field], field
    assert len(resumed.figures["loss_curve"]) == 2

    summary = budget_summary(s.config, s.store)
    assert [e["status"] for e in summary["entries"]] == ["settled", "settled"]
    assert summary["entries"][0]["run_id"] == a["run_id"]
    assert summary["spent_epsilon"] == pytest.approx(a["epsilon"] + b["epsilon"])
    assert summary["reserved_epsilon"] == 0
    assert not run_dir.exists()


def test_resume_with_nothing_to_resume_exits_66(tmp_path: Path) -> None:
    s = setup(tmp_path, overrides="[train]\nepochs = 1\n")
    with pytest.raises(InputMissingError) as nothing:
        train(s.config, s.store, s.key, resume=True)
    assert nothing.value.exit_code == 66


def test_resume_in_process_after_a_crash_continues_the_same_reservation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import personanet.stages.train as train_module

    real_save = train_module.save_checkpoint

    def crash_after_first_epoch(run_dir, *, epoch, **kwargs):
        real_save(run_dir, epoch=epoch, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_epoch)
    s = setup(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(s.config, s.store, s.key)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    result = train(s.config, s.store, s.key, resume=True)
    entries = Ledger(s.store).entries
    assert len(entries) == 1 and entries[0]["status"] == "settled"
    assert entries[0]["version"] == result.version
    privacy = privacy_of(result)
    assert privacy["steps"] == entries[0]["steps_planned"]
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(
        accountant="prv", noise_multiplier=entries[0]["noise_multiplier"],
        sample_rate=entries[0]["sample_rate"], steps=entries[0]["steps_planned"],
        delta=privacy["delta"]))


# ----------------------------------------------------------------------- accuracy


@pytest.mark.slow
def test_full_sample_accuracy_at_epsilon_1_beats_the_baselines(tmp_path: Path) -> None:
    """Standard UCI split, configs/persona.toml as shipped: epsilon 1, delta 1e-5."""
    from personanet.models import load_model, predict_frame

    torch.set_num_threads(2)
    config = load_config(ROOT / "configs" / "persona.toml")
    assert (config.train.epsilon, config.train.delta) == (1.0, 1e-5)
    store = ArtifactStore(tmp_path / "artifacts", config.dataset.name)
    key = MasterKey.generate()
    train_frame, test_frame = sample_frames(config, train_rows=None, test_rows=None)
    assert (train_frame.height, test_frame.height) == (32561, 16281)
    make_clean_artifact(store, key, train_frame, test_frame)
    result = train(config, store, key)
    model, encoder = load_model(result.path)
    predicted = predict_frame(model, encoder, test_frame).argmax(axis=1)
    accuracy = float((predicted == encoder.transform(test_frame).target).mean())
    print(f"test accuracy at epsilon {privacy_of(result)['epsilon']:.3f}: {accuracy:.4f}")
    assert privacy_of(result)["epsilon"] <= 1.0
    assert accuracy >= 0.845
