"""Chunks are sealed and opened in batches through reused buffers (docs/encryption.md).

Writing fills one buffer with several sealed chunks per syscall; reading fills one
buffer with several sealed chunks, moves the undecided last one to its front and reads
behind it; decrypting to a file opens chunks in place into one reused plaintext buffer.
A reused buffer must never let one chunk's bytes leak into the next: these tests
shrink the batch to a few chunks so every boundary (full batch, chunk cut by a batch,
short or full final chunk) is crossed with small files, then check the default batch
with 64 KiB chunks once.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from personanet.errors import IntegrityError
from personanet.store import crypto
from personanet.store.crypto import (
    DEFAULT_CHUNK_SIZE,
    EncryptingWriter,
    decrypt_bytes,
    decrypt_file_to,
    decrypt_stream,
    encrypt_stream,
    read_encrypted_file,
    write_encrypted_file,
)
from personanet.store.crypto_header import HEADER_SIZE
from personanet.store.keys import MasterKey

CHUNK = 1024
SEALED = CHUNK + 16
BATCH_CHUNKS = 3


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "_BATCH_BYTES", BATCH_CHUNKS * SEALED)


def plaintext(size: int, seed: int = 0) -> bytes:
    # Random bytes: a stale byte left from an earlier chunk would not match by chance.
    return random.Random(seed).randbytes(size)


def seal(data: bytes, key: MasterKey) -> bytes:
    out = io.BytesIO()
    encrypt_stream([data], out, key, chunk_size=CHUNK)
    return out.getvalue()


class ShortReads(io.RawIOBase):
    """A pipe-like stream: every read returns at most a few bytes."""

    def __init__(self, data: bytes, most: int) -> None:
        self._data, self._pos, self._most = data, 0, most

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        piece = self._data[self._pos : self._pos + min(self._most, len(buffer))]
        buffer[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)


# Around one batch (3 chunks) and two: full and short final chunks on either side.
SIZES = [0, 1, CHUNK, 2 * CHUNK + 5, 3 * CHUNK - 1, 3 * CHUNK, 3 * CHUNK + 1, 4 * CHUNK,
         6 * CHUNK, 6 * CHUNK + 1, 7 * CHUNK + 513, 10 * CHUNK]


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_every_reader_returns_exactly_the_plaintext_across_batches(
    tmp_path: Path, key: MasterKey, size: int
) -> None:
    data = plaintext(size, seed=size)
    blob = seal(data, key)
    assert len(blob) == HEADER_SIZE + size + 16 * max(1, -(-size // CHUNK))
    assert decrypt_bytes(blob, key) == data
    assert [len(piece) for piece in decrypt_stream(io.BytesIO(blob), key)] == [
        min(CHUNK, size - start) for start in range(0, max(size, 1), CHUNK)
    ]
    sealed_path, plain_path = tmp_path / "data.enc", tmp_path / "data.bin"
    sealed_path.write_bytes(blob)
    assert read_encrypted_file(sealed_path, key) == data
    decrypt_file_to(sealed_path, plain_path, key)
    assert plain_path.read_bytes() == data


@pytest.mark.usefixtures("small_batches")
def test_yielded_chunks_stay_valid_after_the_read_buffer_is_reused(key: MasterKey) -> None:
    data = plaintext(8 * CHUNK + 100)
    pieces = list(decrypt_stream(io.BytesIO(seal(data, key)), key))
    assert all(isinstance(piece, bytes) for piece in pieces)
    assert b"".join(pieces) == data


@pytest.mark.usefixtures("small_batches")
@pytest.mark.parametrize("most", [1, 7, SEALED - 1, SEALED + 3])
def test_short_reads_from_a_pipe_are_filled(key: MasterKey, most: int) -> None:
    data = plaintext(5 * CHUNK + 9)
    reader = io.BufferedReader(ShortReads(seal(data, key), most), buffer_size=16)
    assert b"".join(decrypt_stream(reader, key)) == data
    assert b"".join(decrypt_stream(ShortReads(seal(data, key), most), key)) == data


@pytest.mark.usefixtures("small_batches")
def test_a_cut_at_any_chunk_or_batch_boundary_is_rejected(tmp_path: Path, key: MasterKey
                                                          ) -> None:
    data = plaintext(7 * CHUNK)
    blob = seal(data, key)
    source, target = tmp_path / "in.enc", tmp_path / "out.bin"
    for chunks in range(1, 7):
        for cut in (HEADER_SIZE + chunks * SEALED, HEADER_SIZE + chunks * SEALED - 1):
            with pytest.raises(IntegrityError):
                decrypt_bytes(blob[:cut], key)
            source.write_bytes(blob[:cut])
            with pytest.raises(IntegrityError):
                decrypt_file_to(source, target, key)
            assert not target.exists()


@pytest.mark.usefixtures("small_batches")
def test_a_tampered_chunk_in_a_later_batch_releases_only_the_chunks_before_it(
    key: MasterKey,
) -> None:
    data = plaintext(8 * CHUNK)
    tampered = bytearray(seal(data, key))
    tampered[HEADER_SIZE + 5 * SEALED + 3] ^= 1
    released: list[bytes] = []
    with pytest.raises(IntegrityError, match="chunk 5"):
        released.extend(decrypt_stream(io.BytesIO(bytes(tampered)), key))
    assert b"".join(released) == data[: 5 * CHUNK]


@pytest.mark.usefixtures("small_batches")
def test_writer_output_is_the_same_whatever_the_write_pattern(key: MasterKey) -> None:
    data = plaintext(7 * CHUNK + 300)
    out = io.BytesIO()
    with EncryptingWriter(out, key, chunk_size=CHUNK) as writer:
        for start in range(0, len(data), 700):
            writer.write(data[start : start + 700])
            if start % 2100 == 0:
                writer.flush()  # a flush mid-batch writes what is sealed, nothing more
    assert decrypt_bytes(out.getvalue(), key) == data


def test_flush_writes_every_sealed_chunk_and_no_more(key: MasterKey) -> None:
    out = io.BytesIO()
    writer = EncryptingWriter(out, key, chunk_size=CHUNK)
    writer.write(plaintext(CHUNK))
    writer.flush()
    # A full chunk is sealed only once more data proves it is not the last.
    assert len(out.getvalue()) == HEADER_SIZE
    writer.write(plaintext(CHUNK + 10))
    writer.flush()
    assert len(out.getvalue()) == HEADER_SIZE + 2 * SEALED
    writer.close()
    assert len(out.getvalue()) == HEADER_SIZE + 2 * SEALED + 10 + 16


def test_default_batches_of_64_kib_chunks_roundtrip_file_to_file(
    tmp_path: Path, key: MasterKey
) -> None:
    # 40 chunks: more than two default batches, then a short final chunk.
    data = plaintext(40 * DEFAULT_CHUNK_SIZE + 12345)
    sealed_path, plain_path = tmp_path / "big.enc", tmp_path / "big.bin"
    write_encrypted_file(sealed_path, iter([data[:777], data[777:]]), key)
    decrypt_file_to(sealed_path, plain_path, key)
    assert plain_path.read_bytes() == data
    assert read_encrypted_file(sealed_path, key) == data
