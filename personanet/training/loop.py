"""The training loop: epochs of Poisson batches, one optimizer step per logical batch.

Batches are mappings of named tensors; the loop calls the network as
``model(**family.inputs(batch))`` and reads ``batch["target"]``, so it serves any
model family. A private epoch goes through Opacus' `BatchMemoryManager`, which splits
a logical batch into physical ones and tells the DP optimizer when the logical batch
(one noisy step) ends; a plain epoch takes the same batches and the gradient of the
same average, so that the two differ by DP alone.
"""

from __future__ import annotations

import logging
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personanet import ui
from personanet.training import distributed
from personanet.training.units import UNIT_INDEX, weighted_losses

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from personanet.config import TrainConfig
    from personanet.models.encoding import EncodedBatch
    from personanet.training.private import TrainingRun

logger = logging.getLogger("personanet")

Batch = Mapping[str, "torch.Tensor"]


@dataclass
class TrainHistory:
    """What the epochs so far produced: the curves, and the time they took."""

    loss_curve: list[float] = field(default_factory=list)
    epsilon_curve: list[float | None] = field(default_factory=list)
    epochs_done: int = 0
    train_seconds: float = 0.0
    #: wall-clock seconds of the interrupted runs a resumed run continues
    wall_before: float = 0.0


# --------------------------------------------------------------------- inputs


class NamedRows:
    """Named tensors drawn a batch at a time (``__getitems__``): no per-row Python work.

    Yields mappings, the shape Opacus' Poisson loader and `BatchMemoryManager` pass
    through untouched (they sample indices, not items).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)
        self._device = next(iter(self.tensors.values())).device

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch

        index = torch.as_tensor(indices, dtype=torch.long, device=self._device)
        return {name: t.index_select(0, index) for name, t in self.tensors.items()}


def _whole_batch(batch: Any) -> Any:
    """`NamedRows` already returns the batch whole: nothing to collate."""
    return batch


def make_loader(rows: EncodedBatch, *, batch_size: int, device: torch.device, private: bool,
                seed: int) -> DataLoader:
    """A loader over the encoded rows, on `device`; Opacus turns it into a Poisson one."""
    import torch
    from torch.utils.data import DataLoader

    # Which people are in a batch must stay secret for sampling to amplify privacy, so
    # a private run samples from the OS's entropy, not from the (public) config seed.
    sampling = torch.Generator().manual_seed(secrets.randbits(63) if private else seed)
    return DataLoader(NamedRows(rows.tensors(device)),  # type: ignore[arg-type]
                      batch_size=min(batch_size, len(rows)), collate_fn=_whole_batch,
                      generator=sampling)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
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


# --------------------------------------------------------------------- the loop


def run_epochs(run: TrainingRun, loss_fn: torch.nn.Module, history: TrainHistory,
               epochs: int, *, save: Callable[[int], None]) -> None:
    """Train from the epoch after `history`'s last to `epochs`, saving after each."""
    run.model.train()
    remaining = run.planned_steps - run.steps
    with ui.progress("train" if run.private else "train (no DP)", remaining) as advance:
        run.on_step.append(lambda: advance(1))
        for epoch in range(history.epochs_done + 1, epochs + 1):
            began = time.perf_counter()
            loss = _private_epoch(run, loss_fn) if run.private else _plain_epoch(run, loss_fn)
            history.train_seconds += time.perf_counter() - began
            # Between epochs RDP's bound (valid, looser, microseconds); after the last
            # step the accountant's own figure, the one privacy.json and the ledger get.
            # A bound past the target would read as an overspent run (RDP is looser than
            # PRV near the end): then the accountant's figure, which stays below it.
            bound = run.steps < run.planned_steps
            epsilon = run.epsilon(bound=bound)
            if bound and epsilon is not None and epsilon > float(run.target_epsilon):
                bound, epsilon = False, run.epsilon()
            history.loss_curve.append(round(loss, 6))
            history.epsilon_curve.append(None if epsilon is None else round(epsilon, 6))
            history.epochs_done = epoch
            fields = {"epoch": epoch, "epochs": epochs, "loss": loss, "epsilon": epsilon,
                      "delta": run.delta}  # for --log-format json
            if epsilon is None:
                logger.info("epoch %d/%d  loss %.4f  (no DP)", epoch, epochs, loss,
                            extra={"fields": fields})
            else:
                logger.info("epoch %d/%d  loss %.4f  epsilon %s%.3f of %.3g (delta %.2g%s)",
                            epoch, epochs, loss, "<= " if bound else "", epsilon,
                            run.target_epsilon, run.delta, ", RDP bound" if bound else "",
                            extra={"fields": fields})
            save(epoch)
        run.on_step.pop()



def _private_epoch(run: TrainingRun, loss_fn: torch.nn.Module) -> float:
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from personanet.privacy.units import sum_grad_samples_by_unit

    model, family, optimizer = run.model, run.family, run.optimizer
    total, count = 0.0, 0
    with warnings.catch_warnings(), BatchMemoryManager(
            data_loader=run.loader, max_physical_batch_size=run.max_physical_batch_size,
            optimizer=optimizer) as batches:
        # Opacus' hooks note that the first layer's input (one-hot, numeric) needs no
        # gradient, which is true and harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            if run.augment is not None:  # K augmented copies per example (training/augment.py)
                batch = run.augment.expand(batch)
            output = model(**family.inputs(batch))
            target = batch["target"]
            units = batch.get(UNIT_INDEX)  # person-level batches (training/units.py)
            if run.clipper is not None:
                losses = loss_fn(output, target)
                run.clipper.backward(weighted_losses(losses, batch), units=units)
            elif run.dp_criterion is not None:  # Opacus' two-pass ghost clipping
                loss = run.dp_criterion(output, target)
                loss.backward()
                losses = loss.loss_per_sample
            else:  # Opacus hooks: per-example gradients, clipped by the optimizer
                losses = loss_fn(output, target)
                weighted_losses(losses, batch).mean().backward()
                if units is not None:  # one gradient per person for the optimizer to clip
                    sum_grad_samples_by_unit(model.parameters(), units)
            if run.augment is not None:  # average each example's copies before clipping
                run.augment.average_copies(model)
            optimizer.step()
            total += float(losses.detach().sum())
            count += int(losses.shape[0])
    optimizer.zero_grad(set_to_none=True)
    return _mean_over_ranks(total, count)


def _plain_epoch(run: TrainingRun, loss_fn: torch.nn.Module) -> float:
    """One epoch without DP: the same batches, the gradient of the same average."""
    import torch

    optimizer, total, count = run.optimizer, 0.0, 0
    for batch in run.loader:
        if run.augment is not None:  # plain augmentation: one fresh copy per example
            batch = run.augment.expand(batch)
        size = int(batch["target"].shape[0])
        closure = _BatchLoss(run, loss_fn, batch,
                             scale=1.0 / max(run.expected_batch_size, 1.0),
                             limit=run.max_physical_batch_size)
        if distributed.current() is not None:  # every rank steps, with rows or without
            if size:
                closure()
            else:
                optimizer.zero_grad(set_to_none=True)
            if distributed.sum_gradients(run.model, size):
                optimizer.step()
        elif size:
            if isinstance(optimizer, torch.optim.LBFGS):
                optimizer.step(closure)  # type: ignore[arg-type]
            else:
                closure()
                optimizer.step()
        run.count_step()
        total += closure.loss_sum
        count += size
    return _mean_over_ranks(total, count)


def _mean_over_ranks(total: float, count: int) -> float:
    """The epoch's mean loss over the rows of every rank (of this one alone without a
    process group)."""
    total, count = distributed.sum_over_ranks(total, count)
    return total / max(count, 1)


class _BatchLoss:
    """Loss and gradient of one batch, in physical chunks; also L-BFGS's closure."""

    def __init__(self, run: TrainingRun, loss_fn: torch.nn.Module, batch: Batch, *,
                 scale: float, limit: int) -> None:
        self.run, self.loss_fn, self.batch = run, loss_fn, batch
        self.scale, self.limit = scale, limit
        self.loss_sum = 0.0

    def __call__(self) -> torch.Tensor:
        import torch

        model, family = self.run.model, self.run.family
        self.run.optimizer.zero_grad(set_to_none=True)
        self.loss_sum = 0.0
        for start in range(0, int(self.batch["target"].shape[0]), self.limit):
            part = {name: t[start:start + self.limit] for name, t in self.batch.items()}
            losses = self.loss_fn(model(**family.inputs(part)), part["target"])
            (weighted_losses(losses, part).sum() * self.scale).backward()
            self.loss_sum += float(losses.detach().sum())
        return torch.tensor(self.loss_sum * self.scale)
