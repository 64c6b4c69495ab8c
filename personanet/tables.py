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
from personanet.errors import BadInputError, InputMissingError, IntegrityError

if TYPE_CHECKING:
    import polars as pl

    from personanet.artifacts import Artifact

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
            _check_csv_header(path)
            frame = pl.read_csv(path, infer_schema=False, encoding="utf8",
                                truncate_ragged_lines=False)
        elif fmt == "parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_ndjson(path, infer_schema_length=None)
        nested = [n for n, t in frame.schema.items() if t.is_nested()]
        if nested:
            raise BadInputError(f"{path}: column {nested[0]!r} holds lists or structs; "
                                "export one plain value per field")
        return frame.with_columns(pl.all().cast(pl.String))
    except BadInputError:
        raise
    except (pl.exceptions.PolarsError, OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot read as {fmt}: {_without_values(exc)}") from exc


def _check_csv_header(path: Path) -> None:
    """Refuse what polars would misread quietly: CR-only line endings (one giant header
    line) and a repeated column name (polars renames it `age_duplicated_0`)."""
    import gzip
    import zlib

    import polars as pl

    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"  # by content, as polars decides
        with (gzip.open if compressed else open)(path, "rb") as fh:
            head = fh.read(1 << 16)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BadInputError(f"{path}: cannot read as csv: the gzip stream is cut short or "
                            f"damaged ({type(exc).__name__})") from exc
    if b"\r" in head and b"\n" not in head:
        raise BadInputError(f"{path}: lines end in CR only (classic Mac); convert the line "
                            "endings to LF or CRLF")

    header = pl.read_csv(path, has_header=False, n_rows=1, infer_schema=False,
                         encoding="utf8", truncate_ragged_lines=True).row(0)
    seen = set()
    for name in header:
        if name in seen:
            raise BadInputError(f"{path}: duplicate column {name!r} in the header")
        seen.add(name)


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
    import hashlib

    import polars as pl

    if not path.is_file():
        raise InputMissingError(f"{path}: missing")
    sealed = path.read_bytes()
    if sha256 is not None and hashlib.sha256(sealed).hexdigest() != sha256:
        raise IntegrityError(f"{path}: sha256 does not match its manifest (replaced or "
                             "damaged); `personanet artifacts verify` checks the store")
    stream = io.BytesIO(sealed)
    stream.name = str(path)  # errors name the file
    plaintext = b"".join(crypto.decrypt_stream(stream, key))
    try:
        return pl.read_parquet(io.BytesIO(plaintext))
    except pl.exceptions.PolarsError as exc:
        raise BadInputError(f"{path}: decrypted but not a Parquet table: {exc}") from exc
