"""Reading one's own outputs: decrypt an artifact's table to a plaintext file, on request.

Every record-level file of an artifact is encrypted (`rejects.csv.enc`,
`quarantine.parquet.enc`, `predictions.csv.enc`, ...). `export_table` is the one
way out: it refuses unless the caller says plaintext is wanted, authenticates the
file against its manifest, never overwrites an existing file, writes 0600, and logs
what it wrote. The plaintext format follows the output's name: `.csv` or
`.parquet`, or CSV on a stream (`-` for stdout).
"""

from __future__ import annotations

import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from personanet.errors import InputMissingError, OutputError, UsageError
from personanet.store import tables
from personanet.store.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    import polars as pl

    from personanet.store.artifacts import Artifact
    from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")

#: plaintext formats by output suffix
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
STDOUT = "-"


@dataclass(frozen=True)
class ExportReport:
    """What `export_table` wrote: the --json figures and the log line say the same."""

    version: str
    stage: str
    file: str
    output: str
    format: str
    rows: int
    bytes: int


def export_table(artifact: Artifact, name: str, key: MasterKey, output: str | Path, *,
                 plaintext_output: bool, stream: BinaryIO | None = None) -> ExportReport:
    """Decrypt the artifact's encrypted table `name` into `output` as plaintext.

    Args:
        artifact: the artifact that holds the file (its manifest pins the file's sha256,
            so a file swapped in from another artifact is refused, exit 65).
        name: the file's name in the manifest, e.g. "predictions.csv.enc".
        key: the master key the file is encrypted under.
        output: a path ending in .csv or .parquet, or "-" for CSV on `stream`.
        plaintext_output: must be True: the output holds record-level data about people
            in the clear, so the caller has to ask for it in so many words (UsageError,
            exit 2, otherwise).
        stream: where "-" writes (default: stdout's binary buffer).

    Raises:
        UsageError: plaintext not asked for, or an output suffix that is not a table.
        InputMissingError: the artifact has no such encrypted file.
        OutputError: `output` exists (never overwritten) or cannot be written (exit 73).
    """
    fmt = check_request(output, plaintext_output=plaintext_output)
    entry = artifact.output(name)
    if not entry.get("encrypted") or not name.endswith((".csv.enc", ".parquet.enc")):
        tables_here = [o["name"] for o in artifact.manifest.get("outputs", [])
                       if o.get("encrypted")]
        raise InputMissingError(
            f"{name!r} of {artifact.stage} {artifact.version} is not an encrypted table; "
            f"export one of: {', '.join(tables_here) or 'none (this artifact has none)'}"
        )
    target = None if str(output) == STDOUT else Path(output)
    if target is not None and (target.exists() or target.is_symlink()):
        raise _exists(target)
    plaintext = tables.read_artifact_bytes(artifact, name, key)
    data, rows = _convert(plaintext, name, fmt)
    if target is None:
        out = stream if stream is not None else sys.stdout.buffer
        out.write(data)
        out.flush()
    else:
        # Exclusive: a file that appeared since the check above is not overwritten either.
        try:
            atomic_write_bytes(target, data, mode=0o600, exclusive=True)
        except OutputError:
            if target.exists():
                raise _exists(target) from None
            raise
    report = ExportReport(version=artifact.version, stage=artifact.stage, file=name,
                          output=str(output), format=fmt, rows=rows, bytes=len(data))
    log.info("export: wrote %s (%d rows) of %s %s in plaintext to %s", name, rows,
             artifact.stage, artifact.version, "stdout" if target is None else target)
    return report


def check_request(output: str | Path, *, plaintext_output: bool) -> str:
    """The output format, once plaintext was asked for (UsageError, exit 2, otherwise).

    Checked before any key or file is touched, so a wrong command line costs nothing.
    """
    if not plaintext_output:
        raise UsageError("artifacts export writes record-level data in plaintext: add "
                         "--plaintext-output to say that is what you want")
    if str(output) == STDOUT:
        return "csv"
    suffix = Path(output).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise UsageError(f"--output {output}: name it .csv or .parquet (the format follows the "
                         "suffix), or - for CSV on stdout")
    return fmt


def _convert(plaintext: bytes, name: str, fmt: str) -> tuple[bytes, int]:
    """The plaintext in the output format, and its number of rows."""
    frame = read_table_bytes(plaintext, name)
    if fmt == "csv" and name.endswith(".csv.enc"):
        return plaintext, frame.height  # byte for byte what the stage wrote
    buffer = io.BytesIO()
    if fmt == "csv":
        frame.write_csv(buffer)
    else:
        frame.write_parquet(buffer)
    return buffer.getvalue(), frame.height


def read_table_bytes(plaintext: bytes, name: str) -> pl.DataFrame:
    """A decrypted table (CSV or Parquet by the encrypted file's name) as a frame."""
    import polars as pl

    if name.endswith(".parquet.enc"):
        return pl.read_parquet(io.BytesIO(plaintext))
    return pl.read_csv(io.BytesIO(plaintext), infer_schema_length=None)


def _exists(target: Path) -> OutputError:
    return OutputError(f"{target} exists: export never overwrites; remove it or pick "
                       "another --output")
