"""`personanet run`: every stage in order, each reusing identical earlier work.

Like `dvc repro`: a stage whose inputs and config are unchanged returns the
existing artifact (`reused: true`), so a nightly cron run on unchanged data
finishes in seconds and spends no privacy budget. `force_from` recomputes
that stage and every later one.
"""

from __future__ import annotations

import importlib
import logging

from personanet.artifacts import STAGES, ArtifactStore
from personanet.config import Config
from personanet.crypto import MasterKey
from personanet.errors import UsageError
from personanet.stage import StageResult

log = logging.getLogger("personanet")


def run_pipeline(config: Config, store: ArtifactStore, key: MasterKey, *,
                 force_from: str | None = None, device: str | None = None) -> list[StageResult]:
    """Run collect -> clean -> train -> evaluate -> predict under one lock."""
    if force_from is not None and force_from not in STAGES:
        raise UsageError(f"--force takes a stage: {', '.join(STAGES)}")
    forced = set(STAGES[STAGES.index(force_from):]) if force_from else set()
    results: list[StageResult] = []
    with store.lock():
        for stage in STAGES:
            try:
                module = importlib.import_module(f"personanet.{stage}")
            except ModuleNotFoundError as exc:
                if exc.name != f"personanet.{stage}":
                    raise
                log.warning("run: %s skipped: not implemented yet", stage)
                continue
            force = stage in forced
            if stage == "collect":
                result = module.collect(config, store, key, force=force)
            elif stage == "clean":
                result = module.clean(config, store, key, force=force)
            elif stage == "train":
                result = module.train(config, store, key, force=force, device=device)
            elif stage == "evaluate":
                result = module.evaluate(config, store, key, force=force)
            else:
                if not config.predict.source:
                    log.info("run: predict skipped: no predict.source in the config")
                    continue
                result = module.predict(config, store, key, force=force, device=device)
            results.append(result)
    return results
