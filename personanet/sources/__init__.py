"""Sources: where records come from, as text columns, before anything interprets them.

A source is what collect reads into the store and what predict scores. Today every
source is a file (`personanet.sources.files`: CSV, Parquet, NDJSON, one reader per
format); a database table or a folder of images would be another kind, one module
that yields the same `Source` objects. Stages see only this interface: a description
for the manifest, an identity for reuse, and the records whole or in batches.

Nothing here decrypts, types or cleans: values stay text (clean parses them), and
what reaches the disk is the store's business.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import polars as pl

    from personanet.config import ColumnConfig, DatabaseConfig, SourceConfig


class Source(Protocol):
    """One readable source of records (a file today)."""

    @property
    def name(self) -> str:
        """What messages call it (a path), never a value it holds."""
        ...

    def describe(self) -> dict[str, Any]:
        """Where it lies and what it holds, as recorded in a manifest's inputs."""
        ...

    def fingerprint(self) -> str:
        """Its identity for reuse: equal exactly when the records read would be equal
        (for a file, the sha256 of its bytes)."""
        ...

    def read(self) -> pl.DataFrame:
        """Every record as text columns; BadInputError (exit 65) when unreadable."""
        ...

    def batches(self, batch_size: int) -> Iterator[pl.DataFrame]:
        """The records as `read` gives them, in batches of at most `batch_size` rows,
        so predict scores a large source in flat memory."""
        ...


def open_sources(patterns: list[str], options: SourceConfig, *, base: Path,
                 columns: Mapping[str, ColumnConfig] | None = None,
                 database: DatabaseConfig | None = None) -> list[Source]:
    """The sources the config (or `--source`/`--input`) names, in order.

    `patterns` are files or globs, relative to `base`; InputMissingError (exit 66)
    when nothing is named or a pattern matches nothing. With `columns` (the config's)
    naming `type = "image"` columns, each file is an image manifest whose image columns
    are read as bytes (`personanet.sources.images`). With `database` (the config's
    [dataset.database]) and no patterns, the one source is its table or query
    (`personanet.sources.database`).
    """
    if database is not None and not patterns:
        from personanet.sources.database import DatabaseSource

        return [DatabaseSource(database, options, base)]
    from personanet.sources.files import open_files
    from personanet.sources.images import ImageManifest, image_columns

    files = open_files(patterns, options, base=base)
    images = image_columns(columns)
    if images:
        return [ImageManifest(f, images) for f in files]
    return list(files)
