"""The launcher: `personanet train --nproc-per-node N` starts its workers through torchrun.

`torch.distributed.run` (the code behind ``torchrun``) starts ``python -m personanet
...`` once per local rank with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set, watches
them (a worker that dies takes the others down: no hang) and reports the first failure,
whose exit code becomes this command's. The same workers start under a plain
``torchrun --nproc-per-node N -m personanet train``; what they do is
`personanet.training.distributed`.
"""

from __future__ import annotations

import logging
import os

from personanet.errors import ConfigError
from personanet.training.distributed import PeerLostError, RankFailedError

logger = logging.getLogger("personanet")



def launch(worker_args: list[str], *, nproc_per_node: int, nnodes: int = 1,
           node_rank: int = 0, rdzv_endpoint: str | None = None,
           debug: bool = False) -> None:
    """Run ``python -m personanet WORKER_ARGS`` in `nproc_per_node` processes on this
    machine, through `torch.distributed.run` (torchrun), and wait for them.

    One machine: a standalone rendezvous on a free local port. Several: torchrun's
    static rendezvous, node 0 listening at `rdzv_endpoint`; each machine runs the same
    command with its own `node_rank`.

    Raises:
        ConfigError: (78) the flags do not describe a run.
        RankFailedError: a worker failed: its exit code (or 75 for one killed by a
            signal, whose run `--resume` continues).
    """
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError("need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank "
                          "< --nnodes")
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, "
                          "reachable from every node)")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes),
            "--max-restarts", "0"]
    if rdzv_endpoint:
        args += ["--node-rank", str(node_rank), "--rdzv-endpoint", rdzv_endpoint]
    else:
        args += ["--standalone"]
    # torchrun's own default for several workers a machine, set here without its banner
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not debug:
        # the agent's own report of a failed worker repeats that worker's error
        for name in ("torch.distributed.elastic", "torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logger.info("training in %d process(es) on this machine, %d machine(s) in all",
                nproc_per_node, nnodes)
    try:
        run(parse_args([*args, "--module", "personanet", *worker_args]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = int(failure.exitcode)
        if code > 0:
            raise RankFailedError(f"training process rank {rank} exited with {code} "
                                  "(its error is above)", exit_code=code) from None
        raise PeerLostError(f"training process rank {rank} was killed (signal {-code}); "
                            "the budget stays reserved: `personanet train --resume` continues "
                            "from the last checkpoint") from None
