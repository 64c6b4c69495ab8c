"""The versioned artifact store: versions, manifests, and their one writer at a time.

Layout: ``<root>/<dataset>/<stage>/<version>/manifest.json`` plus the stage's
files. This module knows versions and manifests and nothing of models or data
frames. A version folder appears only by an atomic rename of a fully written,
fsynced temporary folder, so a crash never leaves a folder that looks complete;
readers also skip any folder without a valid manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import platform
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from personanet import __version__
from personanet.errors import (
    InputMissingError,
    IntegrityError,
    OutputError,
    UsageError,
)
from personanet.store.fsutil import TMP_PREFIX, fsync_path, hold_lock, publish_folder
from personanet.store.seal import SEAL, Sealer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "personanet.manifest/1"
STAGES = ("collect", "clean", "train", "evaluate", "predict")
LOCK_FILE = ".personanet.lock"
DEFAULT_LOCK_TIMEOUT = 60.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_version() -> str:
    """A unique, time-sortable version id, e.g. ``20261125T180102.123456Z-3f9a1c``."""
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(3)}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@cache
def environment() -> dict[str, Any]:
    """Versions of everything that shapes an artifact, read without importing the packages."""
    packages = {}
    for name in ("torch", "opacus", "polars", "cryptography", "numpy", "typer"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "personanet": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def manifest_key_ids(manifest: dict[str, Any]) -> set[str]:
    """The master key ids a manifest names: its seal's and its encrypted files'."""
    ids = set()
    seal = manifest.get(SEAL)
    if isinstance(seal, dict) and isinstance(seal.get("key_id"), str):
        ids.add(seal["key_id"])
    for out in manifest.get("outputs", []):
        if isinstance(out, dict) and out.get("encrypted") and isinstance(out.get("key_id"), str):
            ids.add(out["key_id"])
    return ids


@dataclass(frozen=True)
class Artifact:
    """A complete, immutable artifact version (its manifest has been validated)."""

    dataset: str
    stage: str
    version: str
    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """Path of an output file by its manifest name; InputMissingError if absent."""
        for out in self.manifest.get("outputs", []):
            if out["name"] == name:
                return self.path / name
        raise InputMissingError(f"{self.stage} artifact {self.version} has no file {name!r}")

    def output(self, name: str) -> dict[str, Any]:
        for out in self.manifest.get("outputs", []):
            if out["name"] == name:
                return out
        raise InputMissingError(f"{self.stage} artifact {self.version} has no file {name!r}")

    @property
    def figures(self) -> dict[str, Any]:
        return self.manifest.get("figures", {})

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))

    def as_input(self) -> dict[str, Any]:
        """How a downstream manifest pins this artifact: stage, version, sha256 of each file."""
        return {
            "stage": self.stage,
            "version": self.version,
            "files": [{"name": o["name"], "sha256": o["sha256"]}
                      for o in self.manifest.get("outputs", [])],
        }


class ArtifactStore:
    """Artifacts of one dataset under one artifact root."""

    def __init__(self, root: Path | str, dataset: str, *,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.lock_timeout = lock_timeout
        #: set by `use_sealer` once the key is known: new manifests are sealed and every
        #: artifact handed out by `get` and `find_reusable` has its seal checked
        self.sealer: Sealer | None = None

    def use_sealer(self, sealer: Sealer) -> None:
        self.sealer = sealer

    def checked(self, artifact: Artifact) -> Artifact:
        """`artifact` after its manifest's seal is checked (when the store has a sealer)."""
        if self.sealer is not None:
            self.sealer.check(artifact.manifest, artifact.path / MANIFEST)
        return artifact

    def key_ids(self) -> set[str]:
        """Every master key id named by any manifest of any dataset under the root."""
        if not self.root.is_dir():
            return set()
        ids: set[str] = set()
        for dataset in sorted(self.root.iterdir()):
            if not dataset.is_dir() or dataset.name.startswith("."):
                continue
            store = ArtifactStore(self.root, dataset.name)
            for stage in STAGES:
                for artifact in store.versions(stage):
                    ids |= manifest_key_ids(artifact.manifest)
        return ids

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.dataset

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise UsageError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return self.dataset_dir / stage

    # ----------------------------------------------------------------- reading

    def versions(self, stage: str) -> list[Artifact]:
        """Complete artifacts of a stage, oldest first. Incomplete folders are ignored."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            artifact = self._load(stage, entry)
            if artifact is not None:
                found.append(artifact)
        return sorted(found, key=lambda a: (a.created_at, a.version))

    def _load(self, stage: str, folder: Path) -> Artifact | None:
        try:
            manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            return None
        if manifest.get("stage") != stage or manifest.get("version") != folder.name:
            return None
        return Artifact(self.dataset, stage, folder.name, folder, manifest)

    def get(self, stage: str, version: str | None = None) -> Artifact:
        """The pinned version, or the newest complete one when `version` is None."""
        if version is None:
            versions = self.versions(stage)
            if not versions:
                raise InputMissingError(
                    f"no complete {stage} artifact for dataset {self.dataset!r} under "
                    f"{self.root}: run `personanet {stage}` first"
                )
            return self.checked(versions[-1])
        folder = self.stage_dir(stage) / version
        artifact = self._load(stage, folder) if folder.is_dir() else None
        if artifact is None:
            raise InputMissingError(
                f"{stage} artifact {version!r} not found (or incomplete) under {self.dataset_dir}; "
                "`personanet artifacts list` shows the versions"
            )
        return self.checked(artifact)

    def find(self, version: str) -> Artifact:
        """Any stage's artifact by version id (a unique prefix is enough)."""
        matches = [a for stage in STAGES for a in self.versions(stage)
                   if a.version == version or a.version.startswith(version)]
        exact = [a for a in matches if a.version == version]
        if exact:
            return exact[0]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise InputMissingError(f"no artifact {version!r} in dataset {self.dataset!r}")
        shown = ", ".join(f"{a.stage} {a.version}" for a in matches[:8])
        more = f" and {len(matches) - 8} more" if len(matches) > 8 else ""
        raise UsageError(f"version prefix {version!r} is ambiguous: {len(matches)} artifacts "
                         f"match ({shown}{more}); give more of the version")

    def find_reusable(self, stage: str, fingerprint: str) -> Artifact | None:
        """The newest complete artifact computed from identical inputs and config."""
        for artifact in reversed(self.versions(stage)):
            if artifact.manifest.get("fingerprint") == fingerprint:
                return self.checked(artifact)
        return None

    # ----------------------------------------------------------------- locking

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the root's one-writer lock; waits up to `lock_timeout` s, then exit 75.

        Re-entrant within a process, so `run` can hold it across every stage.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create artifact root {self.root}: {exc.strerror}") from exc
        return hold_lock(self.root / LOCK_FILE, timeout=self.lock_timeout,
                         what=f"artifact root {self.root}")

    # ----------------------------------------------------------------- writing

    def create(self, stage: str, *, fingerprint: str, inputs: list[dict[str, Any]],
               config: dict[str, Any], config_hash: str, seed: int | None = None
               ) -> ArtifactWriter:
        """Start a new version in a temporary folder; `commit()` makes it visible atomically."""
        folder = self.stage_dir(stage)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {exc.strerror}") from exc
        version = new_version()
        tmp = folder / f"{TMP_PREFIX}{version}"
        tmp.mkdir()
        return ArtifactWriter(
            store=self, stage=stage, version=version, tmp=tmp,
            manifest={
                "format": MANIFEST_FORMAT,
                "stage": stage,
                "version": version,
                "dataset": self.dataset,
                "fingerprint": fingerprint,
                "inputs": inputs,
                "config": config,
                "config_hash": config_hash,
                "seed": seed,
            },
        )

    def stale_temporaries(self) -> list[Path]:
        """Temporary folders left by crashed writers (safe to delete while holding the lock)."""
        if not self.dataset_dir.is_dir():
            return []
        return sorted(p for stage in STAGES if (self.dataset_dir / stage).is_dir()
                      for p in (self.dataset_dir / stage).iterdir()
                      if p.name.startswith(TMP_PREFIX))


@dataclass
class ArtifactWriter:
    """A version being written. Files go into `tmp`; nothing is visible before commit()."""

    store: ArtifactStore
    stage: str
    version: str
    tmp: Path
    manifest: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    _outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """Where a stage writes its file `name` (it must then call `add`)."""
        if "/" in name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"bad artifact file name {name!r}")
        return self.tmp / name

    def add(self, name: str, *, rows: int | None = None, encrypted: bool = False,
            key_id: str | None = None) -> None:
        """Record a file written at `path(name)` as an output of this artifact."""
        if not self.path(name).is_file():
            raise FileNotFoundError(self.path(name))
        self._outputs[name] = {"name": name, "rows": rows, "encrypted": encrypted,
                               "key_id": key_id}

    def write_bytes(self, name: str, data: bytes, *, rows: int | None = None) -> Path:
        """A readable (non record-level) file: models, metrics, reports."""
        target = self.path(name)
        target.write_bytes(data)
        self.add(name, rows=rows)
        return target

    def write_json(self, name: str, value: Any) -> Path:
        return self.write_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def commit(self) -> Artifact:
        """Hash and fsync every file, write the manifest, rename into place atomically."""
        outputs = []
        for name, entry in sorted(self._outputs.items()):
            path = self.tmp / name
            fsync_path(path)
            outputs.append({**entry, "sha256": sha256_file(path), "bytes": path.stat().st_size})
        manifest = {
            **self.manifest,
            "created_at": utc_now(),
            "outputs": outputs,
            "figures": self.figures,
            "environment": environment(),
        }
        if self.store.sealer is not None:
            manifest = self.store.sealer.seal(manifest)
        # The manifest needs no rename of its own: the folder's rename publishes it.
        manifest_path = self.tmp / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                 encoding="utf-8")
        fsync_path(manifest_path)
        final = self.tmp.parent / self.version
        publish_folder(self.tmp, final)
        return Artifact(self.store.dataset, self.stage, self.version, final, manifest)

    def abort(self) -> None:
        """Remove the unfinished version, and the stage and dataset folders if that left
        them empty: a refused first run leaves the root as it found it."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in (self.tmp.parent, self.tmp.parent.parent):
            try:
                folder.rmdir()  # only ever succeeds on an empty folder
            except OSError:
                break

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self.tmp.exists():
            # Not committed (error, or the caller forgot): the temp folder must not linger.
            self.abort()


def verify_checksums(artifact: Artifact) -> None:
    """Every output's sha256 and size match the manifest (IntegrityError naming the file)."""
    for out in artifact.manifest.get("outputs", []):
        path = artifact.path / out["name"]
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in the manifest)")
        if path.stat().st_size != out["bytes"] or sha256_file(path) != out["sha256"]:
            raise IntegrityError(f"{path}: sha256 does not match the manifest")

