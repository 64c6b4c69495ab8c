"""The tune stage: a private hyperparameter search whose winner is a `train` artifact.

Read top to bottom, `tune` does:

    load the clean training people (never the test split) -> with
    ``tune.validation_fraction > 0``, hold out validation people by a hash of the person
    (at 0, the default, trials train and are scored on everyone) -> plan the search:
    its charge and the reference trial's noise (`personanet.privacy.selection`) ->
    reserve that charge in the ledger -> draw K trials (Papernot & Steinke's random K)
    -> run each (`stages.tune_trials`), keep the best noisy score -> save the winner as
    a model -> settle the charge

The whole search is one ledger entry (``mechanism: "repeat-and-select"``), composed
with the dataset's other runs by addition; it is reserved before the first trial and
settled at the same figure at the end, so a search killed half-way counts in full
(only one that stopped before any trial took a step gives it back, as `train` does).
Only the winner's model, settings and score leave the process in the clear; every
trial's settings and scores go into ``tuning.json.enc``, encrypted, for the key holder
(publishing them is not covered by the bound). docs/training.md, "Tuning", has the
privacy argument.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from personanet.config import Config
from personanet.errors import BadInputError, BudgetExhaustedError, ConfigError
from personanet.privacy import Ledger, selection
from personanet.privacy.record import PrivacyRecord
from personanet.stages import base as stage
from personanet.stages.base import StageResult, require_key
from personanet.stages.files import PRIVACY, TRAIN_TABLE, TUNING_REPORT
from personanet.stages.lineage import chain_input, tune_fingerprint
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore, new_version

if TYPE_CHECKING:
    import polars as pl

    from personanet.stages.tune_trials import Trial
    from personanet.store.artifacts import Artifact
    from personanet.store.keys import MasterKey

logger = logging.getLogger("personanet")

#: privacy.json's note on a tuned model
TUNED_NOTE = ("tuned: epsilon is the whole search's (repeat-and-select over a random number "
              "of DP-SGD trials, Papernot & Steinke 2022), which covers this model and its "
              "validation score; noise_multiplier, sample_rate and steps are this trial's")


def tune(config: Config, store: ArtifactStore, key: MasterKey, *,
         input_version: str | None = None, force: bool = False, device: str | None = None
         ) -> StageResult:
    """Search [tune]'s space privately; the best trial becomes a `train` artifact.

    Args:
        input_version: the clean version to read (default: the config's chain's).
        force: search again even when an identical search exists (spends budget again).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (default: ``train.device``).

    Raises:
        BudgetExhaustedError: (69) the search's charge does not fit the budget (nothing
            is spent), or a Poisson search drew no trial (its charge is spent).
        ConfigError: (78) a model or data shape the search does not support yet.
        InputMissingError: (66) no clean artifact.
    """
    require_key(store, key)
    with store.lock():
        return _tune_locked(config, store, key, input_version=input_version, force=force,
                            device=device)


def _tune_locked(config: Config, store: ArtifactStore, key: MasterKey, *,
                 input_version: str | None, force: bool, device: str | None) -> StageResult:
    from personanet.stages.tune_trials import draw_settings, plan_of, trial_config
    from personanet.training.devices import resolve_device
    from personanet.training.private import check_delta

    _check_supported(config)
    tune_cfg = config.tune
    torch_device = resolve_device(device or config.train.device)
    clean = (store.get("clean", input_version) if input_version
             else chain_input(config, store, "clean", reader="tune")[0])
    fp = tune_fingerprint(config, clean.version)
    reused = stage.find_reusable(store, "train", fp, force=force)
    if reused is not None:
        logger.info("reusing tuned model %s (identical input and config; no budget spent)",
                    reused.version)
        return reused
    ledger = Ledger(store, key)
    ledger.check(epsilon=tune_cfg.epsilon, delta=tune_cfg.delta,
                 budget_epsilon=config.budget.epsilon, budget_delta=config.budget.delta)

    # -- the training people, split into the trials' training and validation people
    started = time.perf_counter()
    fit, validation = _split(_read_training_frame(clean, key, config), config)
    check_delta(tune_cfg.delta, rows=fit.height + (0 if fit is validation else validation.height))

    # -- the plan: the reference trial ([train]'s settings, "auto" resolved) and the charge
    reference, _ = trial_config(config, {}, rows=fit.height)
    sample_rate, steps = plan_of(fit.height, int(reference.train.batch_size),
                                 int(reference.train.epochs))
    trials = selection.Trials.of(tune_cfg.trials, mean=tune_cfg.trials_mean,
                                 shape=tune_cfg.trials_shape)
    try:
        plan = selection.plan_search(
            target_epsilon=tune_cfg.epsilon, delta=tune_cfg.delta, sample_rate=sample_rate,
            steps=steps, trials=trials,
            composed_score_noise=(tune_cfg.score_noise_multiplier
                                  if tune_cfg.validation_fraction == 0 else None))
    except ValueError as exc:
        raise ConfigError(f"tune.epsilon = {tune_cfg.epsilon:g} cannot be reached: {exc}; "
                          "raise tune.epsilon or lower tune.trials_mean") from None
    logger.info("tune: a search of %s trials on average costs epsilon %.4g at delta %g "
                "(reference noise %.4g at sample rate %.4g, %d steps); %d training and %d "
                "validation people", f"{trials.mean:g}", plan.epsilon, plan.delta,
                plan.noise_multiplier, plan.sample_rate, plan.steps, fit.height,
                validation.height)

    # -- the charge, reserved before the first trial
    run_id = new_version()
    ledger.reserve(run_id=run_id, epsilon=plan.epsilon, delta=plan.delta,
                   budget_epsilon=config.budget.epsilon, budget_delta=config.budget.delta,
                   mechanism="repeat-and-select", accountant="repeat-and-select (rdp)",
                   search=plan.to_json(),
                   input=clean.version, fingerprint=fp)
    rng = random.SystemRandom()
    count = trials.draw(rng)
    best: Trial | None = None
    report: list[dict[str, Any]] = []
    trained: list[int] = []  # trials that reached their first step
    try:
        for number in range(1, count + 1):
            trial = _run_one(number, draw_settings(config, rng), config=config, fit=fit,
                             validation=validation, plan=plan, device=torch_device, rng=rng,
                             started=trained.append)
            report.append(trial.to_json())
            if best is None or trial.score > best.score:
                best = trial  # the loser's model is dropped here, never written
    except BaseException as exc:
        _stopped(exc, ledger, run_id, trained=bool(trained))
        raise

    wall = time.perf_counter() - started
    if best is None:
        ledger.settle(run_id, epsilon=plan.epsilon, delta=plan.delta, note="drew no trial")
        raise BudgetExhaustedError(
            "tune drew no trial (tune.trials = \"poisson\" does with probability "
            f"exp(-{trials.mean:g})): its charge, epsilon {plan.epsilon:.4g}, is spent and "
            "there is no model; tune.trials = \"truncated_negative_binomial\" always runs one")
    artifact = _commit(config, store, key, clean, fp=fp, run_id=run_id, plan=plan,
                       best=best, report=report, wall=wall, fit_rows=fit.height,
                       validation_rows=0 if plan.score_composed else validation.height)
    ledger.settle(run_id, epsilon=plan.epsilon, delta=plan.delta, version=artifact.version)
    logger.info("tune: kept the best trial (DP validation score %.4f); the search spent "
                "epsilon %.4g", best.score, plan.epsilon)
    return StageResult.of(artifact, reused=False)


def _run_one(number: int, settings: dict[str, Any], **kwargs: Any) -> Trial:
    from personanet.stages.tune_trials import run_trial

    try:
        return run_trial(number, settings, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"tune trial {number} ({json.dumps(settings)}): {exc}") from exc


def _check_supported(config: Config) -> None:
    """What the search does not cover yet, refused before anything is read (78)."""
    from personanet.models import DEFAULT_FAMILY

    family = getattr(config.train, "model", "auto")
    if family not in ("auto", DEFAULT_FAMILY) or any(
            c.kind == "image" for c in config.features()):
        raise ConfigError("tune searches the tabular model only; train.model = "
                          f"{family!r} (or an image column) is not supported yet")
    if config.clean.max_rows_per_unit != 1:
        raise ConfigError(
            f"tune needs clean.max_rows_per_unit = 1 (it is {config.clean.max_rows_per_unit}): "
            "its trials sample rows, and with one row per person that is sampling people")


def _read_training_frame(clean: Artifact, key: MasterKey, config: Config) -> pl.DataFrame:
    """The clean training people with a usable target; the test split is never opened."""
    import polars as pl

    from personanet.models.encoding import Encoder
    from personanet.training.defaults import settled

    frame = tables.read_artifact_table(clean, TRAIN_TABLE, key)
    if config.dataset.target not in frame.columns:
        raise BadInputError(f"clean artifact {clean.version} has no target column "
                            f"{config.dataset.target!r}")
    encoder = Encoder.from_config(_with_train(config, settled(config.train)))
    return frame.filter(pl.Series(encoder.transform(frame).labelled))


def _with_train(config: Config, train: Any) -> Config:
    import dataclasses

    return dataclasses.replace(config, train=train)


def _split(frame: pl.DataFrame, config: Config) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the trials' training people, the validation people), by a hash of the person;
    with ``validation_fraction = 0``, all of them twice (each trial's score is then
    charged with it, `selection.plan_search`)."""
    import polars as pl

    from personanet.cleaning.values import UNIT
    from personanet.stages.tune_trials import validation_mask

    # the person's pseudonym (clean writes it); the privacy unit column in older artifacts
    unit = UNIT if UNIT in frame.columns else config.dataset.privacy_unit
    if unit not in frame.columns:
        raise BadInputError(f"the clean training rows have no privacy unit column {unit!r}")
    if config.tune.validation_fraction == 0:
        return frame, frame
    held = pl.Series(validation_mask(frame[unit], config.tune.validation_fraction))
    fit, validation = frame.filter(~held), frame.filter(held)
    if fit.height < 2 or validation.height < 1:
        raise BadInputError(
            f"{frame.height} training people leave {fit.height} to train on and "
            f"{validation.height} to validate with at tune.validation_fraction = "
            f"{config.tune.validation_fraction:g}: too few to tune on")
    return fit, validation


def _stopped(exc: BaseException, ledger: Ledger, run_id: str, *, trained: bool) -> None:
    """A search that stops before any trial began training gives its charge back; later,
    it stays reserved in full (the ledger counts it)."""
    if not trained:
        entry = ledger.entry(run_id)
        if entry is not None and entry.get("status") == "reserved":
            ledger.release(run_id, reason=f"search stopped before any trial: "
                                          f"{type(exc).__name__}")
            return
    logger.error("tune stopped; its charge (epsilon %.4g) stays reserved in the ledger: a "
                 "search cannot be resumed", float((ledger.entry(run_id) or {})
                                                   .get("epsilon") or 0.0))


def _commit(config: Config, store: ArtifactStore, key: MasterKey, clean: Artifact, *,
            fp: str, run_id: str, plan: selection.SearchPlan, best: Trial,
            report: list[dict[str, Any]], wall: float, fit_rows: int,
            validation_rows: int) -> Artifact:
    """The winner as a `train` artifact: its model files, privacy.json (the search's
    epsilon), and the encrypted tuning report."""
    from personanet.store import crypto

    assert best.model is not None and best.family is not None and best.encoder is not None
    resolved = best.resolved
    privacy = PrivacyRecord(
        private=True, accountant="rdp", epsilon=plan.epsilon, delta=plan.delta,
        target_epsilon=plan.target_epsilon, noise_multiplier=best.noise_multiplier,
        sample_rate=best.sample_rate, steps=best.steps, epochs=int(resolved["epochs"]),
        max_grad_norm=float(resolved["max_grad_norm"]),
        batch_size=int(resolved["batch_size"]), auto_settings=resolved.get("auto", {}),
        expected_batch_size=best.sample_rate * fit_rows, poisson_sampling=True,
        grad_sample_mode=config.train.grad_sample_mode, secure_rng=False,
        privacy_unit=config.dataset.privacy_unit, run_id=run_id, accountant_history=[],
    ).to_json()
    privacy["tuning"] = {"note": TUNED_NOTE, "search": plan.to_json(),
                         "settings": best.settings, "resolved": resolved,
                         "validation_score": best.score}
    tuning_report = {
        "format": "personanet.tuning/1", "search": plan.to_json(), "trials_run": len(report),
        "trials": report, "winner": best.number,
        "why": _why(plan), "note": "for the key holder only: the bound covers releasing the "
        "winner's model, settings and score, not the other trials or how many ran"}
    figures = {
        "private": True, "tuned": True, "epsilon": plan.epsilon, "delta": plan.delta,
        "target_epsilon": plan.target_epsilon, "mechanism": "repeat-and-select",
        "noise_multiplier": best.noise_multiplier, "sample_rate": best.sample_rate,
        "steps": best.steps, "accountant": "rdp", "validation_score": best.score,
        "settings": resolved, "train_rows": fit_rows, "validation_rows": validation_rows,
        "run_id": run_id,
        "wall_seconds": round(wall, 3),
    }
    with store.lock():
        writer = store.create("train", fingerprint=fp, inputs=[clean.as_input()],
                              config={name: config.section(name)
                                      for name in ("dataset", "columns", "train", "tune")},
                              config_hash=config.section_hash("columns", "train", "dataset",
                                                              "tune"),
                              seed=config.train.seed)
        with writer:
            for name in best.family.save(best.model, best.spec, best.encoder, writer.tmp):
                writer.add(name)
            writer.write_json(PRIVACY, privacy)
            crypto.write_encrypted_file(writer.path(TUNING_REPORT),
                                        json.dumps(tuning_report, sort_keys=True).encode(), key)
            writer.add(TUNING_REPORT, encrypted=True, key_id=key.key_id)
            writer.figures = figures
            return writer.commit()


def _why(plan: selection.SearchPlan) -> str:
    """The charge in one paragraph, for the report."""
    trials = plan.trials
    score = (f"score (noise {plan.score_noise_multiplier:.4g} per person, counted on its own "
             "training people) is composed into that trial's cost."
             if plan.score_composed else
             f"validation score (noise {plan.score_noise_multiplier:.4g} per person, on other "
             "people) is covered by the same bound.")
    kind = ("Poisson" if trials.distribution == "poisson"
            else f"truncated negative binomial (shape {trials.shape:g})")
    return (f"A random number of trials K ({kind}, mean {trials.mean:g}) was run and only the "
            f"best released. Each trial's RDP is at most that of DP-SGD at noise "
            f"{plan.noise_multiplier:.4g}, sample rate {plan.sample_rate:.4g}, {plan.steps} "
            f"steps (its noise was raised where its batch or epochs differ), and its "
            f"{score} Papernot & Steinke's repeat-and-select bound "
            f"(dp-accounting's RepeatAndSelectDpEvent, RDP orders below "
            f"{selection.MAX_ORDER}) gives epsilon {plan.epsilon:.4g} at delta "
            f"{plan.delta:g} for the whole search, whatever K turned out to be.")
