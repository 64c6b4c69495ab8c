"""The stage skeleton every stage runs through: key check, lock, fingerprint, reuse of
identical work, write, commit; and the result it hands back."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet import __version__
from personanet.config import canonical_json
from personanet.errors import IntegrityError, KeyAccessError
from personanet.store.artifacts import Artifact, ArtifactStore, sha256_file
from personanet.store.seal import Sealer

if TYPE_CHECKING:
    from personanet.store.artifacts import ArtifactWriter
    from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")


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
    from personanet.store.keys import manifest_seal_key

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


@dataclass(frozen=True)
class StagePlan:
    """What a stage is about to make, known before it makes it.

    Attributes:
        stage: the stage's name (`STAGES`).
        fingerprint: `fingerprint(stage, ...)` of everything that determines the output;
            an artifact with the same one is reused instead of written again.
        inputs: how the manifest pins what was read (`Artifact.as_input()`, source files).
        config: the config sections recorded in the manifest.
        config_hash: the hash of those sections.
        write: fills the new version: writes and `add`s its files and sets
            `writer.figures`. Called only when nothing can be reused, under the lock.
        seed: the seed recorded in the manifest, when the stage draws random numbers.
        warnings: said with the result, reused or new (a `write` may append to them).
    """

    stage: str
    fingerprint: str
    inputs: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    write: Callable[[ArtifactWriter], None]
    seed: int | None = None
    warnings: list[str] = field(default_factory=list)


def run_stage(store: ArtifactStore, key: MasterKey, plan: Callable[[], StagePlan], *,
              force: bool = False) -> StageResult:
    """Run one stage: check the key, take the root's lock, plan, reuse or write, commit.

    The root's lock is held for the whole stage, planning included: a second identical
    command waits, then finds the first one's artifact and reuses it instead of doing the
    work again (for train that would charge the privacy budget twice). The lock is
    re-entrant, so `run` holds it across all the stages. `plan` reads its inputs and
    computes the fingerprint; its `write` runs only when no identical artifact exists
    (or `force`), inside a temporary version that appears only on commit.

    Example::

        def clean(config, store, key, *, force=False):
            def plan() -> StagePlan:
                source = store.get("collect")
                def write(writer):
                    tables.write_encrypted_parquet(writer.path(TRAIN_TABLE), frame, key)
                    writer.add(TRAIN_TABLE, rows=frame.height, encrypted=True,
                               key_id=key.key_id)
                    writer.figures = asdict(report)
                return StagePlan("clean", fingerprint("clean", input=source.version),
                                 inputs=[source.as_input()], config=config.section("clean"),
                                 config_hash=config.section_hash("clean"), write=write)
            return run_stage(store, key, plan, force=force)
    """
    require_key(store, key)  # a root holds one master key: refuse another before any write
    with store.lock():
        planned = plan()
        reused = find_reusable(store, planned.stage, planned.fingerprint, force=force)
        if reused is not None:
            log.info("%s: reusing %s (identical inputs and config)", planned.stage,
                     reused.version)
            return dataclasses.replace(reused, warnings=[*reused.warnings, *planned.warnings])
        with store.create(planned.stage, fingerprint=planned.fingerprint,
                          inputs=planned.inputs, config=planned.config,
                          config_hash=planned.config_hash, seed=planned.seed) as writer:
            planned.write(writer)
            artifact = writer.commit()
    return StageResult.of(artifact, reused=False, warnings=planned.warnings)
