"""The tune command: a private hyperparameter search, charged to the budget as one run.

Parses its options and hands them to `personanet.stages.tune.tune`, which holds every
decision (the search's charge, the trials, the winner).
"""

from __future__ import annotations

import typer

from personanet.cli import context
from personanet.cli.output import emit


def tune(
    input_version: str = typer.Option(
        None, "--input", help="clean version (default: the current config's chain's)."),
    force: bool = typer.Option(False, "--force", help="Search again even if identical "
                               "(spends budget again)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps "
                               "(default: train.device)."),
) -> None:
    """Search [tune]'s settings under DP; the best trial becomes a train artifact.

    A random number of DP-SGD trials (tune.trials, tune.trials_mean), each scored with a
    noisy count on held-out training people (never the test split); only the best is
    kept. The whole search is one ledger charge of tune.epsilon, reserved before the
    first trial (Papernot & Steinke's repeat-and-select bound, dp-accounting's
    RepeatAndSelectDpEvent). Exit 69 when it does not fit the budget.

    Example:

        personanet --config configs/persona.toml tune --set tune.epsilon=2
        personanet --config configs/persona.toml evaluate --model VERSION
    """
    from personanet.stages.tune import tune as run_tune

    config = context.load_config()
    emit(run_tune(config, context.open_store(config), context.load_key(),
                  input_version=input_version, force=force, device=device))
