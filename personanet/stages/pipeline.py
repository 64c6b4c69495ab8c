"""`personanet run`: every stage in order, each reusing identical earlier work.

Like `dvc repro`: a stage whose inputs and config are unchanged returns the
existing artifact (`reused: true`), so a nightly cron run on unchanged data
finishes in seconds and spends no privacy budget. `force_from` recomputes
that stage and every later one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from personanet.config import Config
from personanet.errors import PersonaNetError, UsageError
from personanet.stages.base import StageResult
from personanet.store.artifacts import STAGES, ArtifactStore
from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")


def run_pipeline(config: Config, store: ArtifactStore, key: MasterKey, *,
                 force_from: str | None = None, device: str | None = None) -> list[StageResult]:
    """Run collect -> clean -> train -> evaluate -> predict under one lock."""
    if force_from is not None and force_from not in STAGES:
        raise UsageError(f"--force takes a stage: {', '.join(STAGES)}")
    forced = set(STAGES[STAGES.index(force_from):]) if force_from else set()
    results: list[StageResult] = []
    try:
        _run_stages(config, store, key, forced, device, results)
    except PersonaNetError as exc:
        # What finished stays finished (and reusable); --json shows it beside the error.
        exc.payload = {"stages": [r.to_json() for r in results],
                       "failed_stage": exc.payload or None}
        raise
    return results


def _run_stages(config: Config, store: ArtifactStore, key: MasterKey, forced: set[str],
                device: str | None, results: list[StageResult]) -> None:
    from personanet.stages.clean import clean
    from personanet.stages.collect import collect
    from personanet.stages.evaluate import evaluate
    from personanet.stages.predict import predict
    from personanet.stages.train import train

    # Each stage reads exactly the version its predecessor just produced or reused: "newest"
    # could be another artifact when the config went back to an earlier state.
    produced: dict[str, str] = {}
    steps: list[tuple[str, Callable[[bool], StageResult]]] = [
        ("collect", lambda force: collect(config, store, key, force=force)),
        ("clean", lambda force: clean(config, store, key, force=force,
                                      input_version=produced["collect"])),
        ("train", lambda force: train(config, store, key, force=force, device=device,
                                      input_version=produced["clean"])),
        ("evaluate", lambda force: evaluate(config, store, key, force=force,
                                            model_version=produced["train"])),
        ("predict", lambda force: predict(config, store, key, force=force, device=device,
                                          model_version=produced["train"])),
    ]
    with store.lock():
        for stage, step in steps:
            if stage == "predict" and not config.predict.source:
                log.info("run: predict skipped: no predict.source in the config")
                continue
            result = step(stage in forced)
            produced[stage] = result.version
            results.append(result)
