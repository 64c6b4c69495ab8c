"""The header of an encrypted file: its bytes, the wrap of the file's data key, their checks.

Every encrypted file opens with this fixed-size header (``docs/encryption.md`` gives it
byte by byte, with the attack each field stops). It names the master key by its public
id and carries the file's random data key wrapped under that key's KEK, which
``rewrap_file`` moves to another master key; the chunks that follow are `store.crypto`'s.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import stat
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from personanet.errors import InputMissingError, IntegrityError, KeyAccessError
from personanet.store.fsutil import TMP_PREFIX, atomic_write
from personanet.store.keys import KEK_PURPOSE, KEY_BYTES, KEY_ID_BYTES, MasterKey

# The sane range keeps a crafted header from making the reader allocate gigabytes
# (upper bound) or spend a GCM call per handful of bytes (lower bound).
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024

# PNG-style magic: the high-bit first byte and the CR LF catch transfers that strip
# the 8th bit or rewrite line endings, before any cryptography is attempted.
MAGIC = b"\x89PNENC\r\n"
FORMAT_VERSION = 1

NONCE_PREFIX_BYTES = 7
_WRAP_NONCE_BYTES = 12
TAG_BYTES = 16
_WRAPPED_KEY_BYTES = KEY_BYTES + TAG_BYTES
_CHECKSUM_BYTES = 16

# magic | version | key id | chunk size | nonce prefix | wrap nonce   (AAD of the wrap)
_WRAP_AAD = struct.Struct(
    f">{len(MAGIC)}sB{KEY_ID_BYTES}sI{NONCE_PREFIX_BYTES}s{_WRAP_NONCE_BYTES}s"
)
_BODY_SIZE = _WRAP_AAD.size + _WRAPPED_KEY_BYTES
HEADER_SIZE = _BODY_SIZE + _CHECKSUM_BYTES
# A rewrap copies the chunks after the header in pieces this large.
_COPY_BYTES = 1024 * 1024


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


def new_header(key: MasterKey, chunk_size: int, data_key: bytes, nonce_prefix: bytes) -> Header:
    unwrapped = Header(
        version=FORMAT_VERSION,
        key_id=key.key_id,
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        wrap_nonce=secrets.token_bytes(_WRAP_NONCE_BYTES),
        wrapped_key=b"",
    )
    wrapped = AESGCM(key.derive(KEK_PURPOSE)).encrypt(unwrapped.wrap_nonce, data_key,
                                                      unwrapped.wrap_aad)
    return replace(unwrapped, wrapped_key=wrapped)


def parse_header(raw: bytes, name: str) -> Header:
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
        with open_input(path) as f:
            return parse_header(read_up_to(f, HEADER_SIZE), str(path))
    return parse_header(read_up_to(path_or_file, HEADER_SIZE), stream_name(path_or_file))


def unwrap_data_key(header: Header, key: MasterKey, name: str) -> bytes:
    if header.key_id != key.key_id:
        raise KeyAccessError(
            f"file {name} is encrypted under key id {header.key_id} "
            f"but the loaded key has id {key.key_id}"
        )
    try:
        return AESGCM(key.derive(KEK_PURPOSE)).decrypt(
            header.wrap_nonce, header.wrapped_key, header.wrap_aad
        )
    except InvalidTag:
        # The key id matched, so the key is right and the header was forged or damaged.
        raise IntegrityError(
            f"file {name}: the data key failed authentication (header tampered with)"
        ) from None


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
    with open_input(path) as src:
        header = parse_header(read_up_to(src, HEADER_SIZE), str(path))
        if header.key_id == new.key_id:
            return
        data_key = unwrap_data_key(header, old, str(path))
        rewrapped = new_header(new, header.chunk_size, data_key, header.nonce_prefix)
        mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode)
        # Leftovers of an interrupted rotation (this version's or an older one's) hold
        # only ciphertext: safe to discard.
        for leftover in [path.with_name(f"{path.name}.rewrap-tmp"),
                         *path.parent.glob(f"{TMP_PREFIX}{path.name}-*")]:
            leftover.unlink(missing_ok=True)
        with atomic_write(path, mode=mode) as out:
            out.write(rewrapped.to_bytes())
            shutil.copyfileobj(src, out, _COPY_BYTES)


# --------------------------------------------------------------------------- reading


def open_input(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputMissingError(f"cannot read {path}: {exc.strerror or exc}") from None


def stream_name(f: object) -> str:
    name = getattr(f, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "<stream>"


def read_up_to(f: BinaryIO, size: int) -> bytes:
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
