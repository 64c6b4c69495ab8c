"""Encryption at rest: the streaming authenticated file format, its chunks and its files.

This module knows bytes and keys, nothing of data frames; the keys themselves (master
key, key files, derived subkeys) are `store.keys`'; the header and the wrap of the
data key (``rewrap_file``, re-exported here) are `store.crypto_header`'s. The file
format is the STREAM construction of age and Tink's streaming AEAD: a fresh random
data key per file, wrapped by a key-encryption key derived from the master key, then
fixed-size AES-256-GCM chunks whose nonce carries a counter and a last-chunk flag. The
format, byte by byte, and the attack each part stops are described in
``docs/encryption.md``.

Reading is streaming and authenticates every chunk before yielding it, but a stream
can still turn out to be truncated or tampered with *after* earlier chunks were
yielded. Callers that stream (``decrypt_stream``) must therefore not commit any output
until the iterator is exhausted; ``read_encrypted_file`` and ``decrypt_file_to`` do
that for you.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from personanet.errors import InputMissingError, IntegrityError, OutputError
from personanet.store.crypto_header import (
    HEADER_SIZE,
    MAGIC,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    NONCE_PREFIX_BYTES,
    TAG_BYTES,
    Header,
    new_header,
    open_input,
    parse_header,
    read_up_to,
    rewrap_file,
    stream_name,
    unwrap_data_key,
)
from personanet.store.fsutil import atomic_write
from personanet.store.keys import KEY_BYTES, MasterKey

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "EncryptingWriter",
    "decrypt_bytes",
    "decrypt_file_to",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_stream",
    "is_encrypted",
    "read_encrypted_file",
    "rewrap_file",
    "write_encrypted_file",
]


DEFAULT_CHUNK_SIZE = 64 * 1024

# counter (u32 BE) | last-chunk flag: the 5 bytes after the nonce prefix
_NONCE_TAIL = struct.Struct(">IB")
# Chunks are numbered 0 .. 2**32 - 1; one more would reuse a nonce under the data key.
_MAX_CHUNKS = 2**32
_LAST = 1
_NOT_LAST = 0
# Sealed chunks go to and come from the disk in batches of about this many bytes,
# through buffers reused from chunk to chunk: one write per chunk made encryption spend
# more time in the kernel than in AES-GCM, its 64 KiB + 16-byte pieces straddling pages
# (1 GiB to the page cache: 0.39 s, batched 0.25 s; benchmarks/bench_crypto.py).
_BATCH_BYTES = 1024 * 1024


def _chunks_per_batch(sealed_size: int) -> int:
    return max(1, _BATCH_BYTES // sealed_size)


# --------------------------------------------------------------------------- encryption


class EncryptingWriter:
    """A write-only binary file that encrypts into ``dst`` with constant memory.

    Write plaintext in pieces of any size; ``close()`` seals the last chunk with the
    last-chunk flag. Sealed chunks are written to ``dst`` a batch (about 1 MiB) at a
    time, and at ``flush()`` and ``close()``. Only ``close()`` makes the output valid:
    a stream left unclosed, or a ``with`` block left by an exception, has no final
    chunk and every reader rejects it as truncated, so a half-written file can never
    pass for a whole one.
    ``dst`` is not closed; it is flushed on ``close()``.

    Args:
        dst: binary file to receive the ciphertext, positioned where the header goes.
        key: master key; only its KEK and id are used (to wrap the fresh data key).
        chunk_size: plaintext bytes per chunk. Memory use is about one chunk and
            one batch.
    """

    def __init__(
        self, dst: BinaryIO, key: MasterKey, *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        header = new_header(key, chunk_size, data_key, secrets.token_bytes(NONCE_PREFIX_BYTES))
        self._dst = dst
        self._aead = AESGCM(data_key)
        self._aad = header.payload_aad
        self._nonce_prefix = header.nonce_prefix
        self._chunk_size = chunk_size
        self._pending = bytearray()
        sealed_size = chunk_size + TAG_BYTES
        self._batch = memoryview(bytearray(sealed_size * _chunks_per_batch(sealed_size)))
        self._batch_used = 0
        self._counter = 0
        self._plaintext_bytes = 0
        self._closed = False
        _write_all(dst, header.to_bytes())

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def plaintext_bytes(self) -> int:
        """Plaintext bytes accepted so far."""
        return self._plaintext_bytes

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt ``data`` (buffered up to one chunk); returns ``len(data)``."""
        if self._closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        size, pos, chunk = len(view), 0, self._chunk_size
        while pos < size:
            # A full pending chunk is sealed only once more data proves it is not the
            # last: a plaintext of exactly n chunks must end with a full *final* chunk.
            if len(self._pending) == chunk:
                self._seal(self._pending, last=False)
                self._pending.clear()
            if not self._pending:
                while size - pos > chunk:
                    self._seal(view[pos : pos + chunk], last=False)
                    pos += chunk
            take = min(chunk - len(self._pending), size - pos)
            self._pending += view[pos : pos + take]
            pos += take
        self._plaintext_bytes += size
        return size

    def flush(self) -> None:
        """Write the sealed chunks and flush ``dst``. Plaintext short of a chunk stays
        buffered: chunks are sealed whole."""
        self._write_batch()
        self._dst.flush()

    def close(self) -> None:
        """Seal the final chunk and flush ``dst``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._seal(self._pending, last=True)
        self._pending = bytearray()
        self._write_batch()
        self._dst.flush()

    def abort(self) -> None:
        """Stop without sealing a final chunk, leaving output every reader rejects."""
        self._closed = True
        self._pending = bytearray()
        self._batch_used = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _seal(self, plaintext: bytes | bytearray | memoryview, *, last: bool) -> None:
        if self._counter >= _MAX_CHUNKS:
            self.abort()
            raise OutputError("plaintext too large for one encrypted file (chunk counter full)")
        nonce = self._nonce_prefix + _NONCE_TAIL.pack(self._counter, _LAST if last else _NOT_LAST)
        end = self._batch_used + len(plaintext) + TAG_BYTES
        self._aead.encrypt_into(nonce, plaintext, self._aad, self._batch[self._batch_used : end])
        self._batch_used = end
        self._counter += 1
        if len(self._batch) - end < self._chunk_size + TAG_BYTES:
            self._write_batch()

    def _write_batch(self) -> None:
        _write_all(self._dst, self._batch[: self._batch_used])
        self._batch_used = 0


def encrypt_stream(
    chunks: Iterable[bytes],
    dst: BinaryIO,
    key: MasterKey,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Encrypt an iterable of plaintext pieces (any sizes) into ``dst``.

    If iterating ``chunks`` raises, no final chunk is written, so the partial output is
    rejected by every reader. Returns the number of plaintext bytes encrypted.
    """
    with EncryptingWriter(dst, key, chunk_size=chunk_size) as writer:
        for piece in chunks:
            writer.write(piece)
    return writer.plaintext_bytes


def encrypt_bytes(data: bytes, key: MasterKey) -> bytes:
    """Encrypt ``data`` in memory into the file format."""
    out = io.BytesIO()
    encrypt_stream([data], out, key)
    return out.getvalue()


# --------------------------------------------------------------------------- decryption


def decrypt_stream(src: BinaryIO, key: MasterKey) -> Iterator[bytes]:
    """Decrypt ``src``, yielding plaintext chunks that have each been authenticated.

    The header is read and checked when this is called (so a wrong key fails at once);
    chunks are checked as they are iterated. Truncation, appended bytes, reordered,
    dropped or transplanted chunks are only known at the point they occur, possibly
    after earlier chunks were yielded: do not commit anything derived from the
    plaintext until the iterator is exhausted without error.

    Raises:
        KeyAccessError: the file is under another key id than ``key``'s.
        IntegrityError: not our format, or corrupt, truncated or tampered with.
    """
    header, aead, name = _open_header(src, key)
    return _decrypt_chunks(src, header, aead, name)


def _open_header(src: BinaryIO, key: MasterKey) -> tuple[Header, AESGCM, str]:
    name = stream_name(src)
    header = parse_header(read_up_to(src, HEADER_SIZE), name)
    return header, AESGCM(unwrap_data_key(header, key, name)), name


def _decrypt_chunks(src: BinaryIO, header: Header, aead: AESGCM, name: str) -> Iterator[bytes]:
    aad = header.payload_aad
    for counter, nonce, sealed in _sealed_chunks(src, header, name):
        try:
            plaintext = aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise _failed_authentication(name, counter) from None
        yield plaintext


def _decrypt_into_file(src: BinaryIO, header: Header, aead: AESGCM, name: str,
                       out: BinaryIO) -> None:
    """Decrypt every chunk in place into a reused batch, written to ``out`` when full."""
    aad, chunk_size = header.payload_aad, header.chunk_size
    batch = memoryview(bytearray(chunk_size * _chunks_per_batch(chunk_size + TAG_BYTES)))
    used = 0
    for counter, nonce, sealed in _sealed_chunks(src, header, name):
        end = used + len(sealed) - TAG_BYTES
        try:
            aead.decrypt_into(nonce, sealed, aad, batch[used:end])
        except InvalidTag:
            raise _failed_authentication(name, counter) from None
        used = end
        if len(batch) - used < chunk_size:
            _write_all(out, batch[:used])
            used = 0
    _write_all(out, batch[:used])


def _sealed_chunks(src: BinaryIO, header: Header, name: str
                   ) -> Iterator[tuple[int, bytes, memoryview]]:
    """Each chunk's number, nonce and sealed bytes, checked for shape, not yet authenticated.

    The sealed bytes are a view into a reused read buffer, valid only until the next
    chunk is taken.
    """
    sealed_size = header.chunk_size + TAG_BYTES
    # At least two chunks, so a full one is always followed by the bytes that say
    # whether it is the last: a plaintext of exactly n chunks ends with a full final one.
    buffer = memoryview(bytearray(sealed_size * max(2, _chunks_per_batch(sealed_size))))
    filled = _read_into(src, buffer)
    at_end = filled < len(buffer)
    start = counter = 0
    while True:
        if counter >= _MAX_CHUNKS:
            raise IntegrityError(f"file {name} has more chunks than the format allows")
        remaining = filled - start
        if remaining <= sealed_size and not at_end:
            # Whether this chunk is the last depends on bytes not read yet: move it to
            # the front and read behind it.
            buffer[:remaining] = buffer[start:filled]
            filled = remaining + _read_into(src, buffer[remaining:])
            at_end = filled < len(buffer)
            start = 0
            continue
        last = remaining <= sealed_size
        end = filled if last else start + sealed_size
        if end - start < TAG_BYTES or (last and counter > 0 and end - start == TAG_BYTES):
            # Writers emit an empty last chunk only for an empty plaintext.
            raise IntegrityError(f"file {name} is truncated (chunk {counter} is incomplete)")
        nonce = header.nonce_prefix + _NONCE_TAIL.pack(counter, _LAST if last else _NOT_LAST)
        yield counter, nonce, buffer[start:end]
        if last:
            return
        start = end
        counter += 1


def _failed_authentication(name: str, counter: int) -> IntegrityError:
    return IntegrityError(
        f"file {name}: chunk {counter} failed authentication "
        "(the file is truncated, extended, reordered or tampered with)"
    )


def decrypt_bytes(blob: bytes, key: MasterKey) -> bytes:
    """Decrypt an in-memory encrypted blob; returns only after full authentication."""
    return b"".join(decrypt_stream(io.BytesIO(blob), key))


# --------------------------------------------------------------------------- files


def write_encrypted_file(path: Path, data: bytes | Iterable[bytes], key: MasterKey) -> None:
    """Encrypt ``data`` (bytes, or an iterable of pieces) into ``path`` and fsync it.

    The file is created (or truncated) with mode 0600. This is a plain write: for an
    all-or-nothing result, write inside a temporary directory and rename that.

    Raises:
        OutputError: the file cannot be written.
    """
    path = Path(path)
    pieces: Iterable[bytes] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as f:
            encrypt_stream(pieces, f, key)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_encrypted_file(path: Path, key: MasterKey) -> bytes:
    """Decrypt a whole file into memory; returns only after every chunk authenticated.

    Raises:
        KeyAccessError: the file is under another key.
        IntegrityError: the file is corrupt, truncated or tampered with.
        InputMissingError: the file does not exist or cannot be read.
    """
    path = Path(path)
    with open_input(path) as f:
        try:
            return b"".join(decrypt_stream(f, key))
        except OSError as exc:
            raise InputMissingError(f"cannot read {path}: {exc.strerror or exc}") from None


def decrypt_file_to(path: Path, dst_path: Path, key: MasterKey) -> None:
    """Decrypt ``path`` into ``dst_path``, streaming, all or nothing.

    Plaintext goes to a 0600 temporary file beside ``dst_path``, which is renamed over
    ``dst_path`` only after the last chunk authenticated; on any failure it is removed,
    so a tampered or cut file leaves no output at all.

    Raises:
        KeyAccessError, IntegrityError, InputMissingError: as ``read_encrypted_file``.
        OutputError: the output cannot be written.
    """
    path, dst_path = Path(path), Path(dst_path)
    with open_input(path) as src:
        # Checking the header first means a wrong key never creates the temporary file.
        header, aead, name = _open_header(src, key)
        with atomic_write(dst_path, mode=0o600) as out:
            _decrypt_into_file(src, header, aead, name, out)


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` starts with the format's magic bytes (no authentication implied).

    Raises:
        InputMissingError: the file does not exist or cannot be read.
    """
    with open_input(Path(path)) as f:
        return f.read(len(MAGIC)) == MAGIC


# --------------------------------------------------------------------------- helpers


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = f.write(view)
        # Buffered files write everything; raw ones may not, and None means "would block".
        if written is None:
            raise OutputError(f"non-blocking output {stream_name(f)} is not supported")
        view = view[written:]


def _read_into(f: BinaryIO, buffer: memoryview) -> int:
    """Fill ``buffer``, short only at end of file (pipes may return short reads)."""
    filled = 0
    while filled < len(buffer):
        # None means "would block" on a raw non-blocking stream: read as the end, so a
        # stream cut there fails as truncated.
        got = f.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not got:
            break
        filled += got
    return filled
