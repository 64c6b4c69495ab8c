"""Record-level tables on disk: read sources, and Parquet that is only ever encrypted.

Plaintext Parquet exists only in memory (a BytesIO); what reaches the disk is
the encrypted stream of `personanet.crypto`.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import TYPE_CHECKING

from personanet import crypto
from personanet.errors import BadInputError, InputMissingError

if TYPE_CHECKING:
    import polars as pl

SOURCE_FORMATS = {".csv": "csv", ".gz": "csv", ".parquet": "parquet", ".pq": "parquet",
                  ".ndjson": "ndjson", ".jsonl": "ndjson"}


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


def source_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".csv.gz", ".ndjson.gz", ".jsonl.gz"):
        if name.endswith(suffix):
            return "ndjson" if "json" in suffix else "csv"
    fmt = SOURCE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadInputError(
            f"{path}: unknown format {path.suffix!r}; use .csv, .csv.gz, .parquet or .ndjson"
        )
    return fmt


def read_source(path: Path) -> pl.DataFrame:
    """One source file as text columns (clean parses types); BadInputError if unreadable."""
    import polars as pl

    fmt = source_format(path)
    try:
        if path.stat().st_size == 0:
            raise BadInputError(f"{path}: the file is empty")
        if fmt == "csv":
            frame = pl.read_csv(path, infer_schema=False, encoding="utf8",
                                truncate_ragged_lines=False)
        elif fmt == "parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_ndjson(path, infer_schema_length=None)
    except BadInputError:
        raise
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"{path}: cannot read as {fmt}: {first}") from exc
    return frame.with_columns(pl.all().cast(pl.String))


def write_encrypted_parquet(path: Path, frame: pl.DataFrame, key: crypto.MasterKey) -> None:
    """Serialise to Parquet in memory and write only the ciphertext."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=False)
    crypto.write_encrypted_file(path, buffer.getvalue(), key)


def read_encrypted_parquet(path: Path, key: crypto.MasterKey) -> pl.DataFrame:
    """Authenticate and decrypt fully, then parse; nothing partial is ever returned."""
    import polars as pl

    if not path.is_file():
        raise InputMissingError(f"{path}: missing")
    plaintext = crypto.read_encrypted_file(path, key)
    try:
        return pl.read_parquet(io.BytesIO(plaintext))
    except pl.exceptions.PolarsError as exc:
        raise BadInputError(f"{path}: decrypted but not a Parquet table: {exc}") from exc
