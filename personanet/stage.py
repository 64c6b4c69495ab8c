"""What every stage shares: its result, its fingerprint, and reuse of identical work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personanet import __version__
from personanet.artifacts import Artifact, ArtifactStore
from personanet.config import canonical_json


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


def find_reusable(store: ArtifactStore, stage: str, fp: str, *, force: bool) -> StageResult | None:
    """The existing identical artifact as a reused result, unless `force`."""
    if force:
        return None
    artifact = store.find_reusable(stage, fp)
    return StageResult.of(artifact, reused=True) if artifact else None
