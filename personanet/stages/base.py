"""What every stage shares: its result, its fingerprint, the key check, and reuse of
identical work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet import __version__
from personanet.config import canonical_json
from personanet.errors import IntegrityError, KeyAccessError
from personanet.store.artifacts import Artifact, ArtifactStore, Sealer, sha256_file

if TYPE_CHECKING:
    from personanet.store.crypto import MasterKey


@dataclass(frozen=True)
class StageResult:
    """One stage's outcome: the artifact it wrote (or reused) and its figures.

    The figures are the same dict that the manifest records, so `--json`, the
    summary table and the manifest never disagree.
    """

    stage: str
    version: str
    path: Path
    reused: bool
    figures: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, artifact: Artifact, *, reused: bool, warnings: list[str] | None = None
           ) -> StageResult:
        return cls(stage=artifact.stage, version=artifact.version, path=artifact.path,
                   reused=reused, figures=dict(artifact.figures), warnings=warnings or [])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "version": self.version,
                               "path": str(self.path), "reused": self.reused}
        out.update(self.figures)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


def fingerprint(stage: str, **identity: Any) -> str:
    """sha256 of everything that determines a stage's output (inputs, config, code version).

    Two runs with the same fingerprint would compute the same artifact, so the
    second one reuses the first instead of writing a copy (like `dvc repro`).
    """
    payload = {"stage": stage, "personanet": __version__, **identity}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def sealer_for(key: MasterKey) -> Sealer:
    """The manifest sealer of `key` (its MAC key is derived from the master key)."""
    from personanet.store.crypto import manifest_seal_key

    return Sealer(key.key_id, manifest_seal_key(key))


def require_key(store: ArtifactStore, key: MasterKey) -> None:
    """Refuse (77) a key other than the one the root's artifacts are under; then bind it.

    A root holds artifacts under one master key. Writing new ones under another key
    would leave a store that no single key verifies, so every stage calls this first,
    before it reads or writes anything. Afterwards the store seals what it writes and
    checks the seal of every artifact it hands out, which also proves, for a reused
    artifact, that this key is the one that made it.
    """
    found = store.key_ids()
    others = sorted(found - {key.key_id})
    if others and key.key_id in found:
        raise KeyAccessError(
            f"artifact root {store.root} holds artifacts under key ids "
            f"{', '.join(sorted(found))}: finish the interrupted `personanet keys rotate` "
            "(run it again) before any stage")
    if others:
        raise KeyAccessError(
            f"artifact root {store.root} is under key id {', '.join(others)} but the loaded "
            f"key has id {key.key_id}: load the root's key (PERSONANET_KEY_FILE), or change "
            "keys with `personanet keys rotate --new-key-file NEW`")
    store.use_sealer(sealer_for(key))


def check_plain_files(artifact: Artifact) -> None:
    """Every unencrypted file of `artifact` against its sha256 in the (sealed) manifest.

    Models, encoders, privacy claims and metrics are plaintext: their only protection is
    the manifest's checksum, which the seal authenticates. Encrypted files are checked
    when they are read (sha256, then AEAD).
    """
    for out in artifact.manifest.get("outputs", []):
        if out.get("encrypted"):
            continue
        path = artifact.path / out["name"]
        if (not path.is_file() or path.stat().st_size != out.get("bytes")
                or sha256_file(path) != out.get("sha256")):
            raise IntegrityError(f"{path}: sha256 does not match its sealed manifest (replaced "
                                 "or damaged); `personanet artifacts verify` checks the store")


def find_reusable(store: ArtifactStore, stage: str, fp: str, *, force: bool) -> StageResult | None:
    """The existing identical artifact as a reused result, unless `force`.

    Its seal is checked by the store (a wrong key or an edited manifest stops here, even
    when nothing else is read), and its plaintext files against the manifest.
    """
    if force:
        return None
    artifact = store.find_reusable(stage, fp)
    if artifact is None:
        return None
    check_plain_files(artifact)
    return StageResult.of(artifact, reused=True)
