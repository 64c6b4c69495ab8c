"""collect: raw exports in, one encrypted record table out.

Reads CSV, CSV.gz, Parquet or NDJSON (files or globs), checks the columns
against the config, and writes the records, still as text, into an encrypted
Parquet inside a new `collect` artifact. Types are clean's business: collect
only refuses what it cannot read and never interprets a value.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from personanet.config import Config
from personanet.errors import BadInputError
from personanet.stages.base import StageResult, find_reusable, require_key
from personanet.stages.lineage import collect_fingerprint
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore, sha256_file
from personanet.store.crypto import MasterKey
from personanet.ui import track

log = logging.getLogger("personanet")

RECORDS = "records.parquet.enc"


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
            sources: list[str] | None = None, force: bool = False) -> StageResult:
    """Read the configured sources into a new encrypted `collect` artifact.

    `sources` (files or globs, relative to the working directory) replaces
    `dataset.source` (relative to the config file). An identical earlier
    artifact (same source bytes, same columns) is reused unless `force`.
    """
    require_key(store, key)  # a root holds one master key: refuse another before any write
    base = Path.cwd() if sources else config.base_dir
    paths = tables.resolve_sources(sources or config.dataset.source, base=base)
    files = [SourceFile(path=str(p.resolve()), sha256=sha256_file(p), bytes=p.stat().st_size)
             for p in paths]
    wanted = [name for name in config.columns]
    fp = collect_fingerprint(config, [f.sha256 for f in files])
    reusable = find_reusable(store, "collect", fp, force=force)
    if reusable:
        log.info("collect: reusing %s (identical sources and columns)", reusable.version)
        return reusable

    import polars as pl

    report = CollectReport(sources=files, key_id=key.key_id)
    frames = []
    for source, path in zip(files, track(paths, "reading sources", len(paths)), strict=True):
        frame = tables.read_source(path, config.source)
        frame = _conform(frame, config, path, report)
        source.rows = frame.height
        frames.append(frame)
    records = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    if records.height == 0:
        raise BadInputError(
            f"{', '.join(str(p) for p in paths)}: no records (only a header?): nothing to collect"
        )
    report.rows = records.height
    report.columns = records.columns
    if report.columns_dropped:
        # Said once, so a forgotten feature (or an email column nobody wanted) is noticed.
        log.info("collect: %d source column(s) not in the config, not stored: %s (add "
                 "[columns.NAME] to keep one)", len(report.columns_dropped),
                 ", ".join(report.columns_dropped))
    with store.lock():
        reusable = find_reusable(store, "collect", fp, force=force)
        if reusable:
            return reusable
        with store.create(
            "collect", fingerprint=fp,
            inputs=[{"source": [asdict(f) for f in files]}],
            config={"dataset": config.section("dataset"), "columns": sorted(wanted),
                    "source": config.section("source")},
            config_hash=config.section_hash("dataset", "columns", "source"),
        ) as writer:
            tables.write_encrypted_parquet(writer.path(RECORDS), records, key)
            writer.add(RECORDS, rows=records.height, encrypted=True, key_id=key.key_id)
            writer.figures = _jsonable(report)
            artifact = writer.commit()
    log.info("collect: %d rows from %d file(s) -> %s", report.rows, len(files), artifact.version)
    return StageResult.of(artifact, reused=False)


def _conform(frame: Any, config: Config, path: Path, report: CollectReport) -> Any:
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
            f"{path}: required column(s) {', '.join(missing)} missing from the source{hint}; "
            "fix the export or set required = false in [columns.NAME]"
        )
    for name in frame.columns:
        if name not in config.columns and name not in report.columns_dropped:
            report.columns_dropped.append(name)
    for name in config.columns:
        if name not in present and name not in report.columns_absent:
            report.columns_absent.append(name)
    exprs = [pl.col(n) if n in present else pl.lit(None, dtype=pl.String).alias(n)
             for n in config.columns]
    return frame.select(exprs)


def _jsonable(report: CollectReport) -> dict[str, Any]:
    return asdict(report)
