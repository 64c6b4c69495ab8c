"""The `personanet` command line: a thin Typer shell over the library.

Each command parses options, opens the config, key and store the global
options name (`context`), calls one library function and prints its result
(`output`). Errors become one line on stderr and a sysexits code (see
`personanet.errors` and the README's exit codes); tracebacks only with
--debug. Nothing heavy (torch, opacus, polars) is imported at module level
here or in the command modules, so `--help` is fast.

- `stage_commands`: collect, clean, train, evaluate, predict, run
- `serve_commands`: serve (the scoring service of `personanet.serving`)
- `artifact_commands`, `key_commands`, `budget_commands`: the sub-apps
  `artifacts`, `keys` and `budget`
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import typer

from personanet import __version__
from personanet.cli import (
    artifact_commands,
    budget_commands,
    context,
    key_commands,
    serve_commands,
    stage_commands,
    tune_commands,
)
from personanet.errors import InternalError, PersonaNetError, UsageError

#: options accepted before or after the command name (hoisted before parsing)
GLOBAL_FLAGS = ("--json", "--quiet", "-q", "--debug")
GLOBAL_VALUED = ("--config", "--artifacts", "--log-format", "--lock-timeout", "--set")

app = typer.Typer(
    name="personanet",
    help="Train models on personal records without leaking the people in them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(artifact_commands.app, name="artifacts")
app.add_typer(key_commands.app, name="keys")
app.add_typer(budget_commands.app, name="budget")
for _command in stage_commands.COMMANDS:
    app.command()(_command)
app.command()(serve_commands.serve)
app.command()(tune_commands.tune)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"personanet {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _global(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", envvar="PERSONANET_CONFIG",
                                help="TOML config of the dataset and pipeline.",
                                show_default=False),
    artifacts: Path = typer.Option(Path("artifacts"), "--artifacts",
                                   envvar="PERSONANET_ARTIFACTS", help="Artifact root."),
    json_output: bool = typer.Option(False, "--json",
                                     help="Print exactly one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Tracebacks for errors."),
    log_format: str = typer.Option("text", "--log-format", envvar="PERSONANET_LOG_FORMAT",
                                   help="stderr log lines: text or json."),
    lock_timeout: float = typer.Option(60.0, "--lock-timeout", envvar="PERSONANET_LOCK_TIMEOUT",
                                       help="Seconds to wait for the artifact root's lock "
                                            "before exiting 75."),
    overrides: list[str] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                        help="Override a config key, typed and checked like "
                                             "the file (repeatable): --set train.epsilon=3."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 is_eager=True, callback=lambda v: _print_version(v)),
) -> None:
    """Train models on personal records without leaking the people in them.

    Example:

        personanet keys generate ~/.personanet.key

        export PERSONANET_KEY_FILE=~/.personanet.key

        personanet --config configs/persona.toml run
    """
    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format must be text or json, not {log_format!r}")
    options = context.options
    options.config = config
    options.artifacts = artifacts
    options.json = json_output
    options.quiet = quiet
    options.debug = debug
    options.log_format = log_format
    options.lock_timeout = lock_timeout
    options.overrides = list(overrides or [])
    options.command = ctx.invoked_subcommand or ""
    context.setup_logging()
    from personanet import ui

    ui.configure(quiet=quiet)


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options found after the command name to the front.

    So `personanet collect --json` means `personanet --json collect`.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest.extend(argv[i:])
            break
        name = word.split("=", 1)[0]
        if word in GLOBAL_FLAGS or name in GLOBAL_VALUED and "=" in word:
            front.append(word)
        elif word in GLOBAL_VALUED and i + 1 < len(argv):
            front.extend(argv[i:i + 2])
            i += 1
        else:
            rest.append(word)
        i += 1
    return front + rest


def run_cli(argv: list[str]) -> int:
    """Run one command; returns its exit status (never raises for user errors)."""
    context.options = context.Options()
    argv = hoist_global_options(argv)
    context.options.json = "--json" in argv
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="personanet", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        sys.stderr.write("personanet: aborted\n")
        return 130
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stderr.write(exc.format_message() + "\n")
            return 2
        # Usage errors from the parser: one line, exit 2.
        hint = _config_key_hint(getattr(exc, "option_name", None) or "")
        _print_error(UsageError(f"{exc.format_message()} ({hint or 'see `personanet --help`'})"),
                     2)
        return 2
    except PersonaNetError as exc:
        if context.options.debug:
            traceback.print_exc()
        _print_error(exc, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("personanet: interrupted\n")
        return 130
    except MemoryError as exc:
        _print_error(InternalError(f"out of memory: {exc}"), 70)
        return 70
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        if context.options.debug:
            traceback.print_exc()
        _print_error(InternalError(f"internal error ({type(exc).__name__}: {exc}); rerun with "
                                   "--debug for a traceback and report it"), 70)
        return 70
    return result if isinstance(result, int) else 0


def main() -> NoReturn:
    code = run_cli(sys.argv[1:])
    # A training worker of several processes ends without C++ teardown (gloo may abort it).
    distributed = sys.modules.get("personanet.training.distributed")
    if distributed is not None:
        distributed.leave_now(code)
    sys.exit(code)


def _print_error(exc: BaseException, code: int) -> None:
    """One line on stderr (text or JSON); with --json also the one object on stdout."""
    options = context.options
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if options.log_format == "json":
        sys.stderr.write(json.dumps({"level": "error", "message": message, "exit_code": code},
                                    ensure_ascii=False) + "\n")
    else:
        sys.stderr.write(f"personanet: error: {message}\n")
    if options.json:
        payload = {"stage": options.command or None,
                   **getattr(exc, "payload", {}), "error": message, "exit_code": code}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")


def _config_key_hint(option: str) -> str:
    """`train --epsilon 3` is a config key used as an option: point at `--set`."""
    from personanet.config import keys_named

    keys = keys_named(option.lstrip("-").replace("-", "_"))
    if not keys:
        return ""
    return "a config key: " + " or ".join(f"--set {k}=VALUE" for k in keys)
