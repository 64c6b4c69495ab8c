"""Workers of a run in several processes: the command line each one runs, and what it prints.

`personanet train --nproc-per-node N` re-runs this same command in N workers through
torch's launcher (`personanet.training.distributed.launch`). A worker's command line is
rebuilt from the parsed options, never copied from ``sys.argv``: the key reaches workers
only through the environment (``PERSONANET_KEY_FILE``), as it reached this process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from personanet.cli import context


def train_argv(*, input_version: str | None, force: bool, no_dp: bool, device: str | None,
               resume: bool) -> list[str]:
    """``--config ... train ...`` for a worker: this command without the launcher's flags."""
    options = context.options
    argv: list[str] = []
    if options.config is not None:
        argv += ["--config", str(Path(options.config).resolve())]
    argv += ["--artifacts", str(Path(options.artifacts).resolve()),
             "--log-format", options.log_format, "--lock-timeout", str(options.lock_timeout)]
    argv += [flag for flag, on in (("--json", options.json), ("--quiet", options.quiet),
                                   ("--debug", options.debug)) if on]
    for override in options.overrides:
        argv += ["--set", override]
    argv.append("train")
    if input_version:
        argv += ["--input", input_version]
    if device:
        argv += ["--device", device]
    argv += [flag for flag, on in (("--force", force), ("--no-dp", no_dp),
                                   ("--resume", resume)) if on]
    return argv


def quiet_unless_main(rank: int) -> None:
    """Ranks above 0 log errors only (rank 0 speaks for the run), unless --debug."""
    if rank == 0 or context.options.debug:
        return
    from personanet import ui

    logging.getLogger("personanet").setLevel(logging.ERROR)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    ui.configure(quiet=True)


def launch_train(argv: list[str], *, nproc_per_node: int, nnodes: int, node_rank: int,
                 rdzv_endpoint: str | None) -> None:
    """Run the workers; a worker's failure is this command's, with its exit code.

    The failed worker already printed its error (and, with --json, the one JSON object):
    this process adds a log line on stderr and nothing on stdout.
    """
    import typer

    from personanet.training.distributed import RankFailedError
    from personanet.training.launcher import launch

    try:
        launch(argv, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
               rdzv_endpoint=rdzv_endpoint, debug=context.options.debug)
    except RankFailedError as exc:
        logging.getLogger("personanet").error("%s", exc)
        raise typer.Exit(exc.exit_code) from None
