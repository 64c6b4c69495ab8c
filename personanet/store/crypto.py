"""Encryption at rest: master keys, key files and a streaming authenticated file format.

This module knows bytes and keys, nothing of data frames. The file format is the
STREAM construction of age and Tink's streaming AEAD: a fresh random data key per
file, wrapped by a key-encryption key derived from the master key, then fixed-size
AES-256-GCM chunks whose nonce carries a counter and a last-chunk flag. The format,
byte by byte, and the attack each part stops are described in ``docs/encryption.md``.

Reading is streaming and authenticates every chunk before yielding it, but a stream
can still turn out to be truncated or tampered with *after* earlier chunks were
yielded. Callers that stream (``decrypt_stream``) must therefore not commit any output
until the iterator is exhausted; ``read_encrypted_file`` and ``decrypt_file_to`` do
that for you.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import logging
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from personanet.errors import InputMissingError, IntegrityError, KeyAccessError, OutputError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HEADER_SIZE",
    "KEY_BYTES",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "EncryptingWriter",
    "Header",
    "MasterKey",
    "decrypt_bytes",
    "decrypt_file_to",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_stream",
    "is_encrypted",
    "load_master_key",
    "manifest_seal_key",
    "read_encrypted_file",
    "read_header",
    "rewrap_file",
    "write_encrypted_file",
    "write_key_file",
]

logger = logging.getLogger("personanet")

KEY_BYTES = 32
DEFAULT_CHUNK_SIZE = 64 * 1024
# The sane range keeps a crafted header from making the reader allocate gigabytes
# (upper bound) or spend a GCM call per handful of bytes (lower bound).
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024

# PNG-style magic: the high-bit first byte and the CR LF catch transfers that strip
# the 8th bit or rewrite line endings, before any cryptography is attempted.
MAGIC = b"\x89PNENC\r\n"
FORMAT_VERSION = 1

KEY_ENV = "PERSONANET_KEY"
KEY_FILE_ENV = "PERSONANET_KEY_FILE"

_INFO_PREFIX = b"personanet/v1/"
_KEY_ID_BYTES = 8
_NONCE_PREFIX_BYTES = 7
_WRAP_NONCE_BYTES = 12
_TAG_BYTES = 16
_WRAPPED_KEY_BYTES = KEY_BYTES + _TAG_BYTES
_CHECKSUM_BYTES = 16

# magic | version | key id | chunk size | nonce prefix | wrap nonce   (AAD of the wrap)
_WRAP_AAD = struct.Struct(
    f">{len(MAGIC)}sB{_KEY_ID_BYTES}sI{_NONCE_PREFIX_BYTES}s{_WRAP_NONCE_BYTES}s"
)
_BODY_SIZE = _WRAP_AAD.size + _WRAPPED_KEY_BYTES
HEADER_SIZE = _BODY_SIZE + _CHECKSUM_BYTES
# counter (u32 BE) | last-chunk flag: the 5 bytes after the nonce prefix
_NONCE_TAIL = struct.Struct(">IB")
# Chunks are numbered 0 .. 2**32 - 1; one more would reuse a nonce under the data key.
_MAX_CHUNKS = 2**32
_LAST = 1
_NOT_LAST = 0

# A key file is two short lines; anything much larger is not a key file.
_KEY_FILE_MAX_BYTES = 4096


def _hkdf(material: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


@dataclass(frozen=True, repr=False)
class MasterKey:
    """The 32-byte secret from which every other key is derived.

    Attributes:
        material: the raw secret. Whoever holds it can decrypt every file and recompute
            every pseudonym; it must never be logged, printed or written anywhere but a
            0600 key file. ``repr`` and ``str`` show only the public key id.
    """

    material: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.material, bytes) or len(self.material) != KEY_BYTES:
            raise KeyAccessError(f"a master key must be exactly {KEY_BYTES} bytes")

    @property
    def key_id(self) -> str:
        """Public identifier of the key: 16 lowercase hex characters, safe to log.

        It is a one-way HKDF output, so it names the key without revealing it, and lets
        a reader tell "wrong key" (exit 77) from "damaged file" (exit 65).
        """
        return _hkdf(self.material, _INFO_PREFIX + b"key-id", _KEY_ID_BYTES).hex()

    @classmethod
    def generate(cls) -> MasterKey:
        """Make a new key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_base64(cls, text: str) -> MasterKey:
        """Parse the standard base64 form of a key (surrounding whitespace ignored).

        Raises:
            KeyAccessError: ``text`` is not base64 of exactly 32 bytes. The message never
                repeats ``text``, since a near-miss key is still mostly secret.
        """
        try:
            material = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            material = None
        if material is None or len(material) != KEY_BYTES:
            raise KeyAccessError(f"malformed key: expected base64 of {KEY_BYTES} bytes") from None
        return cls(material)

    def to_base64(self) -> str:
        """The key as standard base64 text. The result is the secret: treat it as such."""
        return base64.b64encode(self.material).decode("ascii")

    def derive(self, purpose: str, length: int = KEY_BYTES) -> bytes:
        """Derive an independent subkey with HKDF-SHA256.

        Args:
            purpose: a label such as ``"pseudonym"`` (HMAC key for identifiers) or
                ``"kek"`` (wraps data keys). Different purposes give unrelated keys, so
                leaking one subkey reveals neither the master key nor its siblings.
            length: bytes of output; 32 suits AES-256 and HMAC-SHA256.
        """
        if not purpose or purpose == "key-id":
            # "key-id" would hand out the public key id as if it were a secret.
            raise ValueError(f"invalid key purpose {purpose!r}")
        return _hkdf(self.material, _INFO_PREFIX + purpose.encode("utf-8"), length)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return hmac.compare_digest(self.material, other.material)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    __str__ = __repr__


#: HKDF purpose of the key that seals artifact manifests (HMAC-SHA256). Its own purpose,
#: so the manifest MAC key is unrelated to the key wrapping data keys or the pseudonym key.
MANIFEST_SEAL_PURPOSE = "manifest-seal"


def manifest_seal_key(key: MasterKey) -> bytes:
    """The 32-byte HMAC key that seals manifests under `key` (see ``docs/encryption.md``)."""
    return key.derive(MANIFEST_SEAL_PURPOSE)


# --------------------------------------------------------------------------- key files


def load_master_key(environ: Mapping[str, str] | None = None) -> MasterKey:
    """Load the master key named by the environment.

    ``PERSONANET_KEY_FILE`` (a path to a key file) wins over ``PERSONANET_KEY`` (the key
    itself in base64), because a file can be protected by permissions while an
    environment variable leaks into child processes and ``/proc``.

    Args:
        environ: the variables to read; ``None`` means ``os.environ``.

    Raises:
        KeyAccessError: no key configured, or the file is missing, unreadable or
            malformed. Messages name the path, never the key.
    """
    env = os.environ if environ is None else environ
    key_file = env.get(KEY_FILE_ENV, "")
    if key_file:
        return _read_key_file(Path(key_file))
    key_text = env.get(KEY_ENV, "")
    if key_text:
        try:
            return MasterKey.from_base64(key_text)
        except KeyAccessError:
            raise KeyAccessError(
                f"{KEY_ENV} is not a valid key: expected base64 of {KEY_BYTES} bytes"
            ) from None
    raise KeyAccessError(
        f"no key: set {KEY_FILE_ENV} to a key file made by `personanet keys generate PATH`, "
        f"or {KEY_ENV}"
    )


def _read_key_file(path: Path) -> MasterKey:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_KEY_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        raise KeyAccessError(
            f"key file {path} does not exist; create one with `personanet keys generate {path}`"
        ) from None
    except OSError as exc:
        raise KeyAccessError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode) or len(raw) > _KEY_FILE_MAX_BYTES:
        raise KeyAccessError(f"key file {path} is not a personanet key file")
    if stat.S_IMODE(mode) & 0o077:
        logger.warning(
            "key file %s is accessible by group or others (mode %o); run `chmod 600 %s`",
            path,
            stat.S_IMODE(mode),
            path,
        )
    try:
        lines = [line.strip() for line in raw.decode("ascii").splitlines()]
    except UnicodeDecodeError:
        lines = []
    payload = [line for line in lines if line and not line.startswith("#")]
    if len(payload) != 1:
        raise KeyAccessError(
            f"key file {path} is malformed: expected one base64 line of a {KEY_BYTES}-byte key"
        )
    try:
        return MasterKey.from_base64(payload[0])
    except KeyAccessError:
        raise KeyAccessError(
            f"key file {path} is malformed: expected one base64 line of a {KEY_BYTES}-byte key"
        ) from None


def write_key_file(path: Path, key: MasterKey) -> None:
    """Write ``key`` to a new file readable by its owner only (mode 0600).

    The file is created exclusively, so an existing key (which may be the only way to
    read existing data) is never overwritten, and it is fsynced with its directory
    entry, because data encrypted under a key lost in a crash is lost too.

    Raises:
        OutputError: the file exists or cannot be created.
    """
    path = Path(path)
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    text = f"# personanet master key, id {key.key_id}, created {created}\n{key.to_base64()}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise OutputError(
            f"key file {path} already exists; refusing to overwrite a key (move it away first)"
        ) from None
    except OSError as exc:
        raise OutputError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        # The creation mode is filtered by the umask; fchmod is not.
        os.fchmod(fd, 0o600)
        _write_all_fd(fd, text.encode("ascii"))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise OutputError(f"cannot write key file {path}: {exc.strerror or exc}") from None
    os.close(fd)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- the header


@dataclass(frozen=True)
class Header:
    """The fixed-size header at the start of every encrypted file (see docs/encryption.md).

    Attributes:
        version: format version; only 1 exists.
        key_id: id of the master key whose KEK wrapped the data key (16 hex chars).
        chunk_size: plaintext bytes per chunk; every chunk but the last is this size.
        nonce_prefix: 7 random bytes opening every chunk nonce of this file.
        wrap_nonce: 12 random bytes, the AES-GCM nonce of the data-key wrap.
        wrapped_key: the data key sealed under the KEK (32 bytes + 16-byte tag).
    """

    version: int
    key_id: str
    chunk_size: int
    nonce_prefix: bytes
    wrap_nonce: bytes
    wrapped_key: bytes

    @property
    def wrap_aad(self) -> bytes:
        """Every header field before the wrapped key: what the wrap authenticates."""
        return _WRAP_AAD.pack(
            MAGIC,
            self.version,
            bytes.fromhex(self.key_id),
            self.chunk_size,
            self.nonce_prefix,
            self.wrap_nonce,
        )

    @property
    def payload_aad(self) -> bytes:
        """The fields every chunk authenticates: those a rewrap leaves unchanged."""
        return (
            MAGIC + bytes([self.version]) + struct.pack(">I", self.chunk_size) + self.nonce_prefix
        )

    def to_bytes(self) -> bytes:
        """Serialise, appending the truncated SHA-256 checksum."""
        body = self.wrap_aad + self.wrapped_key
        return body + hashlib.sha256(body).digest()[:_CHECKSUM_BYTES]


def _new_header(key: MasterKey, chunk_size: int, data_key: bytes, nonce_prefix: bytes) -> Header:
    unwrapped = Header(
        version=FORMAT_VERSION,
        key_id=key.key_id,
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        wrap_nonce=secrets.token_bytes(_WRAP_NONCE_BYTES),
        wrapped_key=b"",
    )
    wrapped = AESGCM(key.derive("kek")).encrypt(unwrapped.wrap_nonce, data_key, unwrapped.wrap_aad)
    return replace(unwrapped, wrapped_key=wrapped)


def _parse_header(raw: bytes, name: str) -> Header:
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise IntegrityError(f"file {name} is not a personanet encrypted file (bad magic)")
    if len(raw) < HEADER_SIZE:
        raise IntegrityError(f"file {name} is truncated inside its encryption header")
    version = raw[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise IntegrityError(
            f"file {name} uses encryption format version {version}; this personanet reads "
            f"version {FORMAT_VERSION}"
        )
    body, checksum = raw[:_BODY_SIZE], raw[_BODY_SIZE:HEADER_SIZE]
    # Unkeyed on purpose: it only separates "damaged header" (65) from "wrong key" (77);
    # authenticity comes from the wrap and the chunk tags.
    if not hmac.compare_digest(hashlib.sha256(body).digest()[:_CHECKSUM_BYTES], checksum):
        raise IntegrityError(f"file {name} has a corrupt encryption header (checksum mismatch)")
    _magic, version, key_id, chunk_size, nonce_prefix, wrap_nonce = _WRAP_AAD.unpack_from(body)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError(
            f"file {name} declares chunk size {chunk_size}, outside "
            f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
        )
    return Header(
        version=version,
        key_id=key_id.hex(),
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        wrap_nonce=wrap_nonce,
        wrapped_key=body[_WRAP_AAD.size :],
    )


def read_header(path_or_file: str | os.PathLike[str] | BinaryIO) -> Header:
    """Read and check the header of an encrypted file, without any key.

    ``path_or_file`` is a path, or a binary file positioned at the start of the header
    (it is left positioned just after it).

    Raises:
        IntegrityError: not our format, an unknown version, a corrupt header or an
            insane chunk size.
        InputMissingError: the path does not exist or cannot be read.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = Path(path_or_file)
        with _open_input(path) as f:
            return _parse_header(_read_up_to(f, HEADER_SIZE), str(path))
    return _parse_header(_read_up_to(path_or_file, HEADER_SIZE), _stream_name(path_or_file))


def _unwrap(header: Header, key: MasterKey, name: str) -> bytes:
    if header.key_id != key.key_id:
        raise KeyAccessError(
            f"file {name} is encrypted under key id {header.key_id} "
            f"but the loaded key has id {key.key_id}"
        )
    try:
        return AESGCM(key.derive("kek")).decrypt(
            header.wrap_nonce, header.wrapped_key, header.wrap_aad
        )
    except InvalidTag:
        # The key id matched, so the key is right and the header was forged or damaged.
        raise IntegrityError(
            f"file {name}: the data key failed authentication (header tampered with)"
        ) from None


# --------------------------------------------------------------------------- encryption


class EncryptingWriter:
    """A write-only binary file that encrypts into ``dst`` with constant memory.

    Write plaintext in pieces of any size; ``close()`` seals the last chunk with the
    last-chunk flag. Only ``close()`` makes the output valid: a stream left unclosed,
    or a ``with`` block left by an exception, has no final chunk and every reader
    rejects it as truncated, so a half-written file can never pass for a whole one.
    ``dst`` is not closed; it is flushed on ``close()``.

    Args:
        dst: binary file to receive the ciphertext, positioned where the header goes.
        key: master key; only its KEK and id are used (to wrap the fresh data key).
        chunk_size: plaintext bytes per chunk. Memory use is about two chunks.
    """

    def __init__(
        self, dst: BinaryIO, key: MasterKey, *, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        header = _new_header(key, chunk_size, data_key, secrets.token_bytes(_NONCE_PREFIX_BYTES))
        self._dst = dst
        self._aead = AESGCM(data_key)
        self._aad = header.payload_aad
        self._nonce_prefix = header.nonce_prefix
        self._chunk_size = chunk_size
        self._pending = bytearray()
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
        """Flush ``dst``. Buffered plaintext stays buffered: chunks are sealed whole."""
        self._dst.flush()

    def close(self) -> None:
        """Seal the final chunk and flush ``dst``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._seal(self._pending, last=True)
        self._pending = bytearray()
        self._dst.flush()

    def abort(self) -> None:
        """Stop without sealing a final chunk, leaving output every reader rejects."""
        self._closed = True
        self._pending = bytearray()

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
        _write_all(self._dst, self._aead.encrypt(nonce, plaintext, self._aad))
        self._counter += 1


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
    name = _stream_name(src)
    header = _parse_header(_read_up_to(src, HEADER_SIZE), name)
    data_key = _unwrap(header, key, name)
    return _decrypt_chunks(src, header, AESGCM(data_key), name)


def _decrypt_chunks(src: BinaryIO, header: Header, aead: AESGCM, name: str) -> Iterator[bytes]:
    sealed_size = header.chunk_size + _TAG_BYTES
    aad = header.payload_aad
    prefix = header.nonce_prefix
    counter = 0
    sealed = _read_up_to(src, sealed_size)
    while True:
        if counter >= _MAX_CHUNKS:
            raise IntegrityError(f"file {name} has more chunks than the format allows")
        if len(sealed) < sealed_size:
            # A short read means end of file: this must be the last chunk.
            following = b""
        else:
            # Reading one chunk ahead tells a full last chunk from a full middle one.
            following = _read_up_to(src, sealed_size)
        last = not following
        if len(sealed) < _TAG_BYTES or (last and counter > 0 and len(sealed) == _TAG_BYTES):
            # Writers emit an empty last chunk only for an empty plaintext.
            raise IntegrityError(f"file {name} is truncated (chunk {counter} is incomplete)")
        nonce = prefix + _NONCE_TAIL.pack(counter, _LAST if last else _NOT_LAST)
        try:
            plaintext = aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise IntegrityError(
                f"file {name}: chunk {counter} failed authentication "
                "(the file is truncated, extended, reordered or tampered with)"
            ) from None
        yield plaintext
        if last:
            return
        sealed = following
        counter += 1


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
    with _open_input(path) as f:
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
    tmp = dst_path.with_name(f"{dst_path.name}.tmp-{secrets.token_hex(6)}")
    with _open_input(path) as src:
        # Checking the header first means a wrong key never creates the temporary file.
        plaintext = decrypt_stream(src, key)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise OutputError(f"cannot create {tmp}: {exc.strerror or exc}") from None
        try:
            with open(fd, "wb") as out:
                out.writelines(plaintext)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dst_path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {dst_path}: {exc.strerror or exc}") from None
            raise
    _fsync_dir(dst_path.parent)


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` starts with the format's magic bytes (no authentication implied).

    Raises:
        InputMissingError: the file does not exist or cannot be read.
    """
    with _open_input(Path(path)) as f:
        return f.read(len(MAGIC)) == MAGIC


def rewrap_file(path: Path, old: MasterKey, new: MasterKey) -> None:
    """Re-wrap the data key of ``path`` under ``new`` without touching the payload.

    Only the header changes: the chunks are copied byte for byte, since their AAD holds
    no key id or wrap. The new file is written beside the old one, fsynced and renamed
    over it, so each file is always wholly under one key or the other. A file already
    under ``new`` is left alone, so an interrupted rotation can simply be run again.

    Note that rewrapping does not re-encrypt: anyone who held the old master key *and*
    a copy of the old header can still read the payload. Rotation protects against
    future use of a retired key, not against a past compromise.

    Raises:
        KeyAccessError: the file is under neither ``old`` nor ``new``.
        IntegrityError: the header is corrupt or its wrap fails to authenticate.
        InputMissingError: the file does not exist or cannot be read.
        OutputError: the new file cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.rewrap-tmp")
    with _open_input(path) as src:
        header = _parse_header(_read_up_to(src, HEADER_SIZE), str(path))
        if header.key_id == new.key_id:
            return
        data_key = _unwrap(header, old, str(path))
        rewrapped = _new_header(new, header.chunk_size, data_key, header.nonce_prefix)
        mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode)
        # A leftover from an interrupted rotation holds only ciphertext: safe to discard.
        tmp.unlink(missing_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as out:
                os.fchmod(out.fileno(), mode)
                out.write(rewrapped.to_bytes())
                shutil.copyfileobj(src, out, DEFAULT_CHUNK_SIZE * 16)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot rewrap {path}: {exc.strerror or exc}") from None
            raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- helpers


def _open_input(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputMissingError(f"cannot read {path}: {exc.strerror or exc}") from None


def _stream_name(f: object) -> str:
    name = getattr(f, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "<stream>"


def _read_up_to(f: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, or fewer only at end of file (pipes may return short reads)."""
    data = f.read(size)
    if data is None or len(data) == size or not data:
        return data or b""
    parts = [data]
    have = len(data)
    while have < size:
        more = f.read(size - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = f.write(view)
        # Buffered files write everything; raw ones may not, and None means "would block".
        if written is None:
            raise OutputError(f"non-blocking output {_stream_name(f)} is not supported")
        view = view[written:]


def _write_all_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    # Makes a just-created or renamed entry durable. Some platforms and filesystems
    # cannot open or fsync a directory; the data itself is already synced, so go on.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
