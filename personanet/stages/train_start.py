"""How a train run starts: reuse an identical model, resume an interrupted run, or begin.

Decided once, under the root's lock, by the one process that holds it: a single
process, or rank 0 of several (`personanet.training.distributed`), which tells the
other ranks what it decided as ids (the run to resume, the model reused) that they then
read for themselves. Deciding touches the ledger and the run folders' locks, which only
rank 0 may write.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from personanet.stages import base as stage
from personanet.stages.base import StageResult
from personanet.training.checkpoints import Checkpoint, RunFolders
from personanet.training.defaults import small_data_warnings
from personanet.training.distributed import World, share

if TYPE_CHECKING:
    from personanet.config import Config
    from personanet.privacy import Ledger
    from personanet.store.artifacts import ArtifactStore

logger = logging.getLogger("personanet")


def start(world: World | None, config: Config, store: ArtifactStore, ledger: Ledger,
          run_folders: RunFolders, fp: str, *, resume: bool, force: bool,
          private: bool) -> tuple[Checkpoint | None, StageResult | None]:
    """The interrupted run to continue, or the identical model to reuse, or neither, on
    every rank as on rank 0 (whose error, if it fails, is every rank's)."""
    found: dict[str, Any] = {}

    def decide() -> dict[str, Any]:
        found["checkpoint"], found["reused"] = _resume_or_reuse(
            config, store, ledger, run_folders, fp, resume=resume, force=force,
            private=private)
        return {name: getattr(found[name], attr, None)
                for name, attr in (("checkpoint", "run_id"), ("reused", "version"))}

    told = share(world, decide)
    if world is None or world.main:
        return found["checkpoint"], found["reused"]
    checkpoint = (Checkpoint.latest(run_folders.root / told["checkpoint"])
                  if told["checkpoint"] else None)
    reused = (StageResult.of(store.get("train", told["reused"]), reused=True)
              if told["reused"] else None)
    return checkpoint, reused


def _resume_or_reuse(config: Config, store: ArtifactStore, ledger: Ledger,
                     run_folders: RunFolders, fp: str, *, resume: bool, force: bool,
                     private: bool) -> tuple[Checkpoint | None, StageResult | None]:
    cfg = config.train
    if resume:
        checkpoint = run_folders.resumable(fp, ledger)
        logger.info("resuming run %s from epoch %d/%d", checkpoint.run_id, checkpoint.epoch,
                    checkpoint.state["epochs"])
        return checkpoint, None
    reused = stage.find_reusable(store, "train", fp, force=force)
    if reused is not None:
        logger.info("reusing train artifact %s (identical input and config; no budget "
                    "spent)", reused.version)
        return None, with_plan_warnings(reused)
    for waiting in run_folders.interrupted(fp, ledger):
        logger.warning("run %s was interrupted and keeps its budget reserved; "
                       "`personanet train --resume` continues it", waiting)
    if private:  # fail fast, before reading any data; `reserve` checks again under lock
        ledger.check(epsilon=cfg.epsilon, delta=cfg.delta,
                     budget_epsilon=config.budget.epsilon, budget_delta=config.budget.delta)
    return None, None


def with_plan_warnings(reused: StageResult) -> StageResult:
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
