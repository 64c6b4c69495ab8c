"""The train stage: a clean artifact in, a model trained with DP-SGD out.

Read top to bottom, `train` does:

    load the clean artifact -> resolve the "auto" settings -> encode with the public
    schema -> build the network (its model family) -> make it private (Opacus)
    -> reserve the budget -> loop with progress and a checkpoint per epoch
    -> save the model -> settle the budget

Each step's machinery lives in `personanet.training`: `devices`, `private` (the DP
set-up), `loop`, `checkpoints`, `defaults` (the "auto" settings); networks are reached
through `personanet.models`' family registry. Privacy, in short (docs/training.md has
the long form):

- Poisson sampling (Opacus' `DPDataLoader`) with rate ``q = 1 / ceil(rows /
  batch_size)``; noise calibrated (`personanet.privacy.calibrate_noise`, bounded in
  time) to reach ``train.epsilon`` at ``train.delta`` in the exact number of steps the
  sampler will take; per-example clipping at ``train.max_grad_norm``; the PRV
  accountant, or RDP when PRV fails or would take too long.
- The noise and the batch sampling draw from generators seeded by the operating
  system, never from ``train.seed`` and never written to a checkpoint: anyone
  who could replay the noise could subtract it.
- The ledger (`personanet.privacy.Ledger`) reserves the budget before the first
  step and settles it at the end; a killed run stays counted, and `resume=True`
  continues it under the same reservation to the same planned epsilon.

Nothing is unpickled: weights are safetensors, the rest JSON, and optimizer state
is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.config import AUTO, Config
from personanet.errors import BadInputError, BudgetExhaustedError, ConfigError, InternalError
from personanet.models import family_name_for, get_family, state_dict_for_saving
from personanet.privacy import Ledger
from personanet.privacy.calibration_table import TABLE_NAME as CALIBRATION_TABLE
from personanet.privacy.calibration_table import calibration_table
from personanet.privacy.record import NON_PRIVATE_NOTE, PrivacyRecord
from personanet.stages.base import StageResult, require_key
from personanet.stages.files import PRIVACY, TRAIN_TABLE
from personanet.stages.lineage import chain_input, train_fingerprint
from personanet.stages.train_start import start
from personanet.stages.units import unit_ids
from personanet.stages.validation import ValidationCurve, split_validation, validation_fraction
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore, new_version
from personanet.training.augment import augmentation_for
from personanet.training.checkpoints import RunFolders, save_checkpoint
from personanet.training.defaults import describe_auto, resolve_train_config, small_data_warnings
from personanet.training.devices import resolve_device
from personanet.training.distributed import (
    World,
    barrier,
    broadcast_json,
    check_replicas,
    guarded,
    joined,
    share,
)
from personanet.training.loop import TrainHistory, make_optimizer, run_epochs
from personanet.training.private import TrainingRun, check_delta, make_plain, make_private
from personanet.training.units import UnitPlan, unit_plan

if TYPE_CHECKING:
    import polars as pl
    import torch

    from personanet.store.artifacts import Artifact
    from personanet.store.keys import MasterKey

logger = logging.getLogger("personanet")


# --------------------------------------------------------------------- the stage


def train(config: Config, store: ArtifactStore, key: MasterKey, *,
          input_version: str | None = None, force: bool = False, no_dp: bool = False,
          device: str | None = None, resume: bool = False) -> StageResult:
    """Train a network on a clean artifact; DP-SGD unless `no_dp`.

    Args:
        input_version: the clean version to read (default: the config's chain's, never
            merely the newest).
        force: train again even when an identical model exists (a private run then
            spends budget again).
        no_dp: train the same network without privacy, for comparison only; the
            artifact says ``private: false`` and no epsilon is charged.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (default: ``train.device``).
        resume: continue the newest interrupted run of this input and config from its
            last checkpoint, under its existing budget reservation.

    Raises:
        BudgetExhaustedError: (exit 69) the run would exceed ``budget.epsilon``/``delta``;
            nothing is spent.
        ConfigError: (exit 78) an absent device, L-BFGS under DP, epsilon too small.
        InputMissingError: (exit 66) no clean artifact, or nothing to resume.
    """
    require_key(store, key)  # a root holds one master key: refuse another before any write
    # Under torchrun, one process of several (training/distributed.py): rank 0 alone
    # writes, the others read and train.
    world = World.from_env()
    # One writer per artifact root for the whole stage: a second identical command waits
    # (then reuses the first one's artifact) instead of redoing the work, which for
    # train would charge the privacy budget twice.
    # Noise calibrations are remembered under the root for later processes (public
    # numbers, re-checked on use: personanet/privacy/calibration_table.py).
    with (store.lock() if world is None or world.main else contextlib.nullcontext(),
          joined(world, device or config.train.device),
          calibration_table(store.root / CALIBRATION_TABLE,
                            writable=world is None or world.main)):
        return _train_locked(config, store, key, input_version=input_version, force=force,
                              no_dp=no_dp, device=device, resume=resume, world=world)



def _train_locked(config: Config, store: ArtifactStore, key: MasterKey, *,
                  input_version: str | None = None, force: bool = False, no_dp: bool = False,
                  device: str | None = None, resume: bool = False,
                  world: World | None = None) -> StageResult:
    """The stage itself, under the root's lock (held by rank 0 of several processes)."""
    import torch

    main = world is None or world.main
    private = not no_dp
    cfg = config.train
    _check_train_config(config, private=private)
    torch_device = resolve_device(device or cfg.device)  # an absent device fails first (78)
    clean = (store.get("clean", input_version) if input_version
             else chain_input(config, store, "clean", reader="train")[0])
    fp = train_fingerprint(config, clean.version, private=private)
    run_folders = RunFolders(store)
    ledger = Ledger(store, key)  # sealed under the master key: an edited ledger is refused

    # -- reuse an identical model, or find the interrupted run to continue (rank 0 decides)
    checkpoint, reused = start(world, config, store, ledger, run_folders, fp, resume=resume,
                               force=force, private=private)
    if reused is not None:
        return reused

    # -- load the clean rows, resolve "auto" settings, encode with the public schema
    started = time.perf_counter()
    frame = _read_training_frame(clean, key, config)
    # The family (tabular MLP, image cnn) reads the config; some people are held out to
    # report loss and accuracy per epoch, never trained on (stages/validation.py)
    family = get_family(family_name_for(config))
    held_fraction = validation_fraction(config, family.name)
    frame, held_out = split_validation(frame, seed=cfg.seed, fraction=held_fraction)
    # Whom sampling and clipping protect: people (all their rows) or rows (training/units.py)
    plan = unit_plan(unit_ids(frame, config), level=cfg.privacy_unit_level,
                     max_rows_per_unit=config.clean.max_rows_per_unit)
    # "auto" settings are chosen from how many people there are to learn from, known only
    # now; `run_config` holds the numbers this run uses, `config` what the user wrote (the
    # fingerprint and the manifest keep "auto": the same rows always resolve the same way).
    cfg, chosen = (family.resolve_auto or resolve_train_config)(cfg,
                                                                n_train_rows=plan.sampled)
    run_config = dataclasses.replace(config, train=cfg)
    if chosen:
        logger.info(describe_auto(chosen, epsilon=cfg.epsilon))
    encoder = family.encoder(run_config)
    validation = ValidationCurve.of(encoder.transform(held_out) if held_out.height else None,
                                    fraction=held_fraction, device=torch_device)
    rows = encoder.transform(frame)
    del frame
    if private:
        check_delta(cfg.delta, rows=plan.sampled)

    # -- build the network; the initial weights are public: seeded from the config
    # (a tabular model.json names no family, as before families existed)
    torch.manual_seed(cfg.seed)
    spec = family.spec_for(encoder, cfg)
    model = family.build(spec).to(torch_device)
    loss_fn = family.loss(encoder.task, reduction="none")
    optimizer = make_optimizer(model, cfg)
    loader = plan.loader(rows, batch_size=cfg.batch_size, device=torch_device,
                         private=private, seed=cfg.seed)

    # -- make it private: Opacus' optimizer, Poisson sampler and accountant
    if private:
        run = make_private(model, optimizer, loader, run_config, family=family,
                           task=encoder.task, device=torch_device, checkpoint=checkpoint,
                           rows_per_unit=plan.physical_rows)
    else:
        run = make_plain(model, optimizer, loader, run_config, family=family)
    run.augment = augmentation_for(cfg, private=private)  # images only (training/augment.py)
    plan_warnings = small_data_warnings(sample_rate=run.sample_rate,
                                        planned_steps=run.planned_steps,
                                        rows=plan.sampled) if private else []
    for warning in plan_warnings:
        logger.warning(warning)

    # -- reserve the budget (or take a resumed run's reservation and state back)
    history = TrainHistory()
    if checkpoint is not None:
        run_id = checkpoint.run_id
        # locked by this process until it ends (by rank 0 for all of a run's processes)
        run_dir = run_folders.open(run_id) if main else run_folders.root / run_id
        checkpoint.restore(run, history, device=torch_device)
    else:
        def reserve() -> str:
            run_id = new_version()
            if private:  # the budget is taken before the first step, or the run is refused
                # the row epsilon, or a row-level run's per-person bound (training/units.py)
                charge = plan.charge(run)
                try:
                    ledger.reserve(run_id=run_id, epsilon=charge.epsilon, delta=charge.delta,
                                   budget_epsilon=config.budget.epsilon,
                                   budget_delta=config.budget.delta, **charge.details,
                                   steps=0, input=clean.version, fingerprint=fp,
                                   grad_sample_mode=run.grad_sample_mode)
                except BudgetExhaustedError as exc:
                    raise charge.refused(exc) from None
            return run_id

        barrier(world, "the start")  # no budget is taken while a rank is still failing
        run_id = share(world, reserve)
        run_dir = run_folders.root / run_id

    def save(epoch: int) -> None:
        if not main:  # rank 0 holds the same weights and writes them
            return
        if validation is not None:  # logged, and kept for the manifest
            validation.measure(run.model, family, loss_fn, epoch=epoch)
        save_checkpoint(run_dir, epoch=epoch, run_id=run_id, fingerprint=fp, run=run,
                        history=history, spec=spec, clean_version=clean.version,
                        config=config,
                        wall_seconds=history.wall_before + time.perf_counter() - started)

    # -- the loop, a checkpoint after every epoch
    try:
        if checkpoint is None and main:
            run_folders.open(run_id)
        guarded("training", lambda: run_epochs(run, loss_fn, history, cfg.epochs, save=save))
        if world is not None:  # every rank must hold rank 0's weights, to the bit
            check_replicas(world, state_dict_for_saving(model))
    except BaseException as exc:
        if main:  # the ledger and the run folder are rank 0's
            _stopped(exc, ledger, run_id, run_dir, run, private=private)
            run_folders.release(run_id)
        raise

    if not main:  # rank 0 commits and settles; this rank returns what it committed
        return StageResult.of(store.get("train", broadcast_json(world)), reused=False)
    # -- save the model, then settle the budget at what the run spent
    wall = history.wall_before + time.perf_counter() - started
    figures, privacy = _figures(run, history, run_config, rows=len(rows),
                                device=torch_device, wall_seconds=wall, run_id=run_id,
                                resumed=checkpoint is not None, auto=chosen, plan=plan)
    if world is not None:  # training processes (one process: no key, as before)
        figures["processes"] = world.size
    if validation is not None:  # sealed in the manifest only (stages/validation.py)
        figures["validation"] = validation.to_json()
    with store.lock():
        writer = store.create("train", fingerprint=fp, inputs=[clean.as_input()],
                              config={name: config.section(name)
                                      for name in ("dataset", "columns", "train")},
                              config_hash=config.section_hash("columns", "train", "dataset"),
                              seed=cfg.seed)
        with writer:
            for name in family.save(model, spec, encoder, writer.tmp):
                writer.add(name)
            writer.write_json(PRIVACY, privacy)
            writer.figures = figures
            artifact = writer.commit()
        if private:
            ledger.settle(run_id, **plan.settled(privacy), version=artifact.version,
                          steps=run.steps)
        else:
            ledger.record_non_private(run_id=run_id, version=artifact.version,
                                      input=clean.version, fingerprint=fp, steps=run.steps)
    run_folders.remove(run_id)
    if world is not None:
        broadcast_json(world, artifact.version)
    warnings_out = plan_warnings if private else [
        "trained WITHOUT differential privacy (--no-dp): for comparison only; this model "
        "carries no privacy guarantee"]
    return StageResult.of(artifact, reused=False, warnings=warnings_out)


# --------------------------------------------------------------------- data


def _check_train_config(config: Config, *, private: bool) -> None:
    cfg = config.train
    if private and cfg.optimizer == "lbfgs":
        raise ConfigError(
            "train.optimizer = \"lbfgs\" cannot train under DP: L-BFGS evaluates the loss and "
            "gradient many times per step (line search) and builds curvature from exact gradient "
            "differences, while DP-SGD releases one clipped, noised gradient per step and "
            "accounts for exactly that; use adam, adamw or sgd, or --no-dp for a non-private "
            "comparison"
        )
    if private and cfg.norm == "batchnorm":
        raise ConfigError(
            "train.norm = \"batchnorm\" cannot train under DP: BatchNorm normalises each example "
            "by statistics of the whole batch, so an example's gradient depends on the others "
            "and clipping no longer bounds one person's influence; use \"groupnorm\" or "
            "\"none\" (or --no-dp for a non-private comparison)")
    if cfg.numeric_bins != AUTO and not 0 <= cfg.numeric_bins <= 1024:
        raise ConfigError("train.numeric_bins must be between 0 and 1024")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError("train.momentum must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise ConfigError("train.weight_decay must be >= 0")


def _read_training_frame(clean: Artifact, key: MasterKey, config: Config) -> pl.DataFrame:
    """The clean training rows that have a usable target (one per person)."""
    import polars as pl

    frame = tables.read_artifact_table(clean, TRAIN_TABLE, key)
    target = config.dataset.target
    if target not in frame.columns:
        raise BadInputError(f"clean artifact {clean.version} has no target column {target!r}")
    # The target's encoding does not depend on any "auto" setting, so any encoder tells
    # which rows are labelled.
    labelled = get_family(family_name_for(config)).encoder(config).transform(frame).labelled
    dropped = int((~labelled).sum())
    if dropped:
        logger.warning("%d training rows have no usable target and are left out", dropped)
    frame = frame.filter(pl.Series(labelled))
    if frame.height == 0:
        why = (f"none of its {dropped} train rows has a usable target" if dropped else
               "the train split is empty: check clean.split_column / clean.test_fraction")
        raise BadInputError(f"clean artifact {clean.version} has no labelled training rows "
                            f"({why}); nothing was charged to the budget")
    return frame


# --------------------------------------------------------------------- ends


def _stopped(exc: BaseException, ledger: Ledger, run_id: str, run_dir: Path, run: TrainingRun,
             *, private: bool) -> None:
    """A run that stops before its first step gives its reservation back; later, never."""
    if not private:
        if not any(run_dir.glob("epoch-*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        return
    entry = ledger.entry(run_id)
    if entry is None or entry.get("status") != "reserved":
        return
    if run.steps == 0 and not any(run_dir.glob("epoch-*")):
        ledger.release(run_id, reason=f"stopped before its first step: {type(exc).__name__}")
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    ledger.update(run_id, steps=run.steps)
    logger.error("training stopped after %d of %d steps; its budget (epsilon %.3g) stays "
                 "reserved: `personanet train --resume` continues it", run.steps,
                 run.planned_steps, float(entry["epsilon"]))


def _figures(run: TrainingRun, history: TrainHistory, config: Config, *, rows: int,
             device: torch.device, wall_seconds: float, run_id: str, resumed: bool,
             auto: dict[str, Any], plan: UnitPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's figures and privacy.json, from the run's resolved `config`; `auto`
    holds what `personanet.training.defaults` chose for "auto" keys, `plan` whom it sampled."""
    cfg = config.train
    if run.private:
        if run.steps != run.planned_steps:
            raise InternalError(f"run took {run.steps} steps, planned "
                                 f"{run.planned_steps}")
        epsilon = run.epsilon(final=True)
        assert epsilon is not None
        steps = sum(int(n) for _, _, n in run.accountant_history)
        privacy = PrivacyRecord(
            private=True, accountant=run.accountant, epsilon=epsilon,
            delta=run.delta, target_epsilon=cfg.epsilon,
            noise_multiplier=run.noise_multiplier, sample_rate=run.sample_rate,
            steps=steps, epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm,
            batch_size=cfg.batch_size, auto_settings=auto,
            expected_batch_size=run.expected_batch_size, poisson_sampling=True,
            grad_sample_mode=run.grad_sample_mode, secure_rng=False,
            privacy_unit=config.dataset.privacy_unit, run_id=run_id,
            accountant_history=list(run.accountant_history),
            unit_level=plan.record(run),
        ).to_json()
    else:
        privacy = PrivacyRecord(
            private=False, accountant=None, epsilon=None, delta=None, target_epsilon=None,
            noise_multiplier=None, sample_rate=run.sample_rate, steps=run.steps,
            epochs=cfg.epochs, max_grad_norm=None, batch_size=cfg.batch_size,
            auto_settings=auto, expected_batch_size=run.expected_batch_size,
            poisson_sampling=True, grad_sample_mode=None, run_id=run_id,
            note=NON_PRIVATE_NOTE,
        ).to_json()
    figures = {
        "private": run.private, "epsilon": privacy["epsilon"], "delta": privacy["delta"],
        "target_epsilon": privacy["target_epsilon"],
        "noise_multiplier": privacy["noise_multiplier"], "sample_rate": run.sample_rate,
        "steps": privacy["steps"], "epochs": cfg.epochs, "accountant": privacy["accountant"],
        "max_grad_norm": privacy["max_grad_norm"], "device": str(device), "train_rows": rows,
        "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
        "learning_rate": cfg.learning_rate, "hidden_sizes": list(cfg.hidden_sizes),
        "numeric_bins": cfg.numeric_bins, "auto_settings": auto,
        "final_loss": history.loss_curve[-1] if history.loss_curve else None,
        "loss_curve": history.loss_curve, "epsilon_curve": history.epsilon_curve,
        "grad_sample_mode": privacy["grad_sample_mode"],
        "wall_seconds": round(wall_seconds, 3), "train_seconds": round(history.train_seconds, 3),
        "resumed": resumed, "run_id": run_id,
    }
    if privacy.get("unit_level"):  # k > 1 only: a k = 1 manifest stays as it was
        figures["unit_level"] = privacy["unit_level"]
    return figures, privacy
