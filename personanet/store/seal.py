"""The manifest seal: an HMAC over a manifest, so that whoever holds the master key
detects any edit of it.

A manifest is plaintext (it must be readable without the key to list and garbage-collect),
but everything in it, the sha256 of every file included, is what a reader trusts. The
seal makes a forged `privacy.json` with a forged checksum detectable. This module knows
manifests as dicts and a MAC key as bytes; where that key comes from is `store.keys`'.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personanet.errors import IntegrityError, KeyAccessError

#: the manifest's key that holds its seal (it is left out of what the seal covers)
SEAL = "seal"
SEAL_ALGORITHM = "HMAC-SHA256"
ADOPT_HINT = ("check and adopt the root with `personanet artifacts seal` (it authenticates "
              "every file first)")


@dataclass(frozen=True)
class Sealer:
    """Seals manifests with HMAC-SHA256 and checks their seals.

    Attributes:
        key_id: public id of the master key the MAC key was derived from; it stands in the
            seal so that a manifest sealed under another key reads as "wrong key" (77).
        mac_key: the secret MAC key (`MasterKey.derive("manifest-seal")`); never logged.
    """

    key_id: str
    mac_key: bytes = field(repr=False)

    def mac(self, manifest: dict[str, Any]) -> str:
        body = {k: v for k, v in manifest.items() if k != SEAL}
        canonical = json.dumps({"key_id": self.key_id, "manifest": body}, sort_keys=True,
                               separators=(",", ":"), ensure_ascii=True)
        return hmac.new(self.mac_key, canonical.encode("ascii"), hashlib.sha256).hexdigest()

    def seal(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest with a fresh seal (any old seal replaced)."""
        # Sealed as it will read back from disk (tuples as lists, keys as strings), so the
        # MAC computed now is the MAC a reader computes.
        body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != SEAL}))
        return {**body, SEAL: {"algorithm": SEAL_ALGORITHM, "key_id": self.key_id,
                               "mac": self.mac(body)}}

    def check(self, manifest: dict[str, Any], where: Path) -> None:
        """IntegrityError (65) for a missing or wrong seal; KeyAccessError (77) for another key.

        An unsealed manifest is refused, not accepted: deleting the seal must not be a way
        around it. Manifests written before seals existed are adopted explicitly.
        """
        seal = manifest.get(SEAL)
        if not isinstance(seal, dict) or not isinstance(seal.get("mac"), str):
            raise IntegrityError(f"{where}: manifest is not sealed (written by an older "
                                 f"personanet, or its seal was removed): {ADOPT_HINT}")
        if seal.get("key_id") != self.key_id:
            raise KeyAccessError(f"{where}: manifest is sealed under key id "
                                 f"{seal.get('key_id')} but the loaded key has id "
                                 f"{self.key_id}; `personanet keys rotate` changes keys")
        if seal.get("algorithm") != SEAL_ALGORITHM or not hmac.compare_digest(
                seal["mac"], self.mac(manifest)):
            raise IntegrityError(f"{where}: manifest seal does not match (the manifest or its "
                                 "seal was edited); `personanet artifacts verify` checks the "
                                 "store")
