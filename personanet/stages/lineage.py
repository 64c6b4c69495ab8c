"""The current config's chain: which artifact each stage would use, without running any.

A stage that is not told which input to read takes the artifact that the config's own
chain produces (collect of `dataset.source`, clean of that, train of that), the one
`run` would use, never simply the newest: a newer artifact may come from another config
(a `--no-dp` comparison, other train settings) and scoring it under this config's name
would report the wrong model. Each stage's fingerprint is a function here, so the stage
and the chain compute it the same way.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from personanet.errors import InputMissingError
from personanet.stages.base import fingerprint
from personanet.store.artifacts import Artifact, ArtifactStore

if TYPE_CHECKING:
    from personanet.config import Config
    from personanet.sources import Source

log = logging.getLogger("personanet")

#: the stages whose artifacts feed later ones, in order
CHAIN = ("collect", "clean", "train")


# ------------------------------------------------------------------- fingerprints


def collect_fingerprint(config: Config, source_identities: list[str], *,
                        parent: str | None = None) -> str:
    """collect's identity: its sources' identities (`Source.fingerprint()`: a file's sha256),
    in order, and the configured columns; an increment's also its parent's version."""
    from personanet.config import SourceConfig

    # How the files are read ([source]) changes the records; the default adds nothing, so
    # stores made before [source] existed keep their identities.
    read = {} if config.source == SourceConfig() else {"read": config.section("source")}
    if parent is not None:
        read["parent"] = parent
    return fingerprint("collect", sources=list(source_identities),
                       columns={name: column.required for name, column in config.columns.items()},
                       **read)


def clean_fingerprint(config: Config, collect_version: str) -> str:
    return fingerprint("clean", input=collect_version,
                       config=config.section_hash("dataset", "columns", "clean"))


def train_fingerprint(config: Config, clean_version: str, *, private: bool) -> str:
    """train's identity; `private` (DP-SGD or `--no-dp`) is part of it, so the two never mix."""
    return fingerprint("train", input=clean_version,
                       config=config.section_hash("columns", "train", "dataset"),
                       private=private)


def tune_fingerprint(config: Config, clean_version: str) -> str:
    """tune's identity (a `train` artifact too): the input, and [train] and [tune], whose
    search space and budget decide the search."""
    return fingerprint("tune", input=clean_version,
                       config=config.section_hash("columns", "train", "dataset", "tune"))


# -------------------------------------------------------------------------- chain


def resolve_chain(config: Config, store: ArtifactStore) -> dict[str, Artifact | None]:
    """Each stage's artifact in the config's chain, or None where it does not exist yet.

    Reads manifests and fingerprints the config's sources; runs nothing. The train entry
    is the private model when it exists, else the chain's `--no-dp` model (with
    ``tune.use_in_chain``: the config's tuned model, and only that one). Raises
    InputMissingError (66) when the sources are gone, since then the chain has no start.
    """
    from personanet.stages.increments import chain_head

    chain: dict[str, Artifact | None] = dict.fromkeys(CHAIN)
    chain["collect"] = chain_head(config, store, lambda: _config_sources(config))
    if chain["collect"] is not None:
        chain["clean"] = store.find_reusable(
            "clean", clean_fingerprint(config, chain["collect"].version))
    if chain["clean"] is not None and config.tune.use_in_chain:
        # [tune] use_in_chain: the tuned model stands for train (only that one: a config
        # that asks for it never falls back silently to another model)
        chain["train"] = store.find_reusable(
            "train", tune_fingerprint(config, chain["clean"].version))
    elif chain["clean"] is not None:
        for private in (True, False):
            chain["train"] = store.find_reusable(
                "train", train_fingerprint(config, chain["clean"].version, private=private))
            if chain["train"] is not None:
                break
    return chain


def _config_sources(config: Config) -> list[Source]:
    from personanet.sources import open_sources

    try:
        return open_sources(config.dataset.source, config.source, base=config.base_dir,
                            columns=config.columns)
    except InputMissingError as exc:
        raise InputMissingError(
            f"{exc}; the config's chain of artifacts starts from its sources, so name the "
            "artifact to use: --input VERSION (clean, train) or --model VERSION (evaluate, "
            "predict); `personanet artifacts list` shows them") from None


def chain_input(config: Config, store: ArtifactStore, stage: str, *, reader: str
                ) -> tuple[Artifact, list[str]]:
    """The chain's `stage` artifact that the stage `reader` reads by default, and warnings.

    Raises InputMissingError (66) naming the first stage of the chain still to run.
    """
    chain = resolve_chain(config, store)
    flag = "--model" if stage == "train" else "--input"
    for earlier in CHAIN[:CHAIN.index(stage) + 1]:
        if chain[earlier] is None:
            raise InputMissingError(
                f"{reader}: the current config's chain has no {earlier} artifact yet: run "
                f"`personanet {earlier}` (or `personanet run`), or pick one with {flag} VERSION")
    artifact = chain[stage]
    assert artifact is not None
    warnings = []
    if stage == "train" and artifact.figures.get("private") is False:
        warnings.append(f"the current config's chain has only a --no-dp model "
                        f"({artifact.version}): {reader} uses it, and it carries no privacy "
                        "guarantee; `personanet train` makes the private one")
        log.warning(warnings[-1])
    what = "model" if stage == "train" else f"{stage} artifact"
    log.info("%s: %s %s, from the current config's chain (%s VERSION picks another)",
             reader, what, artifact.version, flag)
    return artifact, warnings
