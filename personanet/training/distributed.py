"""Several processes: one DP-SGD run spread over the workers of torch's launcher (torchrun).

Each worker is ``python -m personanet train`` with ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in its environment (`World.from_env`), started by torchrun or by
`personanet.training.launcher` (the same code), which also watches them: a worker that
dies takes the others down. Inside a run (Opacus' distributed DP-SGD):

- each rank Poisson-samples its shard of the rows at the single-process rate ``q`` and
  takes ``int(1 / q)`` steps an epoch, every rank every step, an empty batch included
  (`every_step_sampler`), so rate, steps, noise multiplier and epsilon are those of one
  process;
- each rank's clipped sum (book-keeping, ghost or hooks) is summed over the ranks by
  Opacus' distributed optimizer, and only rank 0 adds noise: ``(S_0 + N) + S_1 + ...``
  is ``(S_0 + S_1 + ...) + N``, one draw of noise per step;
- rank 0 alone takes the root's lock, charges the ledger, writes checkpoints and commits;
  what it decides reaches the others as JSON (`share`), never as pickle;
- a collective that fails (a peer died, or stayed silent `timeout_seconds`) raises
  `PeerLostError` (exit 75): the budget stays reserved and ``train --resume`` continues.

Backends: gloo on CPU, nccl on CUDA (``LOCAL_RANK`` picks the GPU, `training.devices`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from personanet.errors import ConfigError, PersonaNetError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("personanet")

T = TypeVar("T")

#: seconds a collective waits for a silent peer before the run fails (a dead peer's
#: closed connection fails it at once)
TIMEOUT_ENV = "PERSONANET_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 300.0


class PeerLostError(PersonaNetError):
    """Another process of the run stopped or went silent (exit 75: retry with --resume)."""

    exit_code = 75


class RankFailedError(PersonaNetError):
    """A worker of a launched run failed; carries that worker's exit code."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class World:
    """This process's place in a run of `size` processes (rank 0 is the one that writes)."""

    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> World | None:
        """The world torchrun describes in the environment; None for a single process."""
        env = os.environ if environ is None else environ
        raw = {name: env.get(name, "").strip() for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        if not raw["WORLD_SIZE"]:
            return None
        try:
            size = int(raw["WORLD_SIZE"])
            rank = int(raw["RANK"])
            local = int(raw["LOCAL_RANK"] or rank)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK are not numbers: {raw}") from None
        if not 0 <= rank < size:
            raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {size}")
        return cls(rank=rank, size=size, local_rank=local) if size > 1 else None


def current() -> World | None:
    """The world of the process group this process has joined, or None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    rank, size = dist.get_rank(), dist.get_world_size()
    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


def world_size() -> int:
    """Processes in this run (1 outside a process group)."""
    world = current()
    return 1 if world is None else world.size


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} = {raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be positive")
    return value


@contextlib.contextmanager
def joined(world: World | None, device_name: str) -> Iterator[None]:
    """Join the run's process group for the block: gloo on CPU, nccl on CUDA (the GPU
    of ``LOCAL_RANK``, `resolve_device`)."""
    if world is None:
        yield
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from personanet.training.devices import resolve_device

    device = resolve_device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as exc:
        raise PeerLostError(f"rank {world.rank} could not join the other {world.size - 1} "
                            f"training process(es): {_first_line(exc)}") from None
    logger.debug("rank %d of %d joined (%s)", world.rank, world.size, backend)
    global _joined
    _joined = True
    try:
        yield
    except BaseException as exc:
        # No teardown of a group that lost a peer: gloo may abort in it (see below).
        _exit_quickly(int(getattr(exc, "exit_code", 70)))
        raise
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


#: whether this process joined a process group (`joined`): its exit skips C++ teardown
_joined = False


def leave_now(code: int) -> None:
    """End a process that joined a process group with `code`, without the interpreter's
    teardown; return (doing nothing) in any other process.

    Even after a clean run and `destroy_process_group`, gloo's threads may still hold work
    objects with tensors; freeing them while the interpreter finalises can abort the
    process (SIGABRT, "terminate called without an active exception": seen once in this
    project's test runs, on rank 1 after both replicas had checked their weights), and
    the launcher would then report a lost rank for a run that succeeded. Every file is closed
    and committed by then; the output streams are flushed here.
    """
    if not _joined:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _exit_quickly(code: int) -> None:
    """After a failed run, end the process at exit without C++ teardown.

    Once a peer is lost, gloo's threads can abort the interpreter's exit
    (SIGABRT, "terminate called without an active exception"), which would replace the
    documented exit code. By then the error has been printed and the files closed.
    """
    import atexit

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    atexit.register(leave)


def guarded(what: str, work: Callable[[], T]) -> T:
    """`work()`, a failed collective in it (a peer died, or timed out) made `PeerLostError`."""
    message = None
    try:
        return work()
    except RuntimeError as exc:
        if current() is None or not _from_collective(exc):
            raise
        # gloo's text opens with its source file: "[.../pair.cc:537] Read error ...".
        reason = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc)).split(". ")[0]
        message = (f"another training process stopped during {what} ({reason}); "
                   "the budget stays reserved: `personanet train --resume` continues from "
                   "the last checkpoint")
    # Raised after the handler, so that nothing (no __context__) keeps the failed
    # collective's frames alive: gloo aborts the process at exit if a failed work object
    # outlives its group.
    raise PeerLostError(message)


def _from_collective(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return (isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in text
            or "NCCL" in text or "Timed out" in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _device() -> torch.device:
    """Where collectives' tensors live: the GPU under nccl, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------- rank 0 decides


def broadcast_json(world: World, value: Any = None) -> Any:
    """Rank 0's `value` on every rank, as JSON bytes (no pickle crosses between processes)."""
    import torch
    import torch.distributed as dist

    device = _device()
    data = json.dumps(value).encode() if world.main else b""

    def exchange() -> torch.Tensor:
        length = torch.tensor([len(data)], dtype=torch.int64, device=device)
        dist.broadcast(length, 0)
        if world.main:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        else:
            buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.broadcast(buffer, 0)
        return buffer

    buffer = guarded("a broadcast from rank 0", exchange)
    return json.loads(bytes(buffer.cpu().numpy().tobytes())) if not world.main else value


def share(world: World | None, decide: Callable[[], Any]) -> Any:
    """`decide()` on rank 0, its JSON result on every rank; rank 0's error on every rank.

    Without a world, just `decide()`.
    """
    if world is None:
        return decide()
    if world.main:
        try:
            value = decide()
        except PersonaNetError as exc:
            broadcast_json(world, {"error": _first_line(exc), "exit_code": exc.exit_code})
            raise
        except BaseException as exc:
            with contextlib.suppress(PeerLostError):
                broadcast_json(world, {"error": _first_line(exc), "exit_code": 70})
            raise
        broadcast_json(world, {"value": value})
        return value
    message = broadcast_json(world)
    if "error" in message:
        raise RankFailedError(f"rank 0 stopped: {message['error']}",
                              exit_code=int(message["exit_code"]))
    return message["value"]


def barrier(world: World | None, what: str) -> None:
    """Wait until every rank got here (one that died fails it)."""
    if world is None:
        return
    import torch.distributed as dist

    guarded(what, dist.barrier)


# --------------------------------------------------------------------- training parts


def wrap_for_dp(model: torch.nn.Module) -> torch.nn.Module:
    """Opacus' DPDDP around `model` in a process group (rank 0's weights everywhere), which
    tells `PrivacyEngine` to use its distributed sampler and optimizer; else `model`."""
    if current() is None:
        return model
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    return guarded("the broadcast of the initial weights", lambda: DPDDP(model))


def keep_empty_batches(loader: Any) -> None:
    """Make Opacus' distributed Poisson sampler yield a rank's empty batch too.

    `DistributedUniformWithReplacementSampler` skips a step whose local batch came out
    empty. The ranks would then take different numbers of steps: a deadlock in the
    gradients' all-reduce, and steps taken that the accountant of the other ranks did
    not count. The single-process sampler yields empty batches; this does the same.
    """
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

    sampler = getattr(loader, "batch_sampler", None)
    if type(sampler) is DistributedUniformWithReplacementSampler:
        sampler.__class__ = every_step_sampler()


_EVERY_STEP: list[type] = []


def every_step_sampler() -> type:
    """Opacus' distributed Poisson sampler, yielding a rank's empty batch too (the class
    is made on first use: Opacus imports torch)."""
    if _EVERY_STEP:
        return _EVERY_STEP[0]
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

    class EveryStepSampler(DistributedUniformWithReplacementSampler):  # type: ignore[misc]
        def __iter__(self) -> Iterator[Any]:
            import torch

            order = torch.Generator().manual_seed(self.shuffle_seed + self.epoch)
            # The split of rows between ranks is public (a fixed permutation); which of
            # its rows a rank takes each step is the secret Poisson draw.
            indices = torch.randperm(self.total_size, generator=order)
            indices = indices[self.rank:self.total_size:self.num_replicas]
            for _ in range(self.num_batches):
                mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
                yield indices[mask.nonzero(as_tuple=False).reshape(-1)].tolist()

    _EVERY_STEP.append(EveryStepSampler)
    return EveryStepSampler


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks (unchanged in a single process)."""
    world = current()
    if world is None:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    guarded("an epoch's figures", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
    return [float(v) for v in tensor.cpu()]


def sum_gradients(model: torch.nn.Module, rows: int) -> int:
    """A run without DP: every parameter's gradient summed over the ranks; returns the rows
    of the step on all ranks together (a rank without rows adds zeros)."""
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    device = _device()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params] + [torch.zeros(1, device=params[0].device) + rows])
    flat = flat.to(device)
    guarded("the gradients' all-reduce",
            lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
    offset = 0
    for p in params:
        count = p.numel()
        p.grad = flat[offset:offset + count].view_as(p).to(p.device).clone()
        offset += count
    return int(round(float(flat[-1])))


def check_replicas(world: World | None, weights: dict[str, torch.Tensor]) -> str:
    """The sha256 of the weights, checked equal on every rank (InternalError otherwise)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    mine = digest.hexdigest()
    logger.debug("replica weights sha256 %s (rank %s)", mine,
                 0 if world is None else world.rank)
    if world is None:
        return mine
    agreed = sum_over_ranks(float(broadcast_json(world, mine) != mine))[0]
    if agreed:
        from personanet.errors import InternalError

        raise InternalError(f"the {world.size} training processes ended with different "
                            "weights; nothing was committed")
    return mine
