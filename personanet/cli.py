"""The `personanet` command line: a thin Typer shell over the stage functions.

Each command parses options, loads the config, key and store, calls one
library function and prints its result. Errors become one line on stderr and
a sysexits code (SPEC section 1); tracebacks only with --debug. Nothing heavy
(torch, opacus, polars) is imported here at module level, so `--help` is fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from personanet import __version__
from personanet.errors import ConfigError, InternalError, PersonaNetError, UsageError

if TYPE_CHECKING:
    from personanet.config import Config
    from personanet.stages.base import StageResult
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.crypto import MasterKey

log = logging.getLogger("personanet")

#: the figures `run`'s summary table shows per stage
HEADLINES = {
    "collect": ("rows", "columns_dropped"),
    "clean": ("rows_train", "rows_test", "duplicates_removed", "rows_quarantined",
              "rows_dropped_by_bounding"),
    "train": ("private", "epsilon", "delta", "steps", "final_loss", "device"),
    "evaluate": ("accuracy", "roc_auc", "largest_group_gap", "attack_auc",
                 "epsilon_lower_bound", "gates_failed"),
    "predict": ("rows_scored", "rows_rejected", "model_private"),
}
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
artifacts_app = typer.Typer(help="List, inspect, export, verify and garbage-collect artifacts.",
                            no_args_is_help=True)
keys_app = typer.Typer(help="Create and rotate master keys.", no_args_is_help=True)
budget_app = typer.Typer(help="The per-dataset privacy budget ledger.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(keys_app, name="keys")
app.add_typer(budget_app, name="budget")


@dataclass
class Options:
    config: Path | None = None
    artifacts: Path = Path("artifacts")
    json: bool = False
    quiet: bool = False
    debug: bool = False
    log_format: str = "text"
    lock_timeout: float = 60.0
    command: str = ""
    overrides: list[str] = field(default_factory=list)


_options = Options()


# ------------------------------------------------------------------ plumbing


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"personanet: {prefix}{record.getMessage()}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z",
                 "level": record.levelname.lower(), "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (tests and embedders swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(opts: Options) -> None:
    import time

    handler = _StderrHandler()
    formatter = _JsonFormatter() if opts.log_format == "json" else _TextFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.propagate = False
    # Library warnings (Opacus, polars) go through the same handler: one format on stderr.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.propagate = False
    level = logging.DEBUG if opts.debug else logging.ERROR if opts.quiet else logging.INFO
    log.setLevel(level)
    # --quiet means errors only: library warnings (Opacus' RuntimeWarnings) included.
    warnings_log.setLevel(level)


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


def _print_error(exc: BaseException, code: int) -> None:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _options.log_format == "json":
        sys.stderr.write(json.dumps({"level": "error", "message": message, "exit_code": code},
                                    ensure_ascii=False) + "\n")
    else:
        sys.stderr.write(f"personanet: error: {message}\n")
    if _options.json:
        payload = {"stage": _options.command or None,
                   **getattr(exc, "payload", {}), "error": message, "exit_code": code}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")


def run_cli(argv: list[str]) -> int:
    """Run one command; returns its exit status (never raises for user errors)."""
    global _options
    _options = Options()
    argv = hoist_global_options(argv)
    _options.json = "--json" in argv
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
        if _options.debug:
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
        if _options.debug:
            traceback.print_exc()
        _print_error(InternalError(f"internal error ({type(exc).__name__}: {exc}); rerun with "
                                   "--debug for a traceback and report it"), 70)
        return 70
    return result if isinstance(result, int) else 0


def _config_key_hint(option: str) -> str:
    """`train --epsilon 3` is a config key used as an option: point at `--set`."""
    import dataclasses

    from personanet import config as schema

    name = option.lstrip("-").replace("-", "_")
    if not name:
        return ""
    sections = {"dataset": schema.DatasetConfig, "clean": schema.CleanConfig,
                "train": schema.TrainConfig, "budget": schema.BudgetConfig,
                "evaluate": schema.EvaluateConfig, "predict": schema.PredictConfig}
    keys = [f"{section}.{f.name}" for section, cls in sections.items()
            for f in dataclasses.fields(cls) if f.name == name]
    if not keys:
        return ""
    return "a config key: " + " or ".join(f"--set {k}=VALUE" for k in keys)


def main() -> NoReturn:
    sys.exit(run_cli(sys.argv[1:]))


def _config() -> Config:
    from personanet.config import load_config

    if _options.config is None:
        raise ConfigError("no config: pass --config PATH or set PERSONANET_CONFIG")
    return load_config(_options.config, _options.overrides)


def _store(config: Config) -> ArtifactStore:
    from personanet.store.artifacts import ArtifactStore

    return ArtifactStore(_options.artifacts, config.dataset.name,
                         lock_timeout=_options.lock_timeout)


def _key() -> MasterKey:
    from personanet.store.crypto import load_master_key

    return load_master_key()


def _emit(results: list[StageResult] | StageResult, *, extra: dict[str, Any] | None = None
          ) -> None:
    """stdout: one JSON object (--json) or one line per stage; the table goes to stderr."""
    items = results if isinstance(results, list) else [results]
    if _options.json:
        if len(items) == 1 and not extra:
            payload = items[0].to_json()
        else:
            payload = {"stage": _options.command, "stages": [r.to_json() for r in items],
                       **(extra or {})}
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")
        return
    for r in items:
        reused = "reused" if r.reused else "new"
        rows = r.figures.get("rows")
        figures = f" rows={rows}" if rows is not None else ""
        sys.stdout.write(f"{r.stage} {r.version} {reused}{figures} {r.path}\n")
    if not _options.quiet and _options.log_format == "text":
        _render_summary(items)


def _render_summary(items: list[StageResult]) -> None:
    """A stage's own view of its figures on stderr, or one table for several stages."""
    from rich.table import Table

    from personanet.ui import console

    if len(items) == 1:
        view = _stage_view(items[0])
        if view is not None:
            console().print(view)
            return

    table = Table(title="personanet", show_header=True, header_style="bold")
    for column in ("stage", "version", "reused", "figures"):
        table.add_column(column)
    for r in items:
        names = HEADLINES.get(r.stage, ())
        shown = {k: r.figures[k] for k in names if r.figures.get(k) not in (None, [], {})}
        table.add_row(r.stage, r.version, "yes" if r.reused else "no",
                      ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
    console().print(table)


def _stage_view(result: StageResult) -> Any:
    if result.stage == "clean":
        from personanet.stages.clean import render_report

        return render_report(result.figures)
    if result.stage == "evaluate":
        from personanet.reporting.report import render_summary

        return render_summary(json.loads((result.path / "metrics.json").read_text("utf-8")))
    return None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ global options


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
    _options.config = config
    _options.artifacts = artifacts
    _options.json = json_output
    _options.quiet = quiet
    _options.debug = debug
    _options.log_format = log_format
    _options.lock_timeout = lock_timeout
    _options.overrides = list(overrides or [])
    _options.command = ctx.invoked_subcommand or ""
    _setup_logging(_options)
    from personanet import ui

    ui.configure(quiet=quiet)


# ------------------------------------------------------------------ stages


@app.command()
def collect(
    source: list[str] = typer.Option(None, "--source", help="File or glob to read instead of "
                                     "dataset.source (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
) -> None:
    """Read raw records into a new encrypted `collect` artifact.

    Example:

        personanet --config configs/persona.toml collect --source exports/2026-*.csv.gz
    """
    from personanet.stages.collect import collect as run_collect

    config = _config()
    _emit(run_collect(config, _store(config), _key(), sources=source or None, force=force))


@app.command()
def clean(
    input_version: str = typer.Option(None, "--input", help="collect version (default: newest)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
) -> None:
    """Dedupe, denoise, impute, pseudonymize, bound contributions and split.

    Example:

        personanet --config configs/persona.toml clean
    """
    from personanet.stages.clean import clean as run_clean

    config = _config()
    _emit(run_clean(config, _store(config), _key(), input_version=input_version, force=force))


@app.command()
def train(
    input_version: str = typer.Option(None, "--input", help="clean version (default: newest)."),
    force: bool = typer.Option(False, "--force", help="Retrain even if identical (spends budget)."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train without privacy, for comparison "
                               "only (the artifact is marked non-private)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps "
                               "(default: train.device)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last "
                                "checkpoint."),
) -> None:
    """Train PersonaNet under differential privacy (Opacus DP-SGD).

    Example:

        personanet --config configs/persona.toml train --device auto
    """
    from personanet.stages.train import train as run_train

    config = _config()
    _emit(run_train(config, _store(config), _key(), input_version=input_version, force=force,
                    no_dp=no_dp, device=device, resume=resume))


@app.command()
def evaluate(
    model: str = typer.Option(None, "--model", help="train version (default: newest)."),
    input_version: str = typer.Option(None, "--input", help="clean version (default: the "
                                      "model's own)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if identical."),
) -> None:
    """Measure utility, fairness per group and membership-inference leakage.

    Example:

        personanet --config configs/persona.toml evaluate
    """
    from personanet.stages.evaluate import evaluate as run_evaluate

    config = _config()
    _emit(run_evaluate(config, _store(config), _key(), model_version=model,
                       input_version=input_version, force=force))


@app.command()
def predict(
    source: str = typer.Option(None, "--input", help="CSV/CSV.gz/Parquet/NDJSON file to score "
                               "(default: predict.source)."),
    clean_version: str = typer.Option(None, "--clean", help="Score a clean artifact's test "
                                      "split instead of a file."),
    model: str = typer.Option(None, "--model", help="train version (default: newest)."),
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

    config = _config()
    _emit(run_predict(config, _store(config), _key(), source=source, clean_version=clean_version,
                      model_version=model, output=output, plaintext_output=plaintext_output,
                      device=device, force=force))


@app.command()
def run(
    force: str = typer.Option(None, "--force", help="Recompute from this stage on "
                              "(collect, clean, train, evaluate, predict)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Run every stage in order, reusing identical earlier artifacts.

    Example:

        personanet --config configs/persona.toml run
    """
    from personanet.stages.pipeline import run_pipeline

    config = _config()
    results = run_pipeline(config, _store(config), _key(), force_from=force, device=device)
    _emit(results)
    return None


# ------------------------------------------------------------------ artifacts


@artifacts_app.command("list")
def artifacts_list(
    stage: str = typer.Option(None, "--stage", help="Only this stage."),
) -> None:
    """List complete artifacts, oldest first.

    Example:

        personanet --config configs/persona.toml artifacts list --stage train
    """
    from personanet.store.artifacts import STAGES

    if stage is not None and stage not in STAGES:
        raise UsageError(f"--stage must be one of {', '.join(STAGES)}")
    rows = [
        {"dataset": a.dataset, "stage": a.stage, "version": a.version,
         "created_at": a.created_at, "path": str(a.path)}
        for store in _stores() for s in ([stage] if stage else STAGES)
        for a in store.versions(s)
    ]
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "artifacts", "artifacts": rows}) + "\n")
        return
    for row in rows:
        sys.stdout.write(f"{row['dataset']}\t{row['stage']}\t{row['version']}\t"
                         f"{row['created_at']}\n")


def _stores() -> list[ArtifactStore]:
    """The configured dataset's store, or every dataset under the root without a config."""
    from personanet.store.artifacts import ArtifactStore

    if _options.config is not None:
        return [_store(_config())]
    root = _options.artifacts
    if not root.is_dir():
        return []
    return [ArtifactStore(root, d.name, lock_timeout=_options.lock_timeout)
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]


@artifacts_app.command("show")
def artifacts_show(version: str = typer.Argument(..., help="Version id (or a unique prefix).")
                   ) -> None:
    """Print an artifact's manifest.

    Example:

        personanet artifacts show 20261125T180102
    """
    from personanet.errors import InputMissingError

    for store in _stores():
        try:
            artifact = store.find(version)
        except InputMissingError:
            continue
        sys.stdout.write(json.dumps(artifact.manifest, indent=None if _options.json else 2) + "\n")
        return
    raise InputMissingError(f"no artifact {version!r} under {_options.artifacts}")


@artifacts_app.command("export")
def artifacts_export(
    version: str = typer.Argument(..., help="Version id (or a unique prefix)."),
    file: str = typer.Argument(..., help="Encrypted table of that artifact, e.g. "
                               "predictions.csv.enc, rejects.csv.enc, quarantine.parquet.enc."),
    output: str = typer.Option(..., "--output", help="PATH.csv or PATH.parquet (never "
                               "overwritten), or - for CSV on stdout."),
    plaintext_output: bool = typer.Option(False, "--plaintext-output", help="Required: the "
                                          "output is record-level data in plaintext."),
) -> None:
    """Decrypt an artifact's table to a plaintext CSV or Parquet file you asked for.

    Example:

        personanet artifacts export 20261125T180250 rejects.csv.enc --output rejects.csv
        --plaintext-output
    """
    from dataclasses import asdict

    from personanet.errors import InputMissingError
    from personanet.stages.export import STDOUT, check_request, export_table

    check_request(output, plaintext_output=plaintext_output)
    if output == STDOUT and _options.json:
        raise UsageError("--output - writes the table to stdout, where --json writes its "
                         "object: use one or the other")
    from personanet.stages.base import require_key

    key = _key()
    for store in _stores():
        require_key(store, key)  # binds the key, so the manifest's seal is checked below
        try:
            artifact = store.checked(store.find(version))
        except InputMissingError:
            continue
        report = export_table(artifact, file, key, output, plaintext_output=plaintext_output)
        if _options.json:
            sys.stdout.write(json.dumps({"stage": "export", **asdict(report)}) + "\n")
        elif output != STDOUT:
            sys.stdout.write(f"exported {report.rows} rows of {report.file} to {report.output}\n")
        return
    raise InputMissingError(f"no artifact {version!r} under {_options.artifacts}")


@artifacts_app.command("verify")
def artifacts_verify(version: str = typer.Argument(None, help="Only this version.")) -> None:
    """Check every file's sha256 and authenticate every encrypted file end to end.

    Exit 0 when everything holds, 65 naming the first bad file.

    Example:

        personanet artifacts verify
    """
    from dataclasses import asdict

    from personanet.stages.housekeeping import verify

    report = verify(_stores(), _key(), version=version)
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "verify", "ok": True, **asdict(report)}) + "\n")
    else:
        sys.stdout.write(f"ok: {report.artifacts} artifacts, {report.files} files "
                         f"({report.encrypted_files} encrypted) verified\n")


@artifacts_app.command("seal")
def artifacts_seal() -> None:
    """Adopt manifests written before manifests were sealed, after checking every file.

    Every file is checked against its manifest and every encrypted file authenticated
    end to end under the current key; only then is the manifest sealed (logged one by
    one). Already sealed manifests are checked, not re-sealed. Seal a root you trust:
    a plaintext file forged together with its checksum before adoption cannot be told.

    Example:

        personanet artifacts seal
    """
    from dataclasses import asdict

    from personanet.stages.housekeeping import seal

    report = seal(_stores(), _key())
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "seal", **asdict(report)}) + "\n")
    else:
        sys.stdout.write(f"sealed {len(report.sealed)} manifests under key {report.key_id} "
                         f"({report.already_sealed} already sealed)\n")


@artifacts_app.command("gc")
def artifacts_gc(
    keep: int = typer.Option(..., "--keep", help="Versions to keep per stage."),
    yes: bool = typer.Option(False, "--yes", help="Delete (default: dry run)."),
) -> None:
    """Remove old versions that no kept artifact depends on (dry run unless --yes).

    The budget ledger is never touched: spent privacy stays spent.

    Example:

        personanet artifacts gc --keep 3 --yes
    """
    from dataclasses import asdict

    from personanet.stages.housekeeping import gc

    plans = {store.dataset: gc(store, keep=keep, yes=yes) for store in _stores()}
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "gc", "dry_run": not yes,
                                     "datasets": {k: asdict(v) for k, v in plans.items()}})
                         + "\n")
        return
    verb = "removed" if yes else "would remove"
    for dataset, plan in plans.items():
        for item in plan.remove:
            sys.stdout.write(f"{verb} {dataset}/{item}\n")
        sys.stdout.write(f"{dataset}: keep {len(plan.keep)}, {verb} {len(plan.remove)} "
                         f"({plan.bytes_freed} bytes)\n")
    if not yes:
        log.info("dry run: add --yes to delete")


# ------------------------------------------------------------------ keys, budget


@keys_app.command("generate")
def keys_generate(path: Path = typer.Argument(..., help="Where to write the new key (0600).")
                  ) -> None:
    """Write a new random master key to PATH, readable by you only.

    Example:

        personanet keys generate ~/.config/personanet/master.key
    """
    from personanet.store.crypto import MasterKey, write_key_file

    key = MasterKey.generate()
    write_key_file(path, key)
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "keys", "path": str(path),
                                     "key_id": key.key_id}) + "\n")
    else:
        sys.stdout.write(f"wrote key {key.key_id} to {path}\n")
        log.info("export PERSONANET_KEY_FILE=%s", path)


@keys_app.command("rotate")
def keys_rotate(
    new_key_file: Path = typer.Option(..., "--new-key-file", envvar="PERSONANET_NEW_KEY_FILE",
                                      help="Key file made by `keys generate` (the key itself "
                                           "never goes on the command line)."),
) -> None:
    """Re-wrap every data key under a new master key (payloads are not rewritten).

    The current key comes from PERSONANET_KEY_FILE / PERSONANET_KEY as usual. Safe to
    re-run after an interruption: files already under the new key are skipped.

    Example:

        personanet keys generate new.key

        personanet keys rotate --new-key-file new.key

        export PERSONANET_KEY_FILE=new.key
    """
    from dataclasses import asdict

    from personanet.stages.housekeeping import rotate
    from personanet.store.crypto import load_master_key

    new = load_master_key({"PERSONANET_KEY_FILE": str(new_key_file)})
    report = rotate(_options.artifacts, _key(), new, lock_timeout=_options.lock_timeout)
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "keys", **asdict(report)}) + "\n")
    else:
        sys.stdout.write(f"rotated {report.files_rewrapped} files from key {report.old_key_id} "
                         f"to {report.new_key_id} ({report.files_already_rotated} already "
                         "rotated)\n")
        log.info("now use the new key: export PERSONANET_KEY_FILE=%s", new_key_file)


@budget_app.command("show")
def budget_show() -> None:
    """Print the dataset's privacy budget: pinned, spent, reserved, remaining, its changes
    and every run.

    With a key (PERSONANET_KEY_FILE / PERSONANET_KEY) the ledger's seal is checked (exit 65
    if it was edited); without one it is shown as read, marked unauthenticated.

    Example:

        personanet --config configs/persona.toml budget show
    """
    from personanet.privacy import budget_summary, render_budget

    config = _config()
    summary = budget_summary(config, _store(config), _optional_key())
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "budget", **summary}, default=str) + "\n")
        return
    from personanet.ui import console

    console(stdout=True).print(render_budget(summary))


@budget_app.command("set")
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

    config = _config()
    store = _store(config)
    key = _key()
    require_key(store, key)  # the root's own key, never a second one
    change = Ledger(store, key).set_budget(
        epsilon=epsilon, delta=delta, reason=reason, config_epsilon=config.budget.epsilon,
        config_delta=config.budget.delta)
    if _options.json:
        sys.stdout.write(json.dumps({"stage": "budget", "dataset": store.dataset, **change})
                         + "\n")
        return
    sys.stdout.write(f"budget of {store.dataset} {change['action']}: epsilon "
                     f"{change['epsilon']:g}, delta {change['delta']:g}\n")


def _optional_key() -> MasterKey | None:
    """The master key when one is configured (its errors are real errors), else None."""
    if not (os.environ.get("PERSONANET_KEY_FILE") or os.environ.get("PERSONANET_KEY")):
        log.warning("no key loaded (PERSONANET_KEY_FILE): the budget ledger is shown "
                    "without checking its seal")
        return None
    return _key()


if os.environ.get("PERSONANET_DEBUG_IMPORTS"):  # pragma: no cover - diagnostics only
    sys.stderr.write(f"loaded {__name__}\n")
