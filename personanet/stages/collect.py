"""collect: raw exports in, one encrypted record table out.

Reads CSV, CSV.gz, Parquet or NDJSON (files or globs), checks the columns
against the config, and writes the records, still as text, into an encrypted
Parquet inside a new `collect` artifact. Types are clean's business: collect
only refuses what it cannot read and never interprets a value.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from personanet.config import Config
from personanet.errors import BadInputError
from personanet.sources import Source, open_sources
from personanet.sources.images import status_column
from personanet.stages.base import StagePlan, StageResult, run_stage
from personanet.stages.files import RECORDS
from personanet.stages.lineage import collect_fingerprint
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore, ArtifactWriter
from personanet.store.keys import MasterKey
from personanet.ui import track

log = logging.getLogger("personanet")

#: rows read and encrypted at a time (about 20 MiB of text columns for the persona export)
BATCH_ROWS = 100_000


@dataclass
class SourceFile:
    path: str
    sha256: str
    bytes: int
    rows: int = 0


@dataclass
class CollectReport:
    """collect's figures: manifest, --json and the summary table show this same object."""

    rows: int = 0
    columns: list[str] = field(default_factory=list)
    #: columns in the source that the config does not name: not stored
    columns_dropped: list[str] = field(default_factory=list)
    #: optional (required = false) config columns absent from the source
    columns_absent: list[str] = field(default_factory=list)
    sources: list[SourceFile] = field(default_factory=list)
    key_id: str = ""


def collect(config: Config, store: ArtifactStore, key: MasterKey, *,
            sources: list[str] | None = None, force: bool = False,
            incremental: bool | None = None) -> StageResult:
    """Read the configured sources into a new encrypted `collect` artifact.

    `sources` (files or globs, relative to the working directory) replaces
    `dataset.source` (relative to the config file). An identical earlier
    artifact (same source bytes, same columns) is reused unless `force`.
    `incremental` True reads only what is new since the config's last collection
    (`personanet.stages.increments`), False everything; None: incrementally when
    the last collection was incremental.
    """
    return run_stage(store, key, lambda: _plan(config, key, sources, store, incremental),
                     force=force)


def _plan(config: Config, key: MasterKey, sources: list[str] | None,
          store: ArtifactStore, incremental: bool | None) -> StagePlan:
    """What collect would write: identified by the sources' bytes and the columns."""
    from personanet.stages import increments

    base = Path.cwd() if sources else config.base_dir
    opened = open_sources(sources or config.dataset.source, config.source, base=base,
                          columns=config.columns,
                          database=None if sources else config.dataset.database)
    part = increments.plan_collection(config, store, key, opened, patterns=sources,
                                      incremental=incremental)
    if part.nothing_new:
        return increments.reuse_parent(part)
    database = increments.database_plan(config, key, part, conform=_conform,
                                        report=CollectReport)
    if database is not None:
        return database
    opened = part.sources
    files = [SourceFile(**source.describe()) for source in opened]
    fp = collect_fingerprint(config, [source.fingerprint() for source in opened],
                             parent=part.parent_version)
    return StagePlan(
        "collect", fp, inputs=_inputs(files),
        config={"dataset": config.section("dataset"), "columns": sorted(config.columns),
                "source": config.section("source")},
        config_hash=config.section_hash("dataset", "columns", "source"),
        write=part.after(partial(_write, config, key, opened, files)))


def _write(config: Config, key: MasterKey, opened: list[Source], files: list[SourceFile],
           writer: ArtifactWriter) -> None:
    """Read every source, keep the configured columns, write them encrypted."""
    report = CollectReport(sources=files, key_id=key.key_id)

    def conformed() -> Iterator[Any]:
        # Batch by batch into the encrypted Parquet: memory stays flat however many rows.
        for described, source in zip(files, track(opened, "reading sources", len(opened)),
                                     strict=True):
            for frame in source.batches(BATCH_ROWS):
                frame = _conform(frame, config, source.name, report)
                described.rows += frame.height
                report.columns = frame.columns
                yield frame

    frames = conformed()
    first = next(frames, None)
    rows = 0 if first is None else tables.write_encrypted_parquet_stream(
        writer.path(RECORDS), itertools.chain([first], frames), key)
    if rows == 0:
        raise BadInputError(
            f"{', '.join(source.name for source in opened)}: no records (only a header?): "
            "nothing to collect"
        )
    report.rows = rows
    if report.columns_dropped:
        # Said once, so a forgotten feature (or an email column nobody wanted) is noticed.
        log.info("collect: %d source column(s) not in the config, not stored: %s (add "
                 "[columns.NAME] to keep one)", len(report.columns_dropped),
                 ", ".join(report.columns_dropped))
    writer.add(RECORDS, rows=rows, encrypted=True, key_id=key.key_id)
    # The manifest lists each source's row count, known only now that it was read.
    writer.manifest["inputs"] = _inputs(files)
    writer.figures = asdict(report)
    log.info("collect: %d rows from %d file(s) -> %s", report.rows, len(files), writer.version)


def _inputs(files: list[SourceFile]) -> list[dict[str, Any]]:
    return [{"source": [asdict(f) for f in files]}]


def _conform(frame: Any, config: Config, source_name: str, report: CollectReport) -> Any:
    """Keep the configured columns in config order; refuse a missing required one."""
    import polars as pl

    present = set(frame.columns)
    missing = [n for n, c in config.columns.items() if n not in present and c.required]
    if missing:
        hint = ""
        if len(frame.columns) == 1 and any(sep in frame.columns[0] for sep in ";\t| "):
            hint = (" (the file looks like it uses another delimiter: set [source] delimiter, "
                    "and has_header = false with column_names if it has no header)")
        raise BadInputError(
            f"{source_name}: required column(s) {', '.join(missing)} missing from the "
            f"source{hint}; fix the export or set required = false in [columns.NAME]"
        )
    # An image column's status (why its bytes are null) travels with it, for clean.
    statuses = [status_column(n) for n, c in config.columns.items() if c.kind == "image"]
    for name in frame.columns:
        if name not in config.columns and name not in report.columns_dropped \
                and name not in statuses:
            report.columns_dropped.append(name)
    for name in config.columns:
        if name not in present and name not in report.columns_absent:
            report.columns_absent.append(name)
    exprs = [pl.col(n) if n in present else pl.lit(None, dtype=(
        pl.Binary if config.columns[n].kind == "image" else pl.String)).alias(n)
        for n in config.columns]
    return frame.select(exprs + [pl.col(n) if n in present else
                                 pl.lit(None, dtype=pl.String).alias(n) for n in statuses])
