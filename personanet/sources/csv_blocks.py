"""CSV blocks: a delimited file read as a sequence of frames in bounded memory.

polars' streaming CSV scan keeps memory that grows with the file (measured with polars
2.1: anonymous memory 150 MiB at 250k rows, 300 MiB at 1M rows of the persona export,
whatever the batch size asked); a predict or a collect of ten million rows must not.
Here the file's bytes are read a block at a time (`BLOCK_BYTES`, through gzip when the
file is compressed), each block is cut after the last line end that lies outside quotes,
and polars parses just that block with the same arguments as a whole-file read. The
rest of the block waits for the next one, so memory is about two blocks and their frame.

Where a record ends: a line end outside quotes. In RFC 4180 CSV a quote inside a quoted
field is written twice, so a line end is outside quotes exactly when the quote
characters before it are even in number; with `quote_char = ""` every line end ends a
record.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

#: bytes read at a time (a block grows past it only for a record longer than a block)
BLOCK_BYTES = 4 << 20


def csv_frames(data: Path | bytes, arguments: dict[str, Any], *, batch_size: int,
               block_bytes: int = BLOCK_BYTES) -> Iterator[pl.DataFrame]:
    """Frames of at most `batch_size` rows parsed from `data` (a file, gzip or not, or
    UTF-8 bytes already in memory), with polars' `read_csv` `arguments` (those of
    `csv_dialect.csv_arguments`: every field text, named by the layout).

    The first block is parsed as polars would parse the file's start (header, skipped
    rows); every later block has no header and takes the same column names.
    """
    import io

    import polars as pl

    quote = str(arguments.get("quote_char") or "").encode("utf-8")
    first, yielded = True, False
    with _open(data) as fh:
        for block in _record_blocks(fh, quote, block_bytes):
            if first:
                frame = pl.read_csv(io.BytesIO(block), **arguments, truncate_ragged_lines=False,
                                    raise_if_empty=False)
                names = frame.columns
                first = False
            else:
                later = {**arguments, "has_header": False, "skip_rows": 0, "new_columns": names}
                frame = pl.read_csv(io.BytesIO(block), **later, truncate_ragged_lines=False,
                                    raise_if_empty=False)
            del block
            if frame.height == 0 and not yielded:
                yield frame  # a header alone: its columns still say what the file holds
            for offset in range(0, frame.height, batch_size):
                yielded = True
                yield frame.slice(offset, batch_size)


def _open(data: Path | bytes) -> IO[bytes]:
    import io

    if isinstance(data, bytes | bytearray):
        return io.BytesIO(data)
    raw = open(data, "rb")  # noqa: SIM115  (returned to the caller's with)
    compressed = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw


def _record_blocks(fh: IO[bytes], quote: bytes, block_bytes: int) -> Iterator[bytes]:
    """The stream cut into blocks that each end at a record's end (the last may not end
    in a line end); no block is empty."""
    pending = b""
    while True:
        chunk = fh.read(block_bytes)
        if not chunk:
            if pending:
                yield pending
            return
        buffer = pending + chunk if pending else chunk
        cut = _last_record_end(buffer, quote, start=len(pending))
        if cut <= 0:  # no record ends in it yet: a record longer than a block
            pending = buffer
            continue
        pending = buffer[cut:]
        yield buffer[:cut]


def _last_record_end(buffer: bytes, quote: bytes, *, start: int) -> int:
    """The index just after the last line end of `buffer` outside quotes (0: none).

    `buffer` starts at a record's start, so a line end is outside quotes when the quote
    characters before it are even in number. Only line ends at or after `start` (in the
    newly read part) are tried; the earlier ones were tried already.
    """
    end = buffer.rfind(b"\n")
    if not quote:
        return end + 1
    before = buffer.count(quote, 0, end) if end >= 0 else 0
    while end >= start:
        if before % 2 == 0:
            return end + 1
        previous = buffer.rfind(b"\n", 0, end)
        before -= buffer.count(quote, previous + 1, end)
        end = previous
    return 0
