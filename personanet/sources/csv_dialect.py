"""CSV dialects: how one CSV file's bytes, header and repeated names become named fields.

Exports differ in delimiter, quoting, encoding, line endings and header; the `[source]`
options of the config say which (see `personanet.config.SourceConfig`). This module
turns them into polars' arguments, names every field (refusing an ambiguous repeated
header name), and checks afterwards that the copies of a repeated name agree. The
reader that uses it is `personanet.sources.files.CsvFormat`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from personanet.errors import BadInputError

if TYPE_CHECKING:
    import polars as pl

    from personanet.config import SourceConfig

log = logging.getLogger("personanet")

#: what a copy of a repeated header name is read as until it is found identical (never
#: a configured name: the prefix is clean's private one)
COPY_PREFIX = "__personanet.copy"


@dataclass
class CsvLayout:
    """The columns of one CSV file as they will be read, and what to check after reading."""

    path: Path
    #: one name per field, in file order (copies of a repeated name under a private name)
    names: list[str]
    #: private name of a copy -> the header name it repeats ("refuse" mode only)
    copies: dict[str, str] = field(default_factory=dict)
    #: repeated names already reported (one log line per file, however many batches)
    reported: set[str] = field(default_factory=set)


def csv_input(path: Path, options: SourceConfig) -> Path | bytes:
    """What polars reads: the file itself, or, for Latin-1, its text as UTF-8 bytes in memory
    (polars parses UTF-8 only; the plaintext never touches the disk)."""
    import gzip
    import zlib

    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"  # by content, as polars decides
        with (gzip.open if compressed else open)(path, "rb") as fh:
            if options.encoding == "utf-8":
                head = fh.read(1 << 16)
            else:
                whole = fh.read()
                head = whole[: 1 << 16]
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BadInputError(f"{path}: cannot read as csv: the gzip stream is cut short or "
                            f"damaged ({type(exc).__name__})") from exc
    if b"\r" in head and b"\n" not in head:
        # polars would read one giant header line
        raise BadInputError(f"{path}: lines end in CR only (classic Mac); convert the line "
                            "endings to LF or CRLF")
    if options.encoding == "utf-8":
        return path
    return whole.decode("latin-1").encode("utf-8")


def csv_arguments(options: SourceConfig, layout: CsvLayout) -> dict[str, object]:
    """polars' `read_csv`/`scan_csv` arguments: every field as text, named by `layout`."""
    return {"has_header": options.has_header, "new_columns": layout.names,
            "separator": options.delimiter, "quote_char": options.quote_char or None,
            "skip_rows": options.skip_rows, "infer_schema": False, "encoding": "utf8"}


def csv_layout(path: Path, data: Path | bytes, options: SourceConfig) -> CsvLayout:
    """Name every field: from `column_names`, or the header with repeated names resolved.

    polars would quietly rename a second `score` to `score_duplicated_0`; which of the
    two is the real one is ambiguous, so it is refused unless the copies turn out
    identical (checked after reading) or the config asks for suffixes.
    """
    import polars as pl

    arguments = dict(has_header=False, n_rows=1, infer_schema=False, encoding="utf8",
                     separator=options.delimiter, quote_char=options.quote_char or None,
                     skip_rows=options.skip_rows, truncate_ragged_lines=True,
                     raise_if_empty=False)
    try:
        # polars reads a whole file into memory even for one row (1M rows: +130 MiB held
        # for the rest of the run); the file's first MiB holds the header.
        first = pl.read_csv(_head(data), **arguments)
    except pl.exceptions.PolarsError:
        first = pl.read_csv(data, **arguments)
    fields = list(first.row(0)) if first.height else []
    if options.column_names is not None:
        if fields and len(fields) != len(options.column_names):
            what = "the header has" if options.has_header else "the first record has"
            raise BadInputError(
                f"{path}: {what} {len(fields)} fields but [source] column_names lists "
                f"{len(options.column_names)}; name every field in file order (check delimiter)"
            )
        return CsvLayout(path, list(options.column_names))
    header = [(f.strip() if options.trim_whitespace else f) if f is not None else ""
              for f in fields]
    header = [name or f"column_{i + 1}" for i, name in enumerate(header)]
    layout = CsvLayout(path, [])
    counts: dict[str, int] = {}
    for name in header:
        counts[name] = counts.get(name, 0) + 1
        if counts[name] == 1:
            layout.names.append(name)
        elif options.duplicate_columns == "suffix":
            renamed = f"{name}_{counts[name]}"
            if renamed in header:
                raise BadInputError(
                    f"{path}: column {name!r} repeats in the header and {renamed!r} is already "
                    "a column, so duplicate_columns = \"suffix\" cannot name the copy; rename "
                    "the columns in the export or give [source] column_names"
                )
            layout.names.append(renamed)
        else:
            private = f"{COPY_PREFIX}{counts[name]}:{name}"
            layout.names.append(private)
            layout.copies[private] = name
    return layout


def _head(data: Path | bytes, size: int = 1 << 20) -> bytes:
    """The first `size` bytes of the (decompressed) file, cut after its last line end."""
    import gzip

    if isinstance(data, bytes | bytearray):
        head = bytes(data[:size])
        whole = len(data) <= size
    else:
        with open(data, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        with (gzip.open if compressed else open)(data, "rb") as fh:
            head = fh.read(size + 1)
        whole = len(head) <= size
        head = head[:size]
    if whole or b"\n" not in head:
        return head
    return head[: head.rfind(b"\n") + 1]


def drop_identical_copies(frame: pl.DataFrame, layout: CsvLayout) -> pl.DataFrame:
    """The frame without the copies of repeated header names, which must equal the first
    column of their name in every row (else BadInputError: which one is meant is unknown)."""
    for private, name in layout.copies.items():
        if not frame[private].equals(frame[name], check_names=False, null_equal=True):
            times = 1 + sum(1 for n in layout.copies.values() if n == name)
            raise BadInputError(
                f"{layout.path}: duplicate column {name!r}: it appears {times} times in the "
                "header with different values, so which one is meant is ambiguous; fix the "
                "export, or set "
                "[source] duplicate_columns = \"suffix\" to read the copies as "
                f"{name!r}, '{name}_2', ... and configure the one you mean"
            )
    identical = [n for n in dict.fromkeys(layout.copies.values()) if n not in layout.reported]
    if identical:
        # One line per file, however many batches: nothing was ambiguous, but say so.
        layout.reported.update(identical)
        log.info("%s: column(s) %s appear more than once in the header with identical values "
                 "in every row; each read once", layout.path, ", ".join(map(repr, identical)))
    return frame.drop(list(layout.copies))
