"""Incremental collection: a dataset that grows, collected as a chain of increments.

`collect --incremental` reads only what is new since the config's last collection (its
*head*) and writes it as a new collect version whose manifest names its `parent`:

* files: the files matching `dataset.source` whose path and sha256 no collection of the
  chain holds (a new daily export; an edited file is read again, and clean drops the
  rows it already had as duplicates);
* a database: the rows whose `dataset.database.watermark` column is past the largest value
  collected so far (kept encrypted in the head's `watermark.parquet.enc`: it is a value of
  a record).

Nothing new: the head is reused (`reused: true`), so a cron job may run it every hour.
Every collection of one config shares a `stream` (its manifest says which): the table or
query, or the file patterns, with the columns and read options. clean reads the chain,
oldest first, as one table (so its dedupe works across days), and the ledger, keyed by
dataset name, sees one dataset. Once a stream is collected incrementally, a plain
`collect` (and `run`) continues it; `collect --full` reads everything again as a new base.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from personanet.errors import BadInputError, ConfigError, UsageError
from personanet.stages.base import StagePlan, fingerprint
from personanet.stages.files import RECORDS, WATERMARK
from personanet.stages.lineage import collect_fingerprint
from personanet.store import tables

if TYPE_CHECKING:
    import polars as pl

    from personanet.config import Config
    from personanet.sources import Source
    from personanet.store.artifacts import Artifact, ArtifactStore, ArtifactWriter
    from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")

#: manifest fields of a collect artifact
STREAM, PARENT, INCREMENTAL = "stream", "parent", "incremental"
#: the watermark file's column of the digests of the rows held at the watermark
HELD = "__personanet.held"


def stream_id(config: Config, patterns: list[str] | None = None) -> str:
    """What every collection of this config reads from, whatever it found there."""
    where: dict[str, Any]
    if patterns or config.dataset.database is None:
        where = {"source": list(patterns or config.dataset.source)}
    else:
        where = {"database": {k: v for k, v in config.section("dataset")["database"].items()
                              if k != "batch_size"}}
    return fingerprint("collect-stream", **where, read=config.section("source"),
                       columns={n: c.required for n, c in config.columns.items()})


def lineage(store: ArtifactStore, head: Artifact) -> list[Artifact]:
    """`head` and its parents, oldest first (each manifest's seal checked by the store)."""
    chain = [head]
    while parent := chain[-1].manifest.get(PARENT):
        chain.append(store.get("collect", parent))
    return chain[::-1]


def stream_head(store: ArtifactStore, stream: str) -> Artifact | None:
    """The newest collection of `stream`, or None."""
    for artifact in reversed(store.versions("collect")):
        if artifact.manifest.get(STREAM) == stream:
            return store.checked(artifact)
    return None


def _files_held(chain: list[Artifact]) -> set[tuple[str, str]]:
    held = set()
    for artifact in chain:
        for entry in artifact.manifest.get("inputs", []):
            for source in entry.get("source", []) if isinstance(entry, dict) else []:
                held.add((source.get("path"), source.get("sha256")))
    return held


def _file_key(source: Source) -> tuple[str, str]:
    described = source.describe()
    return described.get("path", source.name), described.get("sha256", source.fingerprint())


def chain_head(config: Config, store: ArtifactStore, open_files: Callable[[], list[Source]]
               ) -> Artifact | None:
    """The collect artifact the config's chain starts from (`lineage.resolve_chain`).

    A database: the stream's newest collection (nothing is read from the server). Files:
    the full collection of exactly these files, else the newest incremental collection
    whose chain holds every one of them (by path and sha256).
    """
    if config.dataset.database is not None:
        return stream_head(store, stream_id(config))
    sources = open_files()
    exact = store.find_reusable(
        "collect", collect_fingerprint(config, [source.fingerprint() for source in sources]))
    if exact is not None:
        return exact
    head = stream_head(store, stream_id(config))
    if head is None or not head.manifest.get(INCREMENTAL):
        return None
    # Every file there now is in the chain (an export moved away stays in it, as its rows
    # do): what `collect --incremental` would call "nothing new".
    wanted = {_file_key(source) for source in sources}
    return head if wanted <= _files_held(lineage(store, head)) else None


def read_chain(store: ArtifactStore, head: Artifact, key: MasterKey) -> pl.DataFrame:
    """The records of `head`'s whole chain, oldest first, as one table."""
    import polars as pl

    frames = [tables.read_artifact_table(a, RECORDS, key) for a in lineage(store, head)]
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")


# --------------------------------------------------------------------- collect's plan


@dataclass
class Collection:
    """What a collect run reads: all of its sources, or the part past its parent."""

    sources: list[Source]
    stream: str
    parent: Artifact | None = None
    incremental: bool = False
    #: incremental and nothing new: the parent is the answer
    nothing_new: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def parent_version(self) -> str | None:
        return self.parent.version if self.parent is not None else None

    def after(self, write: Callable[[ArtifactWriter], None]
              ) -> Callable[[ArtifactWriter], None]:
        """`write`, then `record`: a stage's write that also marks its place in the chain."""
        def write_and_record(writer: ArtifactWriter) -> None:
            write(writer)
            self.record(writer)
        return write_and_record

    def record(self, writer: ArtifactWriter) -> None:
        """The chain's fields in the new manifest (sealed with it)."""
        writer.manifest[STREAM] = self.stream
        writer.manifest[INCREMENTAL] = self.incremental
        writer.figures["parent"] = self.parent_version
        if self.parent is not None:
            writer.manifest[PARENT] = self.parent.version
            # Pinned like any input: `artifacts gc` keeps what a kept version reads.
            writer.manifest["inputs"] = [*writer.manifest["inputs"], self.parent.as_input()]


def plan_collection(config: Config, store: ArtifactStore, key: MasterKey,
                    opened: list[Source], *, patterns: list[str] | None,
                    incremental: bool | None) -> Collection:
    """The part of `opened` to collect. `incremental`: True (`--incremental`), False
    (`--full`) or None: incremental when the stream's head was collected incrementally."""
    stream = stream_id(config, patterns)
    head = stream_head(store, stream)
    if incremental is None:
        incremental = bool(head is not None and head.manifest.get(INCREMENTAL))
    if not incremental:
        return Collection(opened, stream)
    if head is None:
        log.info("collect --incremental: nothing collected yet, reading everything")
        return Collection(opened, stream, incremental=True)
    if _is_database(opened):
        source = opened[0]
        if config.dataset.database is None or config.dataset.database.watermark is None:
            raise ConfigError("collect --incremental from a database needs "
                              "dataset.database.watermark (a column that grows: an id, "
                              "updated_at)")
        source.after, source.held = read_watermark(head, key)  # type: ignore[attr-defined]
        source.fingerprint()
        new = opened if source.describe()["rows"] else []
    else:
        held = _files_held(lineage(store, head))
        new = [source for source in opened if _file_key(source) not in held]
    if not new:
        log.info("collect --incremental: nothing new since %s", head.version)
        return Collection([], stream, parent=head, incremental=True, nothing_new=True)
    return Collection(new, stream, parent=head, incremental=True)


def reuse_parent(collection: Collection) -> StagePlan:
    """Nothing new: a plan whose fingerprint is the head's, so run_stage reuses it."""
    head = collection.parent
    assert head is not None

    def refuse(writer: ArtifactWriter) -> None:
        raise UsageError(f"collect --incremental --force: nothing new since {head.version} "
                         "to collect; use collect --full --force to read everything again")

    return StagePlan("collect", head.manifest["fingerprint"], inputs=[], config={},
                     config_hash="", write=refuse)


# --------------------------------------------------------------------- databases


def _is_database(opened: list[Source]) -> bool:
    from personanet.sources.database import DatabaseSource

    return len(opened) == 1 and isinstance(opened[0], DatabaseSource)


def database_plan(config: Config, key: MasterKey, collection: Collection, *,
                  conform: Callable[..., pl.DataFrame], report: Any) -> StagePlan | None:
    """collect's plan for a database source (None: the sources are files)."""
    if not _is_database(collection.sources):
        return None
    source = collection.sources[0]
    fp = collect_fingerprint(config, [source.fingerprint()],
                             parent=collection.parent_version)
    return StagePlan(
        "collect", fp, inputs=[{"database": source.describe()}],
        config={"dataset": config.section("dataset"), "columns": sorted(config.columns),
                "source": config.section("source")},
        config_hash=config.section_hash("dataset", "columns", "source"),
        write=partial(_write_database, config, key, collection, conform, report),
        warnings=collection.warnings)


def _write_database(config: Config, key: MasterKey, collection: Collection,
                    conform: Callable[..., pl.DataFrame], report: Any,
                    writer: ArtifactWriter) -> None:
    """Stream the rows, batch by batch, into the encrypted records file."""
    from dataclasses import asdict

    source = collection.sources[0]
    figures = report(key_id=key.key_id)
    assert config.dataset.database is not None

    def conformed() -> Iterator[pl.DataFrame]:
        for batch in source.batches(config.dataset.database.batch_size):
            yield conform(batch, config, source.name, figures)

    batches = conformed()
    first = next(batches, None)
    if first is None:
        raise BadInputError(f"{source.name}: no records: nothing to collect")
    rows = tables.write_encrypted_parquet_stream(writer.path(RECORDS),
                                                 itertools.chain([first], batches), key)
    writer.add(RECORDS, rows=rows, encrypted=True, key_id=key.key_id)
    figures.rows = rows
    figures.columns = list(config.columns)
    reached = source.watermark_reached  # type: ignore[attr-defined]
    if reached is not None:
        write_watermark(writer, config.dataset.database.watermark, reached, key,
                        held=source.held_reached)  # type: ignore[attr-defined]
    writer.manifest["inputs"] = [{"database": source.describe()}]
    writer.figures = {**asdict(figures), "database": source.describe()}
    collection.record(writer)
    log.info("collect: %d rows from %s -> %s%s", rows, source.name, writer.version,
             f" (after {collection.parent_version})" if collection.parent else "")


def write_watermark(writer: ArtifactWriter, column: str | None, value: Any,
                    key: MasterKey, *, held: list[str]) -> None:
    """The largest watermark value collected, and the sha256 digests of the rows the chain
    holds at it (`sources.database.Boundary`): both values of records, so encrypted."""
    import polars as pl

    frame = pl.DataFrame({str(column): [value],
                          HELD: pl.Series([list(held)], dtype=pl.List(pl.String))})
    tables.write_encrypted_parquet(writer.path(WATERMARK), frame, key)
    writer.add(WATERMARK, rows=1, encrypted=True, key_id=key.key_id)


def read_watermark(head: Artifact, key: MasterKey) -> tuple[Any, list[str] | None]:
    """The largest watermark value the chain up to `head` has collected, and the digests
    of the rows held at it (None from a collection made before they were kept: the rows
    at that value are then not read again, as before)."""
    names = {out["name"] for out in head.manifest.get("outputs", [])}
    if WATERMARK not in names:
        raise UsageError(f"collect {head.version} has no watermark (collected without "
                         "dataset.database.watermark): run collect --full once")
    frame = tables.read_artifact_table(head, WATERMARK, key)
    held = frame[HELD][0].to_list() if HELD in frame.columns else None
    return frame.row(0)[0], held
