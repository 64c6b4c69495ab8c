"""The DP set-up of a training run: Opacus' optimizer, Poisson loader and accountant, made
to reach the target epsilon in exactly the steps the run will take.

`make_private` returns a `TrainingRun`, the objects the loop drives and the public
privacy parameters the ledger, checkpoints and figures record; `make_plain` returns the
same for a run without DP (``--no-dp``, for comparison only), on the same Poisson
batches, so that the two runs differ by DP alone.

- Sampling rate ``q = 1 / len(loader)``; the noise multiplier is calibrated (bounded in
  time, `personanet.privacy.calibrate_noise`) for ``epochs * int(1 / q)`` steps, the
  count Opacus' sampler takes, and `_check_plan` re-checks it against the real loader.
- PRV accounting, or RDP when PRV fails; a resumed run keeps its accountant and noise.
- The noise generator is seeded from the operating system, never from the config and
  never checkpointed: noise replayable from a seed is no noise.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personanet.errors import BadInputError, ConfigError
from personanet.privacy import (
    AccountantError,
    BookkeepingClipper,
    calibrate_noise,
    compute_epsilon,
    epsilon_of_history,
    noise_for_epsilon,
    rdp_bound,
)
from personanet.training import distributed

if TYPE_CHECKING:
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    from torch.utils.data import DataLoader

    from personanet.config import Config
    from personanet.models import ModelFamily
    from personanet.training.augment import Augmentation
    from personanet.training.checkpoints import Checkpoint

logger = logging.getLogger("personanet")


@dataclass
class TrainingRun:
    """What one run trains with, and the public privacy parameters it is accounted under.

    `optimizer` and `loader` are Opacus' (DP optimizer, Poisson loader) in a private run;
    the clipping path is the first of `clipper` (book-keeping: one backward pass),
    `dp_criterion` (Opacus' two-pass ghost clipping) and neither (Opacus' per-example
    gradient hooks, `hooks`).
    """

    private: bool
    model: torch.nn.Module
    family: ModelFamily
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    epochs: int
    steps_per_epoch: int
    sample_rate: float
    expected_batch_size: float
    max_physical_batch_size: int
    grad_sample_mode: str | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    engine: PrivacyEngine | None = None
    clipper: BookkeepingClipper | None = None
    dp_criterion: DPLossFastGradientClipping | None = None
    hooks: Any = None
    delta: float | None = None
    target_epsilon: float | None = None
    #: the batch sampler's generator of a non-private run (checkpointed: it is public)
    sampling: torch.Generator | None = None
    #: augmentation of each batch (`personanet.training.augment`), None when off
    augment: Augmentation | None = None
    steps: int = 0
    on_step: list[Callable[[], None]] = field(default_factory=list)

    @property
    def planned_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def accountant_history(self) -> list[tuple[float, float, int]]:
        """Opacus' record of (noise multiplier, sample rate, steps); empty without DP."""
        if self.engine is None:
            return []
        return list(self.engine.accountant.history)

    def epsilon(self, *, final: bool = False, bound: bool = False) -> float | None:
        """Epsilon spent so far (None without DP).

        The final figure is the run's accountant's, which already succeeded on the
        full plan. Should PRV fail on a shorter prefix, progress shows RDP's bound
        for it instead (valid, looser) rather than stopping a run mid-way. With
        `bound` (progress between epochs), RDP's bound outright: microseconds where a
        PRV evaluation takes 40 ms at 32k rows and 0.2 s at 1M.
        """
        if not self.private:
            return None
        history = self.accountant_history
        if bound and not final:
            return rdp_bound(history=history, delta=float(self.delta))
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


def make_plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
               config: Config, *, family: ModelFamily) -> TrainingRun:
    """A run without DP on the same Poisson batches as a private one."""
    import torch
    from opacus.data_loader import DPDataLoader

    world = distributed.current()
    if world is not None and isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError("train.optimizer = \"lbfgs\" trains in one process only (its line "
                          "search evaluates the loss many times a step); use adam or sgd")
    if world is not None:  # each rank its own public draws over its own shard
        loader.generator.manual_seed(config.train.seed + world.rank)
    poisson = DPDataLoader.from_data_loader(loader, generator=loader.generator,
                                            distributed=world is not None)
    distributed.keep_empty_batches(poisson)
    return TrainingRun(private=False, model=model, family=family, optimizer=optimizer,
                       loader=poisson, epochs=config.train.epochs,
                       steps_per_epoch=len(poisson), sample_rate=poisson.sample_rate,
                       expected_batch_size=poisson.sample_rate * len(loader.dataset),
                       max_physical_batch_size=config.train.max_physical_batch_size,
                       sampling=loader.generator)


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 config: Config, *, family: ModelFamily, task: str, device: torch.device,
                 checkpoint: Checkpoint | None, rows_per_unit: int = 1) -> TrainingRun:
    """Wrap optimizer and loader with Opacus; choose the clipping path and the accountant.

    `rows_per_unit` > 1: `loader` is over people (`personanet.training.units`), each
    person's gradient is clipped as one (book-keeping per person where every layer
    allows it, else Opacus' hooks with per-person sums), and a physical batch holds
    ``max_physical_batch_size // rows_per_unit`` people.

    Raises:
        ConfigError: (exit 78) the target epsilon is out of reach, or no accountant
            could calibrate the noise.
        BadInputError: (exit 65) a resumed run's rows changed since its checkpoint.
    """
    import torch
    from opacus import PrivacyEngine

    cfg = config.train
    # Augmentation multiplicity averages per-example gradients before clipping, and only
    # Opacus' hooks hold per-example gradients (training/augment.py).
    averaged = cfg.augment is True and int(cfg.augment_multiplicity) > 1
    bookkeeping = (cfg.grad_sample_mode == "ghost" and cfg.bookkeeping and not averaged
                   and BookkeepingClipper.supports(model, per_unit=rows_per_unit > 1))
    # Opacus' two-pass ghost clipping knows rows only: people go to its hooks instead.
    mode = ("ghost-bookkeeping" if bookkeeping
            else "hooks" if averaged or rows_per_unit > 1 else cfg.grad_sample_mode)
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
    # In several processes: Opacus' DPDDP, so that its engine picks the distributed
    # sampler (one shard per rank, the same q) and optimizer (noise once, on rank 0).
    module = distributed.wrap_for_dp(model)
    for accountant in accountants:
        common = dict(module=module, optimizer=optimizer, criterion=family.loss(task),
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
            distributed.keep_empty_batches(dp_loader)
            run = TrainingRun(
                private=True, model=model, family=family, optimizer=dp_optimizer,
                loader=dp_loader, epochs=cfg.epochs, steps_per_epoch=len(dp_loader),
                sample_rate=float(dp_loader.sample_rate),
                # Opacus' figure is per rank: the run's is that of all ranks together
                expected_batch_size=float(dp_optimizer.expected_batch_size)
                * distributed.world_size(),
                max_physical_batch_size=max(1, cfg.max_physical_batch_size // rows_per_unit),
                grad_sample_mode=mode, accountant=accountant,
                noise_multiplier=float(dp_optimizer.noise_multiplier), engine=engine,
                dp_criterion=dp_criterion, hooks=hooks, delta=cfg.delta,
                target_epsilon=cfg.epsilon)
            try:
                _check_plan(run, checkpoint)
            except AccountantError as exc:
                hooks.cleanup()
                failure = exc
            else:
                if bookkeeping:
                    # Opacus' hooks would compute norms for a second backward pass that
                    # book-keeping does not need; the optimizer, sampler and accountant stay.
                    hooks.cleanup()
                    run.hooks = None
                    run.clipper = BookkeepingClipper(model, max_grad_norm=cfg.max_grad_norm)
                _count_steps(run)
                clone_instead_of_deepcopy(dp_optimizer)
                return run
        logger.warning("the %s accountant failed (%s); falling back to RDP", accountant,
                       failure)
    raise ConfigError(f"no accountant could calibrate the noise: {failure}")


def check_delta(delta: float, *, rows: int) -> None:
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
    return min(1e-5, 10.0 ** math.floor(math.log10(1 / (10 * rows))))


def _unpack(prepared: tuple[Any, ...]) -> tuple[Any, Any, Any, Any]:
    """Opacus returns a criterion only in ghost mode; make both shapes one."""
    if len(prepared) == 4:
        return prepared  # type: ignore[return-value]
    hooks, optimizer, loader = prepared
    return hooks, optimizer, None, loader


def _check_plan(run: TrainingRun, checkpoint: Checkpoint | None) -> None:
    """The planned run must end at or below the target epsilon, to the step.

    `make_private` calibrates for the steps it predicts Opacus' sampler will take
    (``int(1 / sample_rate)`` per epoch; Opacus' own ``make_private_with_epsilon`` uses
    ``int(epochs / sample_rate)``, a step short for some row counts). Should the
    sampler disagree, recalibrate for its real count rather than overshoot the target.
    """
    if checkpoint is not None:
        saved = checkpoint.state
        if (abs(saved["sample_rate"] - run.sample_rate) > 1e-12
                or saved["steps_per_epoch"] != run.steps_per_epoch):
            raise BadInputError("the training rows changed since the interrupted run; it "
                                "cannot be resumed (train again without --resume)")
        return
    planned = compute_epsilon(accountant=str(run.accountant),
                              noise_multiplier=float(run.noise_multiplier),
                              sample_rate=run.sample_rate, steps=run.planned_steps,
                              delta=float(run.delta))
    if planned > float(run.target_epsilon):
        sigma = noise_for_epsilon(accountant=str(run.accountant),
                                  target_epsilon=float(run.target_epsilon),
                                  delta=float(run.delta),
                                  sample_rate=run.sample_rate, steps=run.planned_steps)
        logger.debug("noise multiplier recalibrated for %d steps: %.5f -> %.5f",
                     run.planned_steps, run.noise_multiplier, sigma)
        run.optimizer.noise_multiplier = sigma
        run.noise_multiplier = sigma


def clone_instead_of_deepcopy(optimizer: Any) -> None:
    """Opacus' ghost-clipping optimizer starts each step's gradient sum with
    ``copy.deepcopy(p.grad.data)``: about 90 microseconds of Python per tensor, a good
    share of DP's extra cost per step on a network this small. ``clone()`` makes the
    same tensor for a fraction of that; the rest of the method is Opacus' own."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    if not isinstance(optimizer, DPOptimizerFastGradientClipping):  # distributed one too
        return

    def accumulate() -> None:
        for p in optimizer.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.detach().clone()

    optimizer.accumulate = accumulate


def _count_steps(run: TrainingRun) -> None:
    """Count optimizer steps where Opacus counts them: in its accountant's step hook."""
    optimizer: Any = run.optimizer
    accountant_hook = optimizer.step_hook

    def on_step(dp_optimizer: Any) -> None:
        accountant_hook(dp_optimizer)
        run.count_step()

    optimizer.attach_step_hook(on_step)
