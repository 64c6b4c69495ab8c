"""Record-level tables on disk: read sources, and Parquet that is only ever encrypted.

Plaintext Parquet exists only in memory (a BytesIO); what reaches the disk is
the encrypted stream of `personanet.store.crypto`. Sources are read with the
config's `[source]` options (delimiter, header, encoding, ...), the same way
for collect and for predict.
"""

from __future__ import annotations

import glob
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from personanet.config import SourceConfig
from personanet.errors import BadInputError, InputMissingError, IntegrityError
from personanet.store import crypto

if TYPE_CHECKING:
    import polars as pl

    from personanet.store.artifacts import Artifact

log = logging.getLogger("personanet")

SOURCE_FORMATS = {".csv": "csv", ".gz": "csv", ".parquet": "parquet", ".pq": "parquet",
                  ".ndjson": "ndjson", ".jsonl": "ndjson"}
#: what a copy of a repeated header name is read as until it is found identical (never
#: a configured name: the prefix is clean's private one)
_COPY = "__personanet.copy"


def resolve_sources(patterns: list[str], *, base: Path) -> list[Path]:
    """Expand files and globs (relative to `base`); InputMissingError when nothing matches."""
    if not patterns:
        raise InputMissingError("no source: set dataset.source in the config or pass --source")
    found: list[Path] = []
    for pattern in patterns:
        full = Path(pattern).expanduser()
        if not full.is_absolute():
            full = base / full
        matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True))
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise InputMissingError(f"source {pattern!r} matches no file (looked at {full})")
        found.extend(m for m in matches if m not in found)
    return found


def source_format(path: Path, options: SourceConfig | None = None) -> str:
    """csv, parquet or ndjson: `[source] format` when set, else by the file name."""
    if options is not None and options.format != "auto":
        return options.format
    name = path.name.lower()
    for suffix in (".csv.gz", ".ndjson.gz", ".jsonl.gz"):
        if name.endswith(suffix):
            return "ndjson" if "json" in suffix else "csv"
    fmt = SOURCE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadInputError(
            f"{path}: unknown format {path.suffix!r}; use .csv, .csv.gz, .parquet or .ndjson, "
            "or set [source] format = \"csv\" (with delimiter, has_header, column_names as "
            "needed) to read it whatever its name"
        )
    return fmt


def read_source(path: Path, options: SourceConfig | None = None) -> pl.DataFrame:
    """One source file as text columns (clean parses types); BadInputError if unreadable."""
    import polars as pl

    options = options or SourceConfig()
    fmt = source_format(path, options)
    try:
        if path.stat().st_size == 0:
            raise BadInputError(f"{path}: the file is empty")
        if fmt == "csv":
            data = _csv_input(path, options)
            layout = _csv_layout(path, data, options)
            frame = pl.read_csv(data, **_csv_arguments(options, layout),
                                truncate_ragged_lines=False)
            return _finish(frame, options, layout, path)
        if fmt == "parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_ndjson(path, infer_schema_length=None)
        return _finish(frame, options, None, path)
    except BadInputError:
        raise
    except (pl.exceptions.PolarsError, OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(_cannot_read(path, fmt, exc)) from exc


def source_batches(path: Path, options: SourceConfig | None, *, batch_size: int
                   ) -> Iterator[pl.DataFrame]:
    """A source file in batches of text columns, read exactly as `read_source` reads it.

    UTF-8 CSV, Parquet and NDJSON stream (memory stays flat); a Latin-1 CSV is
    transcoded in memory first.
    """
    import polars as pl

    options = options or SourceConfig()
    fmt = source_format(path, options)
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the file is empty")
    layout = None
    try:
        if fmt == "csv":
            data = _csv_input(path, options)
            layout = _csv_layout(path, data, options)
            lazy = pl.scan_csv(data, **_csv_arguments(options, layout))
        elif fmt == "parquet":
            lazy = pl.scan_parquet(path)
        else:
            lazy = pl.scan_ndjson(path, infer_schema_length=None)
        for frame in lazy.collect_batches(chunk_size=batch_size):
            yield _finish(frame, options, layout, path)
    except BadInputError:
        raise
    except (pl.exceptions.PolarsError, OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(_cannot_read(path, fmt, exc)) from exc


def _cannot_read(path: Path, fmt: str, exc: BaseException) -> str:
    hint = ""
    if "utf-8" in str(exc).lower() or "utf8" in str(exc).lower():
        hint = "; if the file is Latin-1 (ISO-8859-1), set [source] encoding = \"latin-1\""
    return f"{path}: cannot read as {fmt}: {_without_values(exc)}{hint}"


# ------------------------------------------------------------------ CSV dialects


@dataclass
class _CsvLayout:
    """The columns of one CSV file as they will be read, and what to check after reading."""

    path: Path
    #: one name per field, in file order (copies of a repeated name under a private name)
    names: list[str]
    #: private name of a copy -> the header name it repeats ("refuse" mode only)
    copies: dict[str, str] = field(default_factory=dict)
    #: repeated names already reported (one log line per file, however many batches)
    reported: set[str] = field(default_factory=set)


def _csv_input(path: Path, options: SourceConfig) -> Path | bytes:
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


def _csv_arguments(options: SourceConfig, layout: _CsvLayout) -> dict[str, object]:
    return {"has_header": options.has_header, "new_columns": layout.names,
            "separator": options.delimiter, "quote_char": options.quote_char or None,
            "skip_rows": options.skip_rows, "infer_schema": False, "encoding": "utf8"}


def _csv_layout(path: Path, data: Path | bytes, options: SourceConfig) -> _CsvLayout:
    """Name every field: from `column_names`, or the header with repeated names resolved.

    polars would quietly rename a second `score` to `score_duplicated_0`; which of the
    two is the real one is ambiguous, so it is refused unless the copies turn out
    identical (checked after reading) or the config asks for suffixes.
    """
    import polars as pl

    first = pl.read_csv(data, has_header=False, n_rows=1, infer_schema=False, encoding="utf8",
                        separator=options.delimiter, quote_char=options.quote_char or None,
                        skip_rows=options.skip_rows, truncate_ragged_lines=True,
                        raise_if_empty=False)
    fields = list(first.row(0)) if first.height else []
    if options.column_names is not None:
        if fields and len(fields) != len(options.column_names):
            what = "the header has" if options.has_header else "the first record has"
            raise BadInputError(
                f"{path}: {what} {len(fields)} fields but [source] column_names lists "
                f"{len(options.column_names)}; name every field in file order (check delimiter)"
            )
        return _CsvLayout(path, list(options.column_names))
    header = [(f.strip() if options.trim_whitespace else f) if f is not None else ""
              for f in fields]
    header = [name or f"column_{i + 1}" for i, name in enumerate(header)]
    layout = _CsvLayout(path, [])
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
            private = f"{_COPY}{counts[name]}:{name}"
            layout.names.append(private)
            layout.copies[private] = name
    return layout


def _finish(frame: pl.DataFrame, options: SourceConfig, layout: _CsvLayout | None,
            path: Path) -> pl.DataFrame:
    """Text columns, trimmed and with null markers applied as configured; repeated
    header names resolved (identical copies dropped, differing ones refused)."""
    import polars as pl

    nested = [n for n, t in frame.schema.items() if t.is_nested()]
    if nested:
        raise BadInputError(f"{path}: column {nested[0]!r} holds lists or structs; "
                            "export one plain value per field")
    frame = frame.with_columns(pl.all().cast(pl.String))
    if options.trim_whitespace:
        frame = frame.with_columns(pl.all().str.strip_chars())
    if options.null_values:
        frame = frame.with_columns(
            pl.when(pl.all().is_in(options.null_values)).then(None).otherwise(pl.all()).name.keep()
        )
    if layout is not None and layout.copies:
        frame = _drop_identical_copies(frame, layout)
    return frame


def _drop_identical_copies(frame: pl.DataFrame, layout: _CsvLayout) -> pl.DataFrame:
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


def _without_values(exc: BaseException) -> str:
    """The parser's complaint without the record it quotes: an error line lands in logs
    and cron mail, and a quoted record would carry a name or an email there."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    for quote in ('"', "'", "`"):
        first = first.split(quote)[0]
    return first.rstrip(" :,(") or type(exc).__name__


def read_artifact_table(artifact: Artifact, name: str, key: crypto.MasterKey) -> pl.DataFrame:
    """An artifact's encrypted table, checked against its manifest, then authenticated."""
    return read_encrypted_parquet(artifact.file(name), key, sha256=artifact.output(name)["sha256"])


def write_encrypted_parquet(path: Path, frame: pl.DataFrame, key: crypto.MasterKey) -> None:
    """Serialise to Parquet in memory and write only the ciphertext."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=False)
    crypto.write_encrypted_file(path, buffer.getvalue(), key)


def read_encrypted_parquet(path: Path, key: crypto.MasterKey, *,
                           sha256: str | None = None) -> pl.DataFrame:
    """Authenticate and decrypt fully, then parse; nothing partial is ever returned.

    `sha256` is the file's digest from its artifact's manifest: authentication alone
    accepts any file sealed under this key, so another artifact's records put in its
    place would pass; the manifest digest pins the exact file.
    """
    import polars as pl

    plaintext = read_encrypted_bytes(path, key, sha256=sha256)
    try:
        return pl.read_parquet(io.BytesIO(plaintext))
    except pl.exceptions.PolarsError as exc:
        raise BadInputError(f"{path}: decrypted but not a Parquet table: {exc}") from exc


def read_artifact_bytes(artifact: Artifact, name: str, key: crypto.MasterKey) -> bytes:
    """An artifact's encrypted file as plaintext bytes, pinned by its manifest digest."""
    return read_encrypted_bytes(artifact.file(name), key, sha256=artifact.output(name)["sha256"])


def read_encrypted_bytes(path: Path, key: crypto.MasterKey, *, sha256: str | None = None
                         ) -> bytes:
    """The whole plaintext of an encrypted file, after its digest (when given) matched and
    every chunk authenticated."""
    import hashlib

    if not path.is_file():
        raise InputMissingError(f"{path}: missing")
    sealed = path.read_bytes()
    if sha256 is not None and hashlib.sha256(sealed).hexdigest() != sha256:
        raise IntegrityError(f"{path}: sha256 does not match its manifest (replaced or "
                             "damaged); `personanet artifacts verify` checks the store")
    stream = io.BytesIO(sealed)
    stream.name = str(path)  # errors name the file
    return b"".join(crypto.decrypt_stream(stream, key))
