"""What a command runs with: the global options, and the config, store and key they name.

The global callback fills `options` once per command; commands read it
through the helpers here, which only open what the options point at (the
library decides everything else). Log lines go to stderr in one format, text
or JSON, library warnings included.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.errors import ConfigError

if TYPE_CHECKING:
    from personanet.config import Config
    from personanet.store.artifacts import Artifact, ArtifactStore
    from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")


@dataclass
class Options:
    """The global options of one command line (`personanet --json --config X collect`)."""

    config: Path | None = None
    artifacts: Path = Path("artifacts")
    json: bool = False
    quiet: bool = False
    debug: bool = False
    log_format: str = "text"
    lock_timeout: float = 60.0
    command: str = ""
    overrides: list[str] = field(default_factory=list)


#: the running command's options; `run_cli` starts each command with fresh ones
options = Options()


def load_config() -> Config:
    """The --config file with every --set applied (exit 78 when there is none)."""
    from personanet.config import load_config as read_config

    if options.config is None:
        raise ConfigError("no config: pass --config PATH or set PERSONANET_CONFIG")
    return read_config(options.config, options.overrides)


def open_store(config: Config) -> ArtifactStore:
    """The configured dataset's artifacts under --artifacts."""
    from personanet.store.artifacts import ArtifactStore

    return ArtifactStore(options.artifacts, config.dataset.name,
                         lock_timeout=options.lock_timeout)


def open_stores() -> list[ArtifactStore]:
    """The configured dataset's store, or every dataset under the root without a config."""
    from personanet.store.artifacts import ArtifactStore

    if options.config is not None:
        return [open_store(load_config())]
    root = options.artifacts
    if not root.is_dir():
        return []
    return [ArtifactStore(root, d.name, lock_timeout=options.lock_timeout)
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def find_artifact(version: str, *, key: MasterKey | None = None) -> Artifact:
    """The artifact `version` (or a unique prefix of it) in the stores `open_stores` names.

    With `key`, each store is first bound to it (exit 77 for another root's key), so the
    manifest's seal is checked before anything is read from the artifact.
    """
    from personanet.errors import InputMissingError
    from personanet.stages.base import require_key

    for store in open_stores():
        if key is not None:
            require_key(store, key)
        try:
            artifact = store.find(version)
            return store.checked(artifact) if key is not None else artifact
        except InputMissingError:
            continue
    raise InputMissingError(f"no artifact {version!r} under {options.artifacts}")


def load_key() -> MasterKey:
    """The master key from PERSONANET_KEY_FILE / PERSONANET_KEY (exit 77 without one)."""
    from personanet.store.keys import load_master_key

    return load_master_key()


def load_key_if_configured() -> MasterKey | None:
    """The master key when one is configured (its errors are real errors), else None."""
    if not (os.environ.get("PERSONANET_KEY_FILE") or os.environ.get("PERSONANET_KEY")):
        log.warning("no key loaded (PERSONANET_KEY_FILE): the budget ledger is shown "
                    "without checking its seal")
        return None
    return load_key()


def print_json(payload: dict[str, Any]) -> None:
    """The one JSON object a --json command prints on stdout."""
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")


# ------------------------------------------------------------------ logging


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"personanet: {prefix}{record.getMessage()}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z",
                 "level": record.levelname.lower(), "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (tests and embedders swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging() -> None:
    """One handler on stderr, in --log-format, at the level --quiet/--debug ask for."""
    handler = _StderrHandler()
    formatter = _JsonFormatter() if options.log_format == "json" else _TextFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    log.propagate = False
    # Library warnings (Opacus, polars) go through the same handler: one format on stderr.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.propagate = False
    level = logging.DEBUG if options.debug else logging.ERROR if options.quiet else logging.INFO
    log.setLevel(level)
    # --quiet means errors only: library warnings (Opacus' RuntimeWarnings) included.
    warnings_log.setLevel(level)
