"""Key material: the master key, its key files, and the subkeys derived from it.

Every secret personanet uses comes from one 32-byte master key by HKDF-SHA256 with a
purpose label, so leaking one subkey reveals neither the master key nor its siblings.
This module knows keys and key files; what they encrypt is `store.crypto`'s business.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from personanet.errors import KeyAccessError, OutputError
from personanet.store.fsutil import atomic_write_bytes

__all__ = [
    "KEK_PURPOSE",
    "KEY_BYTES",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "KEY_ID_BYTES",
    "MANIFEST_SEAL_PURPOSE",
    "MasterKey",
    "load_master_key",
    "manifest_seal_key",
    "write_key_file",
]

logger = logging.getLogger("personanet")

KEY_BYTES = 32
#: bytes of the public key id (shown as 16 hex characters)
KEY_ID_BYTES = 8

KEY_ENV = "PERSONANET_KEY"
KEY_FILE_ENV = "PERSONANET_KEY_FILE"

_INFO_PREFIX = b"personanet/v1/"

#: HKDF purpose of the key-encryption key that wraps each encrypted file's data key
KEK_PURPOSE = "kek"
#: HKDF purpose of the key that seals artifact manifests (HMAC-SHA256). Its own purpose,
#: so the manifest MAC key is unrelated to the key wrapping data keys or the pseudonym key.
MANIFEST_SEAL_PURPOSE = "manifest-seal"

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
        return _hkdf(self.material, _INFO_PREFIX + b"key-id", KEY_ID_BYTES).hex()

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

    The file is created exclusively (linked into place, so even a race never replaces
    it), so an existing key, which may be the only way to read existing data, is never
    overwritten; and it is fsynced with its directory entry, because data encrypted
    under a key lost in a crash is lost too.

    Raises:
        OutputError: the file exists or cannot be created.
    """
    path = Path(path)
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    text = f"# personanet master key, id {key.key_id}, created {created}\n{key.to_base64()}\n"
    if path.exists():
        raise OutputError(
            f"key file {path} already exists; refusing to overwrite a key (move it away first)")
    try:
        atomic_write_bytes(path, text.encode("ascii"), mode=0o600, exclusive=True)
    except OutputError:
        if path.exists():
            raise OutputError(f"key file {path} already exists; refusing to overwrite a key "
                              "(move it away first)") from None
        raise OutputError(f"cannot create key file {path}") from None


def manifest_seal_key(key: MasterKey) -> bytes:
    """The 32-byte HMAC key that seals manifests under `key` (see ``docs/encryption.md``)."""
    return key.derive(MANIFEST_SEAL_PURPOSE)
