"""Caring for an artifact root: verify, garbage-collect, rotate the master key.

Composes `artifacts` (versions, manifests) with `crypto` (authentication,
re-wrapping); neither of those knows about the other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personanet.errors import KeyAccessError
from personanet.privacy import Ledger
from personanet.stages.base import sealer_for
from personanet.store import crypto
from personanet.store.artifacts import (
    MANIFEST,
    STAGES,
    Artifact,
    ArtifactStore,
    sha256_file,
    utc_now,
    verify_checksums,
)
from personanet.store.crypto_header import read_header
from personanet.store.fsutil import atomic_write_bytes
from personanet.store.keys import MasterKey
from personanet.store.seal import SEAL

log = logging.getLogger("personanet")

ROTATION_LOG = "key-rotations.jsonl"


def datasets_under(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def all_artifacts(store: ArtifactStore) -> list[Artifact]:
    return [a for stage in STAGES for a in store.versions(stage)]


# ----------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    artifacts: int = 0
    files: int = 0
    encrypted_files: int = 0
    bytes_checked: int = 0


def verify(stores: Iterable[ArtifactStore], key: MasterKey | None, *,
           version: str | None = None) -> VerifyReport:
    """sha256 of every file against its manifest, and every encrypted file authenticated
    end to end with `key` (like `restic check --read-data`).

    Raises IntegrityError (exit 65) naming the first bad file; KeyAccessError (77) if an
    encrypted file is under another key or no key was given.
    """
    if key is None:
        raise KeyAccessError("verify needs the key to check manifest seals and authenticate "
                             "encrypted files: set PERSONANET_KEY_FILE or PERSONANET_KEY")
    sealer = sealer_for(key)
    report = VerifyReport()
    for store in stores:
        targets = [store.find(version)] if version else all_artifacts(store)
        for artifact in targets:
            # The seal first: only a manifest written under this key is worth checking files
            # against (a forged checksum in an unsealed manifest proves nothing).
            sealer.check(artifact.manifest, artifact.path / MANIFEST)
            _check_files(artifact, key, report)
            report.artifacts += 1
        if version is None:
            Ledger(store, key).verify()  # its own seal, and a run for every private model
    return report


def _check_files(artifact: Artifact, key: MasterKey, report: VerifyReport) -> None:
    """sha256 of every file against the manifest; every encrypted file authenticated."""
    verify_checksums(artifact)
    for out in artifact.manifest.get("outputs", []):
        report.files += 1
        report.bytes_checked += int(out["bytes"])
        if not out.get("encrypted"):
            continue
        path = artifact.path / out["name"]
        with open(path, "rb") as fh:
            for _ in crypto.decrypt_stream(fh, key):
                pass
        report.encrypted_files += 1


# ------------------------------------------------------------------------- seal


@dataclass
class SealReport:
    key_id: str
    sealed: list[str] = field(default_factory=list)
    already_sealed: int = 0


def seal(stores: Iterable[ArtifactStore], key: MasterKey) -> SealReport:
    """Adopt manifests written before manifests were sealed: check each, then seal it.

    An unsealed manifest is refused everywhere else, since deleting a seal must not be a
    way around it; this is the one explicit, logged way in. Before sealing, every file is
    checked against the manifest and every encrypted file is authenticated end to end
    under `key`, so what gets sealed is at least consistent with data only this key could
    have written. It cannot tell whether a plaintext file (a model, a privacy claim) was
    forged together with its checksum *before* adoption: seal a root you trust.
    Already sealed manifests are checked (65 / 77 when their seal fails), never re-sealed.
    """
    sealer = sealer_for(key)
    report = SealReport(key_id=key.key_id)
    for store in stores:
        with store.lock():
            for artifact in all_artifacts(store):
                where = artifact.path / MANIFEST
                if SEAL in artifact.manifest:
                    sealer.check(artifact.manifest, where)
                    report.already_sealed += 1
                    continue
                _check_files(artifact, key, VerifyReport())
                _replace_json(where, sealer.seal(artifact.manifest))
                report.sealed.append(f"{store.dataset}/{artifact.stage}/{artifact.version}")
                log.warning("sealed the manifest of %s artifact %s under key %s (adopted after "
                            "checking every file)", artifact.stage, artifact.version, key.key_id)
    return report


# --------------------------------------------------------------------------- gc


@dataclass
class GcPlan:
    keep: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    deleted: bool = False


def gc(store: ArtifactStore, *, keep: int, yes: bool) -> GcPlan:
    """Keep the newest `keep` versions per stage and everything they depend on.

    A dry run unless `yes`. The budget ledger and checkpoints are never touched: spent
    privacy stays spent whatever is deleted.
    """
    if keep < 1:
        from personanet.errors import UsageError

        raise UsageError("--keep must be at least 1")
    by_version = {a.version: a for a in all_artifacts(store)}
    kept: set[str] = set()
    for stage in STAGES:
        for artifact in store.versions(stage)[-keep:]:
            _keep_with_lineage(artifact, by_version, kept)
    plan = GcPlan(keep=sorted(kept))
    for version, artifact in sorted(by_version.items()):
        if version not in kept:
            plan.remove.append(f"{artifact.stage}/{version}")
            plan.bytes_freed += sum(int(o.get("bytes", 0))
                                    for o in artifact.manifest.get("outputs", []))
    if not yes:
        return plan
    with store.lock():
        plan.temporaries = [str(p) for p in store.stale_temporaries()]
        for tmp in store.stale_temporaries():
            shutil.rmtree(tmp, ignore_errors=True)
        for version, artifact in by_version.items():
            if version in kept:
                continue
            # Remove the manifest first: a half-deleted folder is then invisible to readers.
            (artifact.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(artifact.path, ignore_errors=True)
        plan.deleted = True
    return plan


def _keep_with_lineage(artifact: Artifact, by_version: dict[str, Artifact], kept: set[str]
                       ) -> None:
    if artifact.version in kept:
        return
    kept.add(artifact.version)
    for entry in artifact.manifest.get("inputs", []):
        parent = by_version.get(entry.get("version", ""))
        if parent is not None:
            _keep_with_lineage(parent, by_version, kept)


# ----------------------------------------------------------------------- rotate


@dataclass
class RotationReport:
    old_key_id: str
    new_key_id: str
    files_rewrapped: int = 0
    files_already_rotated: int = 0
    manifests_updated: int = 0


def rotate(root: Path, old: MasterKey, new: MasterKey, *,
           lock_timeout: float) -> RotationReport:
    """Re-wrap every data key under `new` without re-encrypting any payload.

    Each file is re-wrapped atomically (temp + rename), then its manifest is updated and
    re-sealed under `new` atomically, after its old seal was checked (a forged manifest is
    never laundered by a rotation); a file already under `new` is skipped, so an
    interrupted rotation resumes by running it again. Afterwards the old key opens nothing.
    """
    if old.key_id == new.key_id:
        from personanet.errors import UsageError

        raise UsageError("the new key is the key already in use: make one with "
                         "`personanet keys generate PATH`")
    report = RotationReport(old_key_id=old.key_id, new_key_id=new.key_id)
    for dataset in datasets_under(root):
        store = ArtifactStore(root, dataset, lock_timeout=lock_timeout)
        with store.lock():
            for artifact in all_artifacts(store):
                _rotate_artifact(artifact, old, new, report)
            Ledger(store, old).reseal(new)  # the budget ledger's seal follows the key
            _append_rotation_log(store, report)
    return report


def _rotate_artifact(artifact: Artifact, old: MasterKey, new: MasterKey,
                     report: RotationReport) -> None:
    where = artifact.path / MANIFEST
    manifest = json.loads(where.read_text("utf-8"))
    seal_key_id = manifest.get(SEAL, {}).get("key_id") if isinstance(manifest.get(SEAL),
                                                                      dict) else None
    # An interrupted rotation left this manifest already sealed under the new key.
    sealed_under = new if seal_key_id == new.key_id else old
    sealer_for(sealed_under).check(manifest, where)
    changed = sealed_under is old
    for out in manifest.get("outputs", []):
        if not out.get("encrypted"):
            continue
        path = artifact.path / out["name"]
        header = read_header(path)
        if header.key_id == new.key_id:
            report.files_already_rotated += 1
        elif header.key_id == old.key_id:
            crypto.rewrap_file(path, old, new)
            report.files_rewrapped += 1
        else:
            raise KeyAccessError(f"{path} is under key id {header.key_id}, neither the old key "
                                 f"({old.key_id}) nor the new one ({new.key_id})")
        digest, size = sha256_file(path), path.stat().st_size
        if (out.get("sha256"), out.get("bytes"), out.get("key_id")) != (digest, size, new.key_id):
            out.update(sha256=digest, bytes=size, key_id=new.key_id)
            changed = True
    if changed:
        manifest.setdefault("key_rotations", []).append(
            {"at": utc_now(), "from": old.key_id, "to": new.key_id})
        _replace_json(where, sealer_for(new).seal(manifest))
        report.manifests_updated += 1


def _replace_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def _append_rotation_log(store: ArtifactStore, report: RotationReport) -> None:
    store.dataset_dir.mkdir(parents=True, exist_ok=True)
    entry = {"at": utc_now(), "from": report.old_key_id, "to": report.new_key_id,
             "files_rewrapped": report.files_rewrapped}
    with open(store.dataset_dir / ROTATION_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())

