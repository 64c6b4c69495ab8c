"""The train stage: a clean artifact in, a PersonaNet model trained with DP-SGD out.

Read top to bottom, `train` does:

    load the clean artifact -> encode with the public schema -> build PersonaNet
    -> make it private (Opacus) -> reserve the budget -> loop with progress and a
    checkpoint per epoch -> save the model -> settle the budget

Privacy, in short (docs/training.md has the long form):

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

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet import ui
from personanet.config import AUTO, Config
from personanet.errors import (
    BadInputError,
    ConfigError,
    InputMissingError,
    InternalError,
    LockBusyError,
)
from personanet.models.encoding import EncodedBatch, Encoder
from personanet.privacy import (
    AccountantError,
    BookkeepingClipper,
    Ledger,
    calibrate_noise,
    compute_epsilon,
    epsilon_of_history,
    noise_for_epsilon,
)
from personanet.stages import base as stage
from personanet.stages.base import StageResult, require_key
from personanet.stages.lineage import chain_input, train_fingerprint
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore, fsync_path, new_version, utc_now
from personanet.training.defaults import describe_auto, resolve_train_config, small_data_warnings

if TYPE_CHECKING:
    import polars as pl
    import torch

    from personanet.models.tabular import PersonaNet
    from personanet.store.artifacts import Artifact
    from personanet.store.crypto import MasterKey

logger = logging.getLogger("personanet")

TRAIN_FILE = "train.parquet.enc"
PRIVACY_FILE = "privacy.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "personanet.checkpoint/1"
PRIVACY_FORMAT = "personanet.privacy/1"


# --------------------------------------------------------------------- the stage


def train(config: Config, store: ArtifactStore, key: MasterKey, *,
          input_version: str | None = None, force: bool = False, no_dp: bool = False,
          device: str | None = None, resume: bool = False) -> StageResult:
    """Train PersonaNet on a clean artifact; DP-SGD unless `no_dp`.

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
    # One writer per artifact root for the whole stage: a second identical command waits
    # (then reuses the first one's artifact) instead of redoing the work, which for
    # train would charge the privacy budget twice.
    with store.lock():
        return _train_locked(config, store, key, input_version=input_version, force=force,
                              no_dp=no_dp, device=device, resume=resume)


def _train_locked(config: Config, store: ArtifactStore, key: MasterKey, *,
                  input_version: str | None = None, force: bool = False, no_dp: bool = False,
                  device: str | None = None, resume: bool = False) -> StageResult:
    """The stage itself, under the root's lock."""
    import torch

    private = not no_dp
    cfg = config.train
    _check_train_config(config, private=private)
    torch_device = resolve_device(device or cfg.device)  # an absent device fails first (78)
    clean = (store.get("clean", input_version) if input_version
             else chain_input(config, store, "clean", reader="train")[0])
    fp = train_fingerprint(config, clean.version, private=private)
    runs = RunFolders(store)
    ledger = Ledger(store, key)  # sealed under the master key: an edited ledger is refused

    checkpoint: Checkpoint | None = None
    if resume:
        checkpoint = runs.resumable(fp, ledger)
        logger.info("resuming run %s from epoch %d/%d", checkpoint.run_id, checkpoint.epoch,
                    checkpoint.state["epochs"])
    else:
        reused = stage.find_reusable(store, "train", fp, force=force)
        if reused is not None:
            logger.info("reusing train artifact %s (identical input and config; no budget "
                        "spent)", reused.version)
            return _with_plan_warnings(reused)
        for waiting in runs.interrupted(fp, ledger):
            logger.warning("run %s was interrupted and keeps its budget reserved; "
                           "`personanet train --resume` continues it", waiting)
        if private:  # fail fast, before reading any data; `reserve` checks again under lock
            ledger.check(epsilon=cfg.epsilon, delta=cfg.delta,
                         budget_epsilon=config.budget.epsilon, budget_delta=config.budget.delta)

    started = time.perf_counter()
    frame = _read_training_frame(clean, key, config)
    # "auto" settings are chosen from how many people there are to learn from, known only
    # now; `run_config` holds the numbers this run uses, `config` what the user wrote (the
    # fingerprint and the manifest keep "auto": the same rows always resolve the same way).
    cfg, chosen = resolve_train_config(cfg, n_train_rows=frame.height)
    run_config = dataclasses.replace(config, train=cfg)
    if chosen:
        logger.info(describe_auto(chosen, epsilon=cfg.epsilon))
    encoder = Encoder.from_config(run_config)
    rows = encoder.transform(frame)
    del frame
    if private:
        _check_delta(cfg.delta, rows=len(rows))

    torch.manual_seed(cfg.seed)  # the initial weights are public: seeded from the config
    from personanet.models.tabular import PersonaLoss, PersonaNet

    spec = PersonaNet.spec_for(encoder, cfg)
    model = PersonaNet.from_spec(spec).to(torch_device)
    loss_fn = PersonaLoss(encoder.task, reduction="none")
    optimizer = _make_optimizer(model, cfg)
    loader = _make_loader(rows, batch_size=cfg.batch_size, device=torch_device, private=private,
                          seed=cfg.seed)

    if private:
        session: Session = _make_private(model, optimizer, loader, run_config, encoder.task,
                                         device=torch_device, checkpoint=checkpoint)
    else:
        session = _make_plain(model, optimizer, loader, run_config)
    plan_warnings = small_data_warnings(sample_rate=session.sample_rate,
                                        planned_steps=session.planned_steps,
                                        rows=len(rows)) if private else []
    for warning in plan_warnings:
        logger.warning(warning)

    history = TrainHistory()
    if checkpoint is not None:
        run_id = checkpoint.run_id
        run_dir = runs.open(run_id)  # locked by this process until it ends
        checkpoint.restore(model, session, history, device=torch_device)
    else:
        run_id = new_version()
        if private:  # the budget is taken before the first step, or the run is refused
            ledger.reserve(run_id=run_id, epsilon=cfg.epsilon, delta=cfg.delta,
                           budget_epsilon=config.budget.epsilon,
                           budget_delta=config.budget.delta, accountant=session.accountant,
                           noise_multiplier=session.noise_multiplier,
                           sample_rate=session.sample_rate, steps_planned=session.planned_steps,
                           steps=0, input=clean.version, fingerprint=fp,
                           grad_sample_mode=session.grad_sample_mode)
        run_dir = runs.root / run_id

    def save(epoch: int) -> None:
        _save_checkpoint(run_dir, epoch=epoch, run_id=run_id, fingerprint=fp, model=model,
                         session=session, history=history, spec=spec,
                         clean_version=clean.version, config=config,
                         wall_seconds=history.wall_before + time.perf_counter() - started)

    try:
        if checkpoint is None:
            runs.open(run_id)
        _run_epochs(model, session, loss_fn, history, cfg.epochs, save=save)
    except BaseException as exc:
        _stopped(exc, ledger, run_id, run_dir, session, private=private)
        runs.release(run_id)
        raise

    wall = history.wall_before + time.perf_counter() - started
    figures, privacy = _figures(session, history, run_config, rows=len(rows),
                                device=torch_device, wall_seconds=wall, run_id=run_id,
                                resumed=checkpoint is not None, auto=chosen)
    with store.lock():
        writer = store.create("train", fingerprint=fp, inputs=[clean.as_input()],
                              config={name: config.section(name)
                                      for name in ("dataset", "columns", "train")},
                              config_hash=config.section_hash("columns", "train", "dataset"),
                              seed=cfg.seed)
        with writer:
            from personanet.models.tabular import save_model

            for name in save_model(model, spec, encoder, writer.tmp):
                writer.add(name)
            writer.write_json(PRIVACY_FILE, privacy)
            writer.figures = figures
            artifact = writer.commit()
        if private:
            ledger.settle(run_id, epsilon=privacy["epsilon"], delta=privacy["delta"],
                          version=artifact.version, steps=session.steps)
        else:
            ledger.record_non_private(run_id=run_id, version=artifact.version,
                                      input=clean.version, fingerprint=fp, steps=session.steps)
    runs.remove(run_id)
    warnings_out = plan_warnings if private else [
        "trained WITHOUT differential privacy (--no-dp): for comparison only; this model "
        "carries no privacy guarantee"]
    return StageResult.of(artifact, reused=False, warnings=warnings_out)


def _with_plan_warnings(reused: StageResult) -> StageResult:
    """A reused model still carries the warnings of the plan it was trained with."""
    figures = reused.figures
    if not figures.get("private"):
        return reused
    found = small_data_warnings(sample_rate=float(figures["sample_rate"]),
                                planned_steps=int(figures["steps"]),
                                rows=int(figures["train_rows"]))
    for warning in found:
        logger.warning(warning)
    return dataclasses.replace(reused, warnings=[*reused.warnings, *found])


# --------------------------------------------------------------------- devices


def available_devices() -> list[str]:
    """Devices torch can use here, in the order `auto` prefers them last to first."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ConfigError: (exit 78) the device is unknown or absent; the message lists the
            devices that exist.
    """
    import torch

    requested = (name or "auto").strip().lower()
    found = available_devices()
    if requested == "auto":
        if "cuda" in found:
            return torch.device("cuda")
        if "mps" in found:
            return torch.device("mps")
        return torch.device("cpu")
    valid = requested in ("cpu", "cuda", "mps") or (
        requested.startswith("cuda:") and requested[5:].isdigit())
    if not valid:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps "
                          f"(available here: {', '.join(found)})")
    if requested not in found:
        raise ConfigError(f"device {name!r} is not available on this machine; available: "
                          f"{', '.join(found)} (or use --device auto)")
    return torch.device(requested)


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
    if cfg.numeric_bins != AUTO and not 0 <= cfg.numeric_bins <= 1024:
        raise ConfigError("train.numeric_bins must be between 0 and 1024")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError("train.momentum must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise ConfigError("train.weight_decay must be >= 0")


def _read_training_frame(clean: Artifact, key: MasterKey, config: Config) -> pl.DataFrame:
    """The clean training rows that have a usable target (one per person)."""
    import polars as pl

    frame = tables.read_artifact_table(clean, TRAIN_FILE, key)
    target = config.dataset.target
    if target not in frame.columns:
        raise BadInputError(f"clean artifact {clean.version} has no target column {target!r}")
    # The target's encoding does not depend on any "auto" setting, so any encoder tells
    # which rows are labelled.
    labelled = Encoder.from_config(config).transform(frame).labelled
    dropped = int((~labelled).sum())
    if dropped:
        logger.warning("%d training rows have no usable target and are left out", dropped)
    frame = frame.filter(pl.Series(labelled))
    if frame.height == 0:
        raise BadInputError(f"clean artifact {clean.version} has no labelled training rows")
    return frame


class _Rows:
    """Tensors indexed a batch at a time (``__getitems__``): no per-row Python work."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        import torch

        index = torch.as_tensor(indices, dtype=torch.long, device=self.tensors[0].device)
        return tuple(t.index_select(0, index) for t in self.tensors)


def _whole_batch(batch: Any) -> Any:
    return batch


def _make_loader(rows: EncodedBatch, *, batch_size: int, device: torch.device, private: bool,
                 seed: int) -> torch.utils.data.DataLoader:
    import torch
    from torch.utils.data import DataLoader

    categorical, numeric, target = rows.tensors(device)
    # Which people are in a batch must stay secret for sampling to amplify privacy, so
    # a private run samples from the OS's entropy, not from the (public) config seed.
    sampling = torch.Generator().manual_seed(secrets.randbits(63) if private else seed)
    return DataLoader(_Rows(categorical, numeric, target),  # type: ignore[arg-type]
                      batch_size=min(batch_size, len(rows)), collate_fn=_whole_batch,
                      generator=sampling)


def _make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    import torch

    params = model.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)
    return torch.optim.LBFGS(params, lr=cfg.learning_rate, max_iter=20, history_size=10,
                             line_search_fn="strong_wolfe")


# --------------------------------------------------------------------- privacy


@dataclass
class Session:
    """The training objects and the public privacy parameters of one run."""

    private: bool
    model: torch.nn.Module
    optimizer: Any
    loader: Any
    epochs: int
    steps_per_epoch: int
    sample_rate: float
    expected_batch_size: float
    max_physical_batch_size: int
    grad_sample_mode: str | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    engine: Any = None
    clipper: BookkeepingClipper | None = None
    dp_criterion: Any = None
    hooks: Any = None
    delta: float | None = None
    target_epsilon: float | None = None
    sampling: Any = None
    steps: int = 0
    on_step: list[Callable[[], None]] = field(default_factory=list)

    @property
    def planned_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def epsilon(self, *, final: bool = False) -> float | None:
        """Epsilon spent so far (None without DP).

        The final figure is the run's accountant's, which already succeeded on the
        full plan. Should PRV fail on a shorter prefix, progress shows RDP's bound
        for it instead (valid, looser) rather than stopping a run mid-way.
        """
        if not self.private:
            return None
        history = list(self.engine.accountant.history)
        try:
            return epsilon_of_history(accountant=str(self.accountant), history=history,
                                      delta=float(self.delta))
        except AccountantError:
            if final:
                raise
            return epsilon_of_history(accountant="rdp", history=history,
                                      delta=float(self.delta))

    def count_step(self) -> None:
        self.steps += 1
        for callback in self.on_step:
            callback()


def _make_plain(model: torch.nn.Module, optimizer: Any, loader: Any, config: Config) -> Session:
    from opacus.data_loader import DPDataLoader

    # The same Poisson batches as the private run, so the two differ only by DP.
    poisson = DPDataLoader.from_data_loader(loader, generator=loader.generator)
    return Session(private=False, model=model, optimizer=optimizer, loader=poisson,
                   epochs=config.train.epochs, steps_per_epoch=len(poisson),
                   sample_rate=poisson.sample_rate,
                   expected_batch_size=poisson.sample_rate * len(loader.dataset),
                   max_physical_batch_size=config.train.max_physical_batch_size,
                   sampling=loader.generator)


def _make_private(model: PersonaNet, optimizer: Any, loader: Any, config: Config, task: str, *,
                  device: torch.device, checkpoint: Checkpoint | None) -> Session:
    """Wrap optimizer and loader with Opacus; choose the clipping path and the accountant."""
    import torch
    from opacus import PrivacyEngine

    from personanet.models.tabular import PersonaLoss

    cfg = config.train
    bookkeeping = (cfg.grad_sample_mode == "ghost" and cfg.bookkeeping
                   and BookkeepingClipper.supports(model))
    mode = "ghost-bookkeeping" if bookkeeping else cfg.grad_sample_mode
    # A generator per run from the OS's entropy: noise replayable from a seed is no noise.
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    if checkpoint is not None:
        accountants = [checkpoint.state["accountant"]]
    else:
        accountants = ["prv", "rdp"] if cfg.accountant == "prv" else ["rdp"]
    # What Opacus' Poisson loader will do: rate 1 / len(loader), int(1 / rate) steps an
    # epoch. The noise is calibrated for exactly those steps (`_check_plan` re-checks).
    sample_rate = 1 / len(loader)
    planned_steps = cfg.epochs * int(1 / sample_rate)
    failure: Exception | None = None
    for accountant in accountants:
        common = dict(module=model, optimizer=optimizer, criterion=PersonaLoss(task),
                      data_loader=loader, max_grad_norm=cfg.max_grad_norm,
                      grad_sample_mode="ghost" if mode.startswith("ghost") else "hooks",
                      noise_generator=noise, wrap_model=False, poisson_sampling=True)
        try:
            if checkpoint is None:
                # Bounded in time whatever the target (RDP where PRV would take hours).
                sigma, accountant = calibrate_noise(
                    accountant=accountant, target_epsilon=cfg.epsilon, delta=cfg.delta,
                    sample_rate=sample_rate, steps=planned_steps)
            else:  # the calibrated noise of the interrupted run, not a new calibration
                sigma = float(checkpoint.state["noise_multiplier"])
            with warnings.catch_warnings():
                # Opacus warns that secure_mode (torchcsprng) is off; see docs/training.md.
                warnings.simplefilter("ignore", UserWarning)
                engine = PrivacyEngine(accountant=accountant)
                prepared = engine.make_private(noise_multiplier=sigma, **common)
        except ValueError as exc:
            if "too low" in str(exc):
                raise ConfigError(
                    f"train.epsilon = {cfg.epsilon:g} is too small to reach with "
                    f"{len(loader.dataset)} rows in {cfg.epochs} epochs: raise train.epsilon "
                    "or train.batch_size, or lower train.epochs") from exc
            failure = exc
        except (ArithmeticError, RuntimeError) as exc:
            failure = exc
        else:
            hooks, dp_optimizer, dp_criterion, dp_loader = _unpack(prepared)
            session = Session(
                private=True, model=model, optimizer=dp_optimizer, loader=dp_loader,
                epochs=cfg.epochs, steps_per_epoch=len(dp_loader),
                sample_rate=float(dp_loader.sample_rate),
                expected_batch_size=float(dp_optimizer.expected_batch_size),
                max_physical_batch_size=cfg.max_physical_batch_size,
                grad_sample_mode=mode, accountant=accountant,
                noise_multiplier=float(dp_optimizer.noise_multiplier), engine=engine,
                dp_criterion=dp_criterion, hooks=hooks, delta=cfg.delta,
                target_epsilon=cfg.epsilon)
            try:
                _check_plan(session, checkpoint)
            except AccountantError as exc:
                hooks.cleanup()
                failure = exc
            else:
                if bookkeeping:
                    # Opacus' hooks would compute norms for a second backward pass that
                    # book-keeping does not need; the optimizer, sampler and accountant stay.
                    hooks.cleanup()
                    session.hooks = None
                    session.clipper = BookkeepingClipper(model, max_grad_norm=cfg.max_grad_norm)
                _count_steps(session)
                _clone_instead_of_deepcopy(dp_optimizer)
                return session
        logger.warning("the %s accountant failed (%s); falling back to RDP", accountant,
                       failure)
    raise ConfigError(f"no accountant could calibrate the noise: {failure}")


def _check_delta(delta: float, *, rows: int) -> None:
    """ConfigError (78) unless ``delta < 1 / rows``.

    (epsilon, delta)-DP allows a total failure with probability delta: a mechanism that
    publishes one random row outright satisfies it with ``delta = 1 / rows``. A delta at
    or above that guarantees nothing, however small epsilon is.
    """
    if delta * rows >= 1:
        raise ConfigError(
            f"train.delta = {delta:g} is not below 1/rows = {1 / rows:.3g} for the {rows} "
            "training rows: a delta that large allows publishing a person's record outright; "
            f"set train.delta well below it (e.g. {_suggested_delta(rows):g})")


def _suggested_delta(rows: int) -> float:
    """A power of ten at most 1 / (10 rows), no larger than the default 1e-5."""
    import math

    return min(1e-5, 10.0 ** math.floor(math.log10(1 / (10 * rows))))


def _unpack(prepared: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
    if len(prepared) == 4:
        return prepared  # type: ignore[return-value]
    hooks, optimizer, loader = prepared
    return hooks, optimizer, None, loader


def _check_plan(session: Session, checkpoint: Checkpoint | None) -> None:
    """The planned run must end at or below the target epsilon, to the step.

    `_make_private` calibrates for the steps it predicts Opacus' sampler will take
    (``int(1 / sample_rate)`` per epoch; Opacus' own ``make_private_with_epsilon`` uses
    ``int(epochs / sample_rate)``, a step short for some row counts). Should the
    sampler disagree, recalibrate for its real count rather than overshoot the target.
    """
    if checkpoint is not None:
        saved = checkpoint.state
        if (abs(saved["sample_rate"] - session.sample_rate) > 1e-12
                or saved["steps_per_epoch"] != session.steps_per_epoch):
            raise BadInputError("the training rows changed since the interrupted run; it "
                                "cannot be resumed (train again without --resume)")
        return
    planned = compute_epsilon(accountant=str(session.accountant),
                              noise_multiplier=float(session.noise_multiplier),
                              sample_rate=session.sample_rate, steps=session.planned_steps,
                              delta=float(session.delta))
    if planned > float(session.target_epsilon):  # Opacus' loader did not do as predicted
        sigma = noise_for_epsilon(accountant=str(session.accountant),
                                  target_epsilon=float(session.target_epsilon),
                                  delta=float(session.delta), sample_rate=session.sample_rate,
                                  steps=session.planned_steps)
        logger.debug("noise multiplier recalibrated for %d steps: %.5f -> %.5f",
                     session.planned_steps, session.noise_multiplier, sigma)
        session.optimizer.noise_multiplier = sigma
        session.noise_multiplier = sigma


def _clone_instead_of_deepcopy(optimizer: Any) -> None:
    """Opacus' ghost-clipping optimizer starts each step's gradient sum with
    ``copy.deepcopy(p.grad.data)``: about 90 microseconds of Python per tensor, a good
    share of DP's extra cost per step on a network this small. ``clone()`` makes the
    same tensor for a fraction of that; the rest of the method is Opacus' own."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    if type(optimizer) is not DPOptimizerFastGradientClipping:
        return

    def accumulate() -> None:
        for p in optimizer.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.detach().clone()

    optimizer.accumulate = accumulate


def _count_steps(session: Session) -> None:
    """Count optimizer steps where Opacus counts them: in its accountant's step hook."""
    accountant_hook = session.optimizer.step_hook

    def on_step(optimizer: Any) -> None:
        accountant_hook(optimizer)
        session.count_step()

    session.optimizer.attach_step_hook(on_step)


# --------------------------------------------------------------------- the loop


@dataclass
class TrainHistory:
    loss_curve: list[float] = field(default_factory=list)
    epsilon_curve: list[float | None] = field(default_factory=list)
    epochs_done: int = 0
    train_seconds: float = 0.0
    wall_before: float = 0.0


def _run_epochs(model: torch.nn.Module, session: Session, loss_fn: Any, history: TrainHistory,
                epochs: int, *, save: Callable[[int], None]) -> None:
    model.train()
    remaining = session.planned_steps - session.steps
    with ui.progress("train" if session.private else "train (no DP)", remaining) as advance:
        session.on_step.append(lambda: advance(1))
        for epoch in range(history.epochs_done + 1, epochs + 1):
            began = time.perf_counter()
            if session.private:
                loss = _private_epoch(model, session, loss_fn)
            else:
                loss = _plain_epoch(model, session, loss_fn)
            history.train_seconds += time.perf_counter() - began
            epsilon = session.epsilon()
            history.loss_curve.append(round(loss, 6))
            history.epsilon_curve.append(None if epsilon is None else round(epsilon, 6))
            history.epochs_done = epoch
            fields = {"epoch": epoch, "epochs": epochs, "loss": loss, "epsilon": epsilon,
                      "delta": session.delta}  # for --log-format json
            if epsilon is None:
                logger.info("epoch %d/%d  loss %.4f  (no DP)", epoch, epochs, loss,
                            extra={"fields": fields})
            else:
                logger.info("epoch %d/%d  loss %.4f  epsilon %.3f of %.3g (delta %.2g)", epoch,
                            epochs, loss, epsilon, session.target_epsilon, session.delta,
                            extra={"fields": fields})
            save(epoch)
        session.on_step.pop()


def _private_epoch(model: torch.nn.Module, session: Session, loss_fn: Any) -> float:
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    optimizer, total, count = session.optimizer, 0.0, 0
    with warnings.catch_warnings(), BatchMemoryManager(
            data_loader=session.loader, max_physical_batch_size=session.max_physical_batch_size,
            optimizer=optimizer) as batches:
        # Opacus' hooks note that the first layer's input (one-hot, numeric) needs no
        # gradient, which is true and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for categorical, numeric, target in batches:
            optimizer.zero_grad(set_to_none=True)
            output = model(categorical, numeric)
            if session.clipper is not None:
                losses = loss_fn(output, target)
                session.clipper.backward(losses)
            elif session.dp_criterion is not None:  # Opacus' two-pass ghost clipping
                loss = session.dp_criterion(output, target)
                loss.backward()
                losses = loss.loss_per_sample
            else:  # Opacus hooks: per-example gradients, clipped by the optimizer
                losses = loss_fn(output, target)
                losses.mean().backward()
            optimizer.step()
            total += float(losses.detach().sum())
            count += int(losses.shape[0])
    optimizer.zero_grad(set_to_none=True)
    return total / max(count, 1)


def _plain_epoch(model: torch.nn.Module, session: Session, loss_fn: Any) -> float:
    """One epoch without DP: the same batches, the gradient of the same average."""
    import torch

    optimizer, total, count = session.optimizer, 0.0, 0
    for batch in session.loader:
        size = int(batch[2].shape[0])
        closure = _BatchLoss(model, loss_fn, batch, optimizer=optimizer,
                             scale=1.0 / max(session.expected_batch_size, 1.0),
                             limit=session.max_physical_batch_size)
        if size:
            if isinstance(optimizer, torch.optim.LBFGS):
                optimizer.step(closure)  # type: ignore[arg-type]
            else:
                closure()
                optimizer.step()
        session.count_step()
        total += closure.loss_sum
        count += size
    return total / max(count, 1)


class _BatchLoss:
    """Loss and gradient of one batch, in physical chunks; also L-BFGS's closure."""

    def __init__(self, model: torch.nn.Module, loss_fn: Any, batch: tuple[Any, ...], *,
                 optimizer: Any, scale: float, limit: int) -> None:
        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.optimizer, self.scale, self.limit = optimizer, scale, limit
        self.loss_sum = 0.0

    def __call__(self) -> torch.Tensor:
        import torch

        categorical, numeric, target = self.batch
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_sum = 0.0
        for start in range(0, int(target.shape[0]), self.limit):
            part = slice(start, start + self.limit)
            losses = self.loss_fn(self.model(categorical[part], numeric[part]), target[part])
            (losses.sum() * self.scale).backward()
            self.loss_sum += float(losses.detach().sum())
        return torch.tensor(self.loss_sum * self.scale)


def _stopped(exc: BaseException, ledger: Ledger, run_id: str, run_dir: Path, session: Session,
             *, private: bool) -> None:
    """A run that stops before its first step gives its reservation back; later, never."""
    if not private:
        if not any(run_dir.glob("epoch-*")):
            shutil.rmtree(run_dir, ignore_errors=True)
        return
    entry = ledger.entry(run_id)
    if entry is None or entry.get("status") != "reserved":
        return
    if session.steps == 0 and not any(run_dir.glob("epoch-*")):
        ledger.release(run_id, reason=f"stopped before its first step: {type(exc).__name__}")
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    ledger.update(run_id, steps=session.steps)
    logger.error("training stopped after %d of %d steps; its budget (epsilon %.3g) stays "
                 "reserved: `personanet train --resume` continues it", session.steps,
                 session.planned_steps, session.target_epsilon)


# --------------------------------------------------------------------- outputs


def _figures(session: Session, history: TrainHistory, config: Config, *, rows: int,
             device: torch.device, wall_seconds: float, run_id: str, resumed: bool,
             auto: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's figures and privacy.json, from the run's resolved `config`; `auto`
    holds what `personanet.training.defaults` chose for the keys set to "auto"."""
    cfg = config.train
    if session.private:
        if session.steps != session.planned_steps:
            raise InternalError(f"run took {session.steps} steps, planned "
                                 f"{session.planned_steps}")
        epsilon = session.epsilon(final=True)
        assert epsilon is not None
        steps = sum(int(n) for _, _, n in session.engine.accountant.history)
        privacy = {
            "format": PRIVACY_FORMAT, "private": True, "accountant": session.accountant,
            "epsilon": epsilon, "delta": session.delta, "target_epsilon": cfg.epsilon,
            "noise_multiplier": session.noise_multiplier, "sample_rate": session.sample_rate,
            "steps": steps, "epochs": cfg.epochs, "max_grad_norm": cfg.max_grad_norm,
            "batch_size": cfg.batch_size, "auto_settings": auto,
            "expected_batch_size": session.expected_batch_size, "poisson_sampling": True,
            "grad_sample_mode": session.grad_sample_mode, "secure_rng": False,
            "privacy_unit": config.dataset.privacy_unit, "run_id": run_id,
            "accountant_history": [list(h) for h in session.engine.accountant.history],
        }
    else:
        privacy = {
            "format": PRIVACY_FORMAT, "private": False, "accountant": None, "epsilon": None,
            "delta": None, "target_epsilon": None, "noise_multiplier": None,
            "sample_rate": session.sample_rate, "steps": session.steps, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "auto_settings": auto,
            "max_grad_norm": None, "expected_batch_size": session.expected_batch_size,
            "poisson_sampling": True, "grad_sample_mode": None, "run_id": run_id,
            "note": "trained without differential privacy (--no-dp): no privacy guarantee",
        }
    figures = {
        "private": session.private, "epsilon": privacy["epsilon"], "delta": privacy["delta"],
        "target_epsilon": privacy["target_epsilon"],
        "noise_multiplier": privacy["noise_multiplier"], "sample_rate": session.sample_rate,
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
    return figures, privacy


# --------------------------------------------------------------------- checkpoints


class RunFolders:
    """``<dataset>/checkpoints/<run id>/epoch-NNNN/``: one folder per unfinished run.

    Never touched by `artifacts gc`; removed when the run's artifact is committed.
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.root = store.dataset_dir / CHECKPOINTS
        self._locks: dict[str, int] = {}

    def open(self, run_id: str) -> Path:
        """The run's folder, locked by this process until it exits (exit 75 if taken)."""
        folder = self.root / run_id
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockBusyError(f"training run {run_id} is being continued by another "
                                "process") from None
        self._locks[run_id] = fd
        return folder

    def release(self, run_id: str) -> None:
        fd = self._locks.pop(run_id, None)
        if fd is not None:
            os.close(fd)

    def remove(self, run_id: str) -> None:
        shutil.rmtree(self.root / run_id, ignore_errors=True)
        self.release(run_id)

    def _busy(self, folder: Path) -> bool:
        try:
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we just took
        return False

    def checkpoints(self) -> list[Checkpoint]:
        found = []
        if not self.root.is_dir():
            return found
        for folder in sorted(self.root.iterdir()):
            latest = Checkpoint.latest(folder)
            if latest is not None:
                found.append(latest)
        return found

    def interrupted(self, fingerprint: str, ledger: Ledger) -> list[str]:
        return [c.run_id for c in self.checkpoints()
                if c.state.get("fingerprint") == fingerprint
                and (ledger.entry(c.run_id) or {}).get("status") in ("reserved", None)
                and not self._busy(c.folder.parent)]

    def resumable(self, fingerprint: str, ledger: Ledger) -> Checkpoint:
        candidates, running, other = [], [], 0
        for checkpoint in self.checkpoints():
            if checkpoint.state.get("fingerprint") != fingerprint:
                other += 1
                continue
            entry = ledger.entry(checkpoint.run_id)
            if checkpoint.state.get("private") and (entry is None
                                                    or entry.get("status") != "reserved"):
                continue  # settled or released: nothing left to continue
            if self._busy(checkpoint.folder.parent):
                running.append(checkpoint.run_id)
                continue
            candidates.append(checkpoint)
        if not candidates:
            if running:
                raise LockBusyError(f"training run {running[0]} is still running in another "
                                    "process; wait for it or stop it, then --resume")
            hint = (f" ({other} checkpointed run(s) belong to another input, config or mode)"
                    if other else "")
            raise InputMissingError(
                f"no interrupted training run of this input and config to resume{hint}; "
                "run `personanet train` without --resume")
        return max(candidates, key=lambda c: c.state.get("started_at", ""))


@dataclass
class Checkpoint:
    folder: Path
    state: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.state["run_id"])

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @classmethod
    def latest(cls, run_folder: Path) -> Checkpoint | None:
        """The newest complete epoch folder (``state.json`` is written last)."""
        best: Checkpoint | None = None
        for folder in run_folder.glob("epoch-*"):
            try:
                state = json.loads((folder / "state.json").read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if state.get("format") != CHECKPOINT_FORMAT:
                continue
            if best is None or state["epoch"] > best.epoch:
                best = cls(folder, state)
        return best

    def restore(self, model: torch.nn.Module, session: Session, history: TrainHistory, *,
                device: torch.device) -> None:
        import torch
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(self.folder / "model.safetensors"),
                                        device=str(device)))
        optimizer_state = torch.load(self.folder / "optimizer.pt", map_location=device,
                                     weights_only=True)
        session.optimizer.load_state_dict(optimizer_state)
        rng = load_file(str(self.folder / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if not session.private and "sampling" in rng:
            session.sampling.set_state(rng["sampling"])
        if session.private:
            session.engine.accountant.history = [
                (float(s), float(q), int(n)) for s, q, n in self.state["accountant_history"]]
        session.steps = int(self.state["steps"])
        history.loss_curve = list(self.state["loss_curve"])
        history.epsilon_curve = list(self.state["epsilon_curve"])
        history.epochs_done = self.epoch
        history.train_seconds = float(self.state.get("train_seconds", 0.0))
        history.wall_before = float(self.state.get("wall_seconds", 0.0))


def _save_checkpoint(run_dir: Path, *, epoch: int, run_id: str, fingerprint: str,
                     model: torch.nn.Module, session: Session, history: TrainHistory,
                     spec: dict[str, Any], clean_version: str, config: Config,
                     wall_seconds: float) -> None:
    """Write ``epoch-NNNN/`` atomically, then drop older epochs of this run.

    What is saved: weights, optimizer state, the accountant's history, the loss
    curve, the public RNG (dropout, and the sampler of a non-private run). What is not:
    the DP noise and sampling generators (see the module docstring).
    """
    import torch
    from safetensors.torch import save_file

    from personanet.models.tabular import state_dict_for_saving

    final = run_dir / f"epoch-{epoch:04d}"
    tmp = run_dir / f".tmp-epoch-{epoch:04d}-{secrets.token_hex(3)}"
    tmp.mkdir()
    save_file(state_dict_for_saving(model), str(tmp / "model.safetensors"))
    torch.save(session.optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if not session.private and session.sampling is not None:
        rng["sampling"] = session.sampling.get_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        "format": CHECKPOINT_FORMAT, "run_id": run_id, "fingerprint": fingerprint,
        "input": clean_version, "private": session.private, "epoch": epoch,
        "epochs": session.epochs, "steps": session.steps,
        "steps_per_epoch": session.steps_per_epoch, "planned_steps": session.planned_steps,
        "sample_rate": session.sample_rate, "noise_multiplier": session.noise_multiplier,
        "accountant": session.accountant, "delta": session.delta,
        "target_epsilon": session.target_epsilon,
        "accountant_history": ([list(h) for h in session.engine.accountant.history]
                               if session.private else []),
        "grad_sample_mode": session.grad_sample_mode,
        "loss_curve": history.loss_curve, "epsilon_curve": history.epsilon_curve,
        "train_seconds": history.train_seconds, "wall_seconds": wall_seconds,
        "started_at": _started_at(run_dir), "saved_at": utc_now(), "spec": spec,
        "config_hash": config.section_hash("columns", "train", "dataset"),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(run_dir)
    for old in run_dir.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(".tmp-epoch-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _started_at(run_dir: Path) -> str:
    marker = run_dir / "started_at"
    if not marker.exists():
        marker.write_text(utc_now())
    return marker.read_text().strip()



