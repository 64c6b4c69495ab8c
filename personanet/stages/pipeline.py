"""`personanet run`: every stage in order, each reusing identical earlier work.

Like `dvc repro`: a stage whose inputs and config are unchanged returns the
existing artifact (`reused: true`), so a nightly cron run on unchanged data
finishes in seconds and spends no privacy budget. `force_from` recomputes
that stage and every later one.

A run that could not be evaluated is stopped before train: when clean leaves no
training or no test rows, training would be charged to the ledger and evaluate would
then refuse the empty test split (exit 65), so `run` refuses first (`evaluable`, exit
65) and spends nothing. A bare `personanet train` may still train without a test split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from personanet.config import Config
from personanet.errors import BadInputError, PersonaNetError, UsageError
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
            if stage == "clean":  # before train: no budget for a run evaluate would refuse
                evaluable(result, config)


def evaluable(clean: StageResult, config: Config) -> None:
    """BadInputError (65) when the `clean` artifact leaves no training or no test rows:
    one line with both figures and the setting that decides the split."""
    if "rows_train" not in clean.figures or "rows_test" not in clean.figures:
        return  # no figures to judge by: evaluate says it itself
    train_rows, test_rows = int(clean.figures["rows_train"]), int(clean.figures["rows_test"])
    if train_rows > 0 and test_rows > 0:
        return
    cfg = config.clean
    if train_rows == test_rows == 0:
        fix = "no row was kept: see why each was quarantined"
    elif cfg.split_column:
        empty = cfg.split_test_value if test_rows == 0 else cfg.split_train_value
        fix = (f"no kept row of the split column {cfg.split_column!r} (clean.split_column) "
               f"says {empty!r}: fix that column, or remove clean.split_column to split by "
               f"clean.test_fraction")
    elif test_rows == 0:
        fix = f"raise clean.test_fraction (now {cfg.test_fraction:g}) or collect more people"
    else:
        fix = f"lower clean.test_fraction (now {cfg.test_fraction:g}) or collect more people"
    raise BadInputError(
        f"run stopped before train: clean {clean.version} left {train_rows} train and "
        f"{test_rows} test rows, so the model could not be "
        f"{'trained' if train_rows == 0 else 'evaluated'}; no privacy budget was spent; "
        f"{fix} (quarantined rows: `personanet artifacts show {clean.version}`)")
