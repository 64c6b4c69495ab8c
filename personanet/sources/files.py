"""File sources: exports on disk (CSV, CSV.gz, Parquet, NDJSON), one reader per format.

A file's format is `[source] format` when set, else the ending of its name; each
format is a `FileFormat` registered under its name (`@register_format("csv")`), so a
new one is one class here and a name in `SourceConfig.format`. Every format yields the
same thing: text columns, trimmed and with null markers applied as configured, read
the same way for collect (whole) and predict (in batches). A file's identity is the
sha256 of its bytes, which is what collect's and predict's fingerprints have always
hashed.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from personanet.config import SourceConfig
from personanet.errors import BadInputError, InputMissingError
from personanet.sources import csv_dialect

if TYPE_CHECKING:
    import polars as pl


class FileFormat:
    """How the files of one format are read; one subclass per format, registered by name.

    Built inside the reader's error handling, so a constructor that inspects the file
    (the CSV header) may raise what polars or the OS raises.
    """

    #: the name `[source] format` uses; set by `register_format`
    name: ClassVar[str] = ""
    #: file name endings read in this format when `[source] format = "auto"`
    suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: Path, options: SourceConfig) -> None:
        self.path = path
        self.options = options

    def read(self) -> pl.DataFrame:
        """The whole file as polars reads it."""
        raise NotImplementedError

    def scan(self) -> pl.LazyFrame:
        """The file as a lazy scan, so batches stream."""
        raise NotImplementedError

    def frames(self, batch_size: int) -> Iterator[pl.DataFrame]:
        """The file in frames of about `batch_size` rows, in bounded memory."""
        return iter(self.scan().collect_batches(chunk_size=batch_size))

    def check(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The format's own checks on a frame already turned into text columns."""
        return frame


_FORMATS: dict[str, type[FileFormat]] = {}


def register_format(name: str) -> Callable[[type[FileFormat]], type[FileFormat]]:
    """Class decorator: read files of format `name` with this `FileFormat`."""
    def register(cls: type[FileFormat]) -> type[FileFormat]:
        cls.name = name
        _FORMATS[name] = cls
        return cls
    return register


@register_format("csv")
class CsvFormat(FileFormat):
    """Delimited text in the configured dialect (see `personanet.sources.csv_dialect`)."""

    suffixes = (".csv", ".csv.gz", ".gz")

    def __init__(self, path: Path, options: SourceConfig) -> None:
        super().__init__(path, options)
        self.data = csv_dialect.csv_input(path, options)
        self.layout = csv_dialect.csv_layout(path, self.data, options)

    def read(self) -> pl.DataFrame:
        import polars as pl

        return pl.read_csv(self.data, **csv_dialect.csv_arguments(self.options, self.layout),
                           truncate_ragged_lines=False)

    def scan(self) -> pl.LazyFrame:
        import polars as pl

        return pl.scan_csv(self.data, **csv_dialect.csv_arguments(self.options, self.layout))

    def frames(self, batch_size: int) -> Iterator[pl.DataFrame]:
        # polars' CSV scan holds memory growing with the file; blocks of bytes do not.
        from personanet.sources.csv_blocks import csv_frames

        return csv_frames(self.data, csv_dialect.csv_arguments(self.options, self.layout),
                          batch_size=batch_size)

    def check(self, frame: pl.DataFrame) -> pl.DataFrame:
        if not self.layout.copies:
            return frame
        return csv_dialect.drop_identical_copies(frame, self.layout)


@register_format("parquet")
class ParquetFormat(FileFormat):
    suffixes = (".parquet", ".pq")

    def read(self) -> pl.DataFrame:
        import polars as pl

        return pl.read_parquet(self.path)

    def scan(self) -> pl.LazyFrame:
        import polars as pl

        return pl.scan_parquet(self.path)


@register_format("ndjson")
class NdjsonFormat(FileFormat):
    suffixes = (".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")

    def read(self) -> pl.DataFrame:
        import polars as pl

        return pl.read_ndjson(self.path, infer_schema_length=None)

    def scan(self) -> pl.LazyFrame:
        import polars as pl

        return pl.scan_ndjson(self.path, infer_schema_length=None)


def file_format(path: Path, options: SourceConfig | None = None) -> type[FileFormat]:
    """The reader of `path`: `[source] format` when set, else by the longest matching
    file name ending; BadInputError for a name no format claims."""
    if options is not None and options.format != "auto":
        return _FORMATS[options.format]
    name = path.name.lower()
    endings = sorted(((suffix, fmt) for fmt in _FORMATS.values() for suffix in fmt.suffixes),
                     key=lambda pair: len(pair[0]), reverse=True)
    for suffix, fmt in endings:
        if name.endswith(suffix):
            return fmt
    raise BadInputError(
        f"{path}: unknown format {path.suffix!r}; use .csv, .csv.gz, .parquet or .ndjson, "
        "or set [source] format = \"csv\" (with delimiter, has_header, column_names as "
        "needed) to read it whatever its name"
    )


@dataclass
class FileSource:
    """One file of records, read with the config's `[source]` options."""

    path: Path
    options: SourceConfig = field(default_factory=SourceConfig)

    @property
    def name(self) -> str:
        return str(self.path)

    @cached_property
    def _sha256(self) -> str:
        from personanet.store.artifacts import sha256_file

        return sha256_file(self.path)

    def fingerprint(self) -> str:
        return self._sha256

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self._sha256,
                "bytes": self.path.stat().st_size}

    def read(self) -> pl.DataFrame:
        import polars as pl

        fmt = file_format(self.path, self.options)
        try:
            if self.path.stat().st_size == 0:
                raise BadInputError(f"{self.path}: the file is empty")
            reader = fmt(self.path, self.options)
            return reader.check(_as_text(reader.read(), self.options, self.path))
        except BadInputError:
            raise
        except (pl.exceptions.PolarsError, OSError, EOFError, UnicodeDecodeError,
                ValueError) as exc:
            raise BadInputError(_cannot_read(self.path, fmt.name, exc)) from exc

    def batches(self, batch_size: int) -> Iterator[pl.DataFrame]:
        """UTF-8 CSV, Parquet and NDJSON stream (memory stays flat); a Latin-1 CSV is
        transcoded in memory first."""
        import polars as pl

        fmt = file_format(self.path, self.options)
        try:
            if self.path.stat().st_size == 0:
                raise BadInputError(f"{self.path}: the file is empty")
            reader = fmt(self.path, self.options)
            for frame in reader.frames(batch_size):
                yield reader.check(_as_text(frame, self.options, self.path))
        except BadInputError:
            raise
        except (pl.exceptions.PolarsError, OSError, EOFError, UnicodeDecodeError,
                ValueError) as exc:
            raise BadInputError(_cannot_read(self.path, fmt.name, exc)) from exc


def open_files(patterns: list[str], options: SourceConfig, *, base: Path) -> list[FileSource]:
    """Expand files and globs (relative to `base`) into sources, each file once, in order;
    InputMissingError when nothing is named or a pattern matches no file."""
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
    return [FileSource(path, options) for path in found]


def _as_text(frame: pl.DataFrame, options: SourceConfig, path: Path) -> pl.DataFrame:
    """Text columns, trimmed and with null markers applied as configured (clean parses
    types: a reader never interprets a value)."""
    import polars as pl

    nested = [n for n, t in frame.schema.items() if t.is_nested()]
    if nested:
        raise BadInputError(f"{path}: column {nested[0]!r} holds lists or structs; "
                            "export one plain value per field")
    # Binary columns (images inside a Parquet manifest) stay bytes: they are not text.
    text = pl.exclude(pl.Binary)
    frame = frame.with_columns(text.cast(pl.String))
    if options.trim_whitespace:
        frame = frame.with_columns(text.str.strip_chars())
    if options.null_values:
        frame = frame.with_columns(
            pl.when(text.is_in(options.null_values)).then(None).otherwise(text).name.keep()
        )
    return frame


def _cannot_read(path: Path, fmt: str, exc: BaseException) -> str:
    hint = ""
    if "utf-8" in str(exc).lower() or "utf8" in str(exc).lower():
        hint = "; if the file is Latin-1 (ISO-8859-1), set [source] encoding = \"latin-1\""
    return f"{path}: cannot read as {fmt}: {_without_values(exc)}{hint}"


def _without_values(exc: BaseException) -> str:
    """The parser's complaint without the record it quotes: an error line lands in logs
    and cron mail, and a quoted record would carry a name or an email there."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    for quote in ('"', "'", "`"):
        first = first.split(quote)[0]
    return first.rstrip(" :,(") or type(exc).__name__
