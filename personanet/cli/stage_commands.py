"""The stage commands: collect, clean, train, evaluate, predict and run.

Each parses its options, opens the config, store and key the global options
name, calls one stage function of `personanet.stages` and hands its result to
`emit`. The same functions run from a notebook or a test with a `Config`, an
`ArtifactStore` and a `MasterKey`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from personanet.cli import context
from personanet.cli.output import emit


def collect(
    source: list[str] = typer.Option(None, "--source", help="File or glob to read instead of "
                                     "dataset.source (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
    incremental: bool = typer.Option(
        None, "--incremental/--full", show_default=False,
        help="--incremental: only new files, or database rows past the watermark, as a new "
             "version on top of the last collection; --full: everything again. Default: "
             "incremental once the last collection was."),
) -> None:
    """Read raw records into a new encrypted `collect` artifact.

    Example:

        personanet --config configs/persona.toml collect --source exports/2026-*.csv.gz

        personanet --config configs/db.toml collect --incremental   # cron, every day
    """
    from personanet.stages.collect import collect as run_collect

    config = context.load_config()
    emit(run_collect(config, context.open_store(config), context.load_key(),
                     sources=source or None, force=force, incremental=incremental))


def clean(
    input_version: str = typer.Option(
        None, "--input", help="collect version (default: the current config's chain's)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
) -> None:
    """Dedupe, denoise, impute, pseudonymize, bound contributions and split.

    Example:

        personanet --config configs/persona.toml clean
    """
    from personanet.stages.clean import clean as run_clean

    config = context.load_config()
    emit(run_clean(config, context.open_store(config), context.load_key(),
                   input_version=input_version, force=force))


def train(
    input_version: str = typer.Option(
        None, "--input", help="clean version (default: the current config's chain's)."),
    force: bool = typer.Option(False, "--force", help="Retrain even if identical (spends budget)."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train without privacy, for comparison "
                               "only (the artifact is marked non-private)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps "
                               "(default: train.device)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last "
                                "checkpoint."),
    nproc_per_node: int = typer.Option(None, "--nproc-per-node", help="Train in N processes "
                                       "on this machine (one per GPU; gloo on CPU), through "
                                       "torch's launcher (torchrun)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the run (with "
                               "--nproc-per-node)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's rank, 0 to "
                                  "--nnodes - 1 (node 0 writes the artifact)."),
    rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", metavar="HOST:PORT",
                                      help="Node 0's address, for --nnodes > 1."),
) -> None:
    """Train PersonaNet under differential privacy (Opacus DP-SGD).

    Example:

        personanet --config configs/persona.toml train --device auto

        personanet --config configs/persona.toml train --nproc-per-node 2
    """
    from personanet.cli import workers
    from personanet.errors import UsageError
    from personanet.training.distributed import World

    world = World.from_env()
    if nproc_per_node is None and (nnodes != 1 or node_rank or rdzv_endpoint):
        raise UsageError("--nnodes, --node-rank and --rdzv-endpoint need --nproc-per-node")
    if nproc_per_node is not None:
        if world is not None:
            raise UsageError("--nproc-per-node starts the workers itself: not inside torchrun")
        workers.launch_train(workers.train_argv(
            input_version=input_version, force=force, no_dp=no_dp, device=device,
            resume=resume), nproc_per_node=nproc_per_node, nnodes=nnodes,
            node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        return  # rank 0 printed the result
    from personanet.stages.train import train as run_train

    workers.quiet_unless_main(0 if world is None else world.rank)
    config = context.load_config()
    result = run_train(config, context.open_store(config), context.load_key(),
                       input_version=input_version, force=force, no_dp=no_dp, device=device,
                       resume=resume)
    if world is None or world.main:
        emit(result)


def evaluate(
    model: str = typer.Option(
        None, "--model", help="train version (default: the current config's chain's model)."),
    input_version: str = typer.Option(None, "--input", help="clean version (default: the "
                                      "model's own)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
) -> None:
    """Measure utility, fairness per group and membership-inference leakage.

    Example:

        personanet --config configs/persona.toml evaluate
    """
    from personanet.stages.evaluate import evaluate as run_evaluate

    config = context.load_config()
    emit(run_evaluate(config, context.open_store(config), context.load_key(), model_version=model,
                       input_version=input_version, force=force))


def predict(
    source: str = typer.Option(None, "--input", help="CSV/CSV.gz/Parquet/NDJSON file to score "
                               "(default: predict.source)."),
    clean_version: str = typer.Option(None, "--clean", help="Score a clean artifact's test "
                                      "split instead of a file."),
    model: str = typer.Option(
        None, "--model", help="train version (default: the current config's chain's model)."),
    output: Path = typer.Option(None, "--output", help="Also write the predictions here: "
                                "encrypted (a .csv/.parquet/.json name is refused without "
                                "--plaintext-output)."),
    plaintext_output: bool = typer.Option(False, "--plaintext-output", help="Write --output "
                                          "as plaintext CSV (predictions are about people)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
) -> None:
    """Score new records with a trained model, in streamed batches.

    Example:

        personanet --config configs/persona.toml predict --input data/persona_new.csv
    """
    from personanet.stages.predict import predict as run_predict

    config = context.load_config()
    emit(run_predict(config, context.open_store(config), context.load_key(), source=source,
                     clean_version=clean_version, model_version=model, output=output,
                     plaintext_output=plaintext_output, device=device, force=force))


def run(
    force: str = typer.Option(None, "--force", help="Recompute from this stage on "
                              "(collect, clean, train, evaluate, predict)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Run every stage in order, reusing identical earlier artifacts.

    Example:

        personanet --config configs/persona.toml run
    """
    from personanet.errors import UsageError
    from personanet.stages.pipeline import run_pipeline
    from personanet.training.distributed import World

    if World.from_env() is not None:  # every worker would collect, clean, evaluate...
        raise UsageError("`run` works in one process; only `train` runs in several "
                         "(`personanet train --nproc-per-node N`)")
    config = context.load_config()
    emit(run_pipeline(config, context.open_store(config), context.load_key(), force_from=force,
                      device=device))


#: registered on the app in this order (`personanet --help` lists them so)
COMMANDS = (collect, clean, train, evaluate, predict, run)
