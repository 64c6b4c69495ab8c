"""`personanet budget ...`: show the dataset's privacy budget ledger, and change its pin."""

from __future__ import annotations

import json
import sys

import typer

from personanet.cli import context

app = typer.Typer(help="The per-dataset privacy budget ledger.", no_args_is_help=True)


@app.command("show")
def budget_show() -> None:
    """Print the dataset's privacy budget: pinned, spent, reserved, remaining, its changes
    and every run.

    With a key (PERSONANET_KEY_FILE / PERSONANET_KEY) the ledger's seal is checked (exit 65
    if it was edited); without one it is shown as read, marked unauthenticated.

    Example:

        personanet --config configs/persona.toml budget show
    """
    from personanet.privacy.ledger import budget_summary
    from personanet.reporting.budget import render_budget

    config = context.load_config()
    summary = budget_summary(config, context.open_store(config), context.load_key_if_configured())
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "budget", **summary}, default=str) + "\n")
        return
    from personanet.ui import console

    console(stdout=True).print(render_budget(summary))


@app.command("set")
def budget_set(
    epsilon: float = typer.Option(..., "--epsilon", help="New total epsilon of the dataset."),
    delta: float = typer.Option(None, "--delta", help="New total delta (default: unchanged)."),
    reason: str = typer.Option(None, "--reason", help="Why; required to raise the budget, "
                               "recorded in the ledger."),
) -> None:
    """Change the dataset's pinned privacy budget (logged in the ledger).

    The budget is pinned in the ledger at the first training run; a config asking for more
    is refused (exit 69) until the pin is raised here. Raising needs --reason; lowering is
    always allowed. Each change is appended to the ledger with its time and key id; the
    key (PERSONANET_KEY_FILE) is required, so only a key holder can change the budget.

    Example:

        personanet budget set --epsilon 20 --reason "approved by the DPO, ticket 1234"
    """
    from personanet.privacy import Ledger
    from personanet.stages.base import require_key

    config = context.load_config()
    store = context.open_store(config)
    key = context.load_key()
    require_key(store, key)  # the root's own key, never a second one
    change = Ledger(store, key).set_budget(
        epsilon=epsilon, delta=delta, reason=reason, config_epsilon=config.budget.epsilon,
        config_delta=config.budget.delta)
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "budget", "dataset": store.dataset, **change})
                         + "\n")
        return
    sys.stdout.write(f"budget of {store.dataset} {change['action']}: epsilon "
                     f"{change['epsilon']:g}, delta {change['delta']:g}\n")
