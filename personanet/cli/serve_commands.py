"""The serve command: a trained model behind an HTTP JSON API on the loopback address.

Parses the options and hands them to `personanet.serving.server.serve`, which
holds every decision (which model, the token, the limits, reload).
"""

from __future__ import annotations

from pathlib import Path

import typer

from personanet.cli import context


def serve(
    model: str = typer.Option(None, "--model", help="train version (default: the config "
                              "chain's model that passed evaluate's gates)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback "
                             "by default; anything else wants TLS in front)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    allow_no_dp: bool = typer.Option(False, "--allow-no-dp", help="Serve a model trained "
                                     "without differential privacy (refused otherwise, 69)."),
    token_file: Path = typer.Option(None, "--token-file", help="File holding the bearer token "
                                    "(default: $PERSONANET_SERVE_TOKEN).", show_default=False),
    max_batch: int = typer.Option(1000, "--max-batch", min=1, help="Most records per request "
                                  "(more: 413)."),
    max_body: int = typer.Option(1_000_000, "--max-body", min=1, help="Largest request body "
                                 "in bytes (larger: 413)."),
    watch: float = typer.Option(None, "--watch", min=0.1, metavar="SECONDS",
                                help="Look for a newer gated model every SECONDS and swap "
                                "to it without dropping requests (as SIGHUP does).",
                                show_default=False),
) -> None:
    """Score records over HTTP: POST /v1/predict, GET /v1/model, GET /healthz.

    Every request needs `Authorization: Bearer TOKEN`; SIGHUP (or `--watch SECONDS`)
    swaps to a newer gated model without dropping requests.

    Example:

        PERSONANET_SERVE_TOKEN=$(openssl rand -hex 32) personanet --config
        configs/persona.toml serve --port 8000
    """
    from personanet.serving.app import Limits
    from personanet.serving.server import read_token
    from personanet.serving.server import serve as run_serve

    config = context.load_config()
    run_serve(config, context.open_store(config), context.load_key(),
              token=read_token(token_file), model_version=model, host=host, port=port,
              allow_no_dp=allow_no_dp, limits=Limits(max_body=max_body, max_batch=max_batch),
              watch_seconds=watch)
