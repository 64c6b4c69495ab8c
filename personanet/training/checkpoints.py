"""Checkpoints: one folder per unfinished training run, so a killed run can be resumed.

``<dataset>/checkpoints/<run id>/epoch-NNNN/`` holds the newest complete epoch:

- ``model.safetensors``: the weights (the network's own key names);
- ``optimizer.pt``: the optimizer's state, read back with ``weights_only=True``;
- ``rng.safetensors``: the public generators (dropout; the sampler of a run without DP);
- ``state.json``: everything else (steps, curves, the accountant's history, the plan),
  written last, so an epoch folder without it is incomplete and ignored.

What is never saved: a private run's noise and sampling generators. They are seeded
from the operating system; anyone who could replay the noise could subtract it. A
folder is written beside its final name and renamed into place (`personanet.store.fsutil`),
is never touched by ``artifacts gc``, and is removed when the run's artifact is committed.
A process that continues a run holds the run folder's lock until it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.errors import InputMissingError, InternalError, LockBusyError
from personanet.models import state_dict_for_saving
from personanet.store.artifacts import utc_now
from personanet.store.fsutil import TMP_PREFIX, fsync_dir, fsync_path, hold_lock
from personanet.training import distributed

if TYPE_CHECKING:
    import torch

    from personanet.config import Config
    from personanet.privacy import Ledger
    from personanet.store.artifacts import ArtifactStore
    from personanet.training.loop import TrainHistory
    from personanet.training.private import TrainingRun

CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "personanet.checkpoint/1"
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
LOCK_FILE = ".lock"
STARTED_AT_FILE = "started_at"


class RunFolders:
    """The checkpoint folders of a dataset's unfinished runs, and their locks."""

    def __init__(self, store: ArtifactStore) -> None:
        self.root = store.dataset_dir / CHECKPOINTS
        self._held: dict[str, contextlib.ExitStack] = {}

    def open(self, run_id: str) -> Path:
        """The run's folder, locked by this process until `release` (exit 75 if taken)."""
        folder = self.root / run_id
        folder.mkdir(parents=True, exist_ok=True)
        if run_id in self._held:
            return folder
        held = contextlib.ExitStack()
        try:
            held.enter_context(hold_lock(folder / LOCK_FILE, timeout=0,
                                         what=f"training run {run_id}"))
        except LockBusyError:
            raise LockBusyError(f"training run {run_id} is being continued by another "
                                "process") from None
        self._held[run_id] = held
        return folder

    def release(self, run_id: str) -> None:
        held = self._held.pop(run_id, None)
        if held is not None:
            held.close()

    def remove(self, run_id: str) -> None:
        # Deleted while still locked, so no other process starts on a half-deleted folder.
        shutil.rmtree(self.root / run_id, ignore_errors=True)
        self.release(run_id)

    def _busy(self, folder: Path) -> bool:
        """Whether another process is continuing the run in `folder` right now."""
        try:
            with hold_lock(folder / LOCK_FILE, timeout=0, what=f"training run {folder.name}"):
                return False
        except LockBusyError:
            return True

    def checkpoints(self) -> list[Checkpoint]:
        """The newest complete checkpoint of every run folder."""
        found: list[Checkpoint] = []
        if not self.root.is_dir():
            return found
        for folder in sorted(self.root.iterdir()):
            latest = Checkpoint.latest(folder)
            if latest is not None:
                found.append(latest)
        return found

    def interrupted(self, fingerprint: str, ledger: Ledger) -> list[str]:
        """Run ids of this input and config that stopped and keep their budget reserved."""
        return [c.run_id for c in self.checkpoints()
                if c.state.get("fingerprint") == fingerprint
                and (ledger.entry(c.run_id) or {}).get("status") in ("reserved", None)
                and not self._busy(c.folder.parent)]

    def resumable(self, fingerprint: str, ledger: Ledger) -> Checkpoint:
        """The newest interrupted run of this input and config that nobody is continuing.

        Raises:
            LockBusyError: (exit 75) the only such run is running in another process.
            InputMissingError: (exit 66) there is none.
        """
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
    """One complete ``epoch-NNNN`` folder and its ``state.json``."""

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
                state = json.loads((folder / STATE_FILE).read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if state.get("format") != CHECKPOINT_FORMAT:
                continue
            if best is None or state["epoch"] > best.epoch:
                best = cls(folder, state)
        return best

    def restore(self, run: TrainingRun, history: TrainHistory, *,
                device: torch.device) -> None:
        """Put the run's weights, optimizer, public generators and counts back."""
        import torch
        from safetensors.torch import load_file

        run.model.load_state_dict(load_file(str(self.folder / WEIGHTS_FILE),
                                            device=str(device)))
        optimizer_state = torch.load(self.folder / OPTIMIZER_FILE, map_location=device,
                                     weights_only=True)
        run.optimizer.load_state_dict(optimizer_state)
        rng = load_file(str(self.folder / RNG_FILE))
        torch.set_rng_state(rng["torch"])
        if not run.private and run.sampling is not None and "sampling" in rng:
            run.sampling.set_state(rng["sampling"])
        if run.engine is not None:
            run.engine.accountant.history = [
                (float(s), float(q), int(n)) for s, q, n in self.state["accountant_history"]]
        run.steps = int(self.state["steps"])
        history.loss_curve = list(self.state["loss_curve"])
        history.epsilon_curve = list(self.state["epsilon_curve"])
        history.epochs_done = self.epoch
        history.train_seconds = float(self.state.get("train_seconds", 0.0))
        history.wall_before = float(self.state.get("wall_seconds", 0.0))


def save_checkpoint(run_dir: Path, *, epoch: int, run_id: str, fingerprint: str,
                    run: TrainingRun, history: TrainHistory, spec: dict[str, Any],
                    clean_version: str, config: Config, wall_seconds: float) -> None:
    """Write ``epoch-NNNN/`` atomically, then drop older epochs of this run.

    In a run of several processes only rank 0 writes (the others hold the same weights).
    """
    import torch
    from safetensors.torch import save_file

    world = distributed.current()
    if world is not None and not world.main:
        raise InternalError(f"rank {world.rank} tried to write a checkpoint: only rank 0 does")
    final = run_dir / f"epoch-{epoch:04d}"
    tmp = run_dir / f"{TMP_PREFIX}epoch-{epoch:04d}-{secrets.token_hex(3)}"
    tmp.mkdir()
    save_file(state_dict_for_saving(run.model), str(tmp / WEIGHTS_FILE))
    torch.save(run.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    rng = {"torch": torch.get_rng_state()}
    if not run.private and run.sampling is not None:
        rng["sampling"] = run.sampling.get_state()
    save_file(rng, str(tmp / RNG_FILE))
    state = {
        "format": CHECKPOINT_FORMAT, "run_id": run_id, "fingerprint": fingerprint,
        "input": clean_version, "private": run.private, "epoch": epoch,
        "epochs": run.epochs, "steps": run.steps,
        "steps_per_epoch": run.steps_per_epoch, "planned_steps": run.planned_steps,
        "sample_rate": run.sample_rate, "noise_multiplier": run.noise_multiplier,
        "accountant": run.accountant, "delta": run.delta,
        "target_epsilon": run.target_epsilon,
        "accountant_history": [list(h) for h in run.accountant_history],
        "grad_sample_mode": run.grad_sample_mode,
        "loss_curve": history.loss_curve, "epsilon_curve": history.epsilon_curve,
        "train_seconds": history.train_seconds, "wall_seconds": wall_seconds,
        "started_at": _started_at(run_dir), "saved_at": utc_now(), "spec": spec,
        "config_hash": config.section_hash("columns", "train", "dataset"),
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_dir(run_dir)
    for old in run_dir.glob("epoch-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(f"{TMP_PREFIX}epoch-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _started_at(run_dir: Path) -> str:
    """When the run first checkpointed: kept across resumes, to pick the newest run."""
    marker = run_dir / STARTED_AT_FILE
    if not marker.exists():
        marker.write_text(utc_now())
    return marker.read_text().strip()
