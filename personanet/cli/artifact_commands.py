"""`personanet artifacts ...`: list, show, export, verify, seal and garbage-collect artifacts.

Without --config these act on every dataset under the artifact root.
"""

from __future__ import annotations

import json
import logging
import sys

import typer

from personanet.cli import context
from personanet.errors import UsageError

log = logging.getLogger("personanet")

app = typer.Typer(help="List, inspect, export, verify and garbage-collect artifacts.",
                  no_args_is_help=True)


@app.command("list")
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
        for store in context.open_stores() for s in ([stage] if stage else STAGES)
        for a in store.versions(s)
    ]
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "artifacts", "artifacts": rows}) + "\n")
        return
    for row in rows:
        sys.stdout.write(f"{row['dataset']}\t{row['stage']}\t{row['version']}\t"
                         f"{row['created_at']}\n")


@app.command("show")
def artifacts_show(version: str = typer.Argument(..., help="Version id (or a unique prefix).")
                   ) -> None:
    """Print an artifact's manifest.

    Example:

        personanet artifacts show 20261125T180102
    """
    artifact = context.find_artifact(version)
    indent = None if context.options.json else 2
    sys.stdout.write(json.dumps(artifact.manifest, indent=indent) + "\n")


@app.command("export")
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

    from personanet.stages.export import STDOUT, check_request, export_table

    check_request(output, plaintext_output=plaintext_output)
    if output == STDOUT and context.options.json:
        raise UsageError("--output - writes the table to stdout, where --json writes its "
                         "object: use one or the other")
    key = context.load_key()
    artifact = context.find_artifact(version, key=key)
    report = export_table(artifact, file, key, output, plaintext_output=plaintext_output)
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "export", **asdict(report)}) + "\n")
    elif output != STDOUT:
        sys.stdout.write(f"exported {report.rows} rows of {report.file} to {report.output}\n")


@app.command("verify")
def artifacts_verify(version: str = typer.Argument(None, help="Only this version.")) -> None:
    """Check every file's sha256 and authenticate every encrypted file end to end.

    Exit 0 when everything holds, 65 naming the first bad file.

    Example:

        personanet artifacts verify
    """
    from dataclasses import asdict

    from personanet.stages.housekeeping import verify

    report = verify(context.open_stores(), context.load_key(), version=version)
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "verify", "ok": True, **asdict(report)}) + "\n")
    else:
        sys.stdout.write(f"ok: {report.artifacts} artifacts, {report.files} files "
                         f"({report.encrypted_files} encrypted) verified\n")


@app.command("seal")
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

    report = seal(context.open_stores(), context.load_key())
    if context.options.json:
        sys.stdout.write(json.dumps({"stage": "seal", **asdict(report)}) + "\n")
    else:
        sys.stdout.write(f"sealed {len(report.sealed)} manifests under key {report.key_id} "
                         f"({report.already_sealed} already sealed)\n")


@app.command("gc")
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

    plans = {store.dataset: gc(store, keep=keep, yes=yes) for store in context.open_stores()}
    if context.options.json:
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
