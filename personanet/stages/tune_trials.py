"""The trials of a private search: drawing settings, the validation people, one DP trial.

`personanet.stages.tune` runs K of these; each one, read top to bottom:

    draw settings from [tune]'s space -> resolve "auto" for the trial's rows -> encode
    -> build the network -> DP-SGD with the noise the search fixes for its sample rate
    and steps (`personanet.privacy.selection.trial_noise`) -> score it on the
    validation people: a count of good predictions plus Gaussian noise

Nothing here writes to disk: a trial's model lives in memory until the search keeps it
(the best) or drops it. Every random choice (settings, noise, sampling, initial weights)
comes from the operating system's entropy: the search's bound assumes that nobody
knows how many trials ran or which one won before the winner is released.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from personanet.config import Config
from personanet.errors import InternalError
from personanet.privacy import selection

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    import torch

    from personanet.models import ModelFamily
    from personanet.models.encoding import Encoder

logger = logging.getLogger("personanet")

#: the settings a trial draws, all [train] keys
SPACE_KEYS = ("learning_rate", "batch_size", "epochs", "hidden_sizes", "max_grad_norm",
              "activation", "optimizer")
#: the salt of the validation hash: which people validate is a function of the person
#: alone (their pseudonym), never of the rest of the data
VALIDATION_SALT = b"personanet.tune.validation/1\0"


def draw_settings(config: Config, rng: random.Random) -> dict[str, Any]:
    """One point of [tune]'s search space: a value per key, uniformly from its list;
    the learning rate log-uniformly between its two values when so configured."""
    tune = config.tune
    settings: dict[str, Any] = {}
    for key in SPACE_KEYS:
        values = list(getattr(tune, key))
        if key == "learning_rate" and tune.learning_rate_log_uniform:
            low, high = (math.log(float(v)) for v in values)
            settings[key] = round(math.exp(rng.uniform(low, high)), 8)
        else:
            settings[key] = values[rng.randrange(len(values))]
    return settings


def validation_mask(units: pl.Series, fraction: float) -> np.ndarray:
    """Which rows' people score the trials: a hash of the (pseudonymised) person below
    `fraction`. Disjoint from the people each trial trains on, and fixed per person,
    which is what lets a trial's score share its bound (parallel composition)."""
    import numpy as np

    limit = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.sha256(VALIDATION_SALT + str(u).encode()).digest()
                                    [:8], "big") < limit for u in units.to_list()], dtype=bool)


@dataclass
class Trial:
    """One trial's settings, plan, noisy score and (until the search drops it) model."""

    number: int
    settings: dict[str, Any]
    resolved: dict[str, Any]
    noise_multiplier: float
    sample_rate: float
    steps: int
    score: float
    seconds: float
    model: torch.nn.Module | None = None
    spec: dict[str, Any] | None = None
    encoder: Encoder | None = None
    family: ModelFamily | None = None

    def to_json(self) -> dict[str, Any]:
        return {"trial": self.number, "settings": self.settings, "resolved": self.resolved,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps, "dp_score": self.score, "seconds": round(self.seconds, 3)}


def trial_config(config: Config, settings: dict[str, Any], *, rows: int
                 ) -> tuple[Config, dict[str, Any]]:
    """The config a trial trains with: [train] with the drawn `settings`, "auto" resolved
    for `rows` people at the search's epsilon, and what was resolved."""
    from personanet.training.defaults import resolve_train_config

    train = dataclasses.replace(config.train, **settings, epsilon=config.tune.epsilon,
                                delta=config.tune.delta)
    train, chosen = resolve_train_config(train, n_train_rows=rows)
    resolved = {key: getattr(train, key) for key in (*SPACE_KEYS, "numeric_bins")}
    resolved["hidden_sizes"] = list(resolved["hidden_sizes"])
    if chosen:
        resolved["auto"] = {k: v for k, v in chosen.items() if k in SPACE_KEYS}
    return dataclasses.replace(config, train=train), resolved


def plan_of(rows: int, train_batch: int, epochs: int) -> tuple[float, int]:
    """The (sample rate, steps) Opacus' Poisson loader takes for `rows` people at a batch
    of `train_batch` (what `personanet.training.private` calibrates for)."""
    batches = math.ceil(rows / min(train_batch, rows))
    sample_rate = 1 / batches
    return sample_rate, epochs * int(1 / sample_rate)


class _FixedNoise:
    """The noise of a trial, handed to `make_private` the way a resumed run hands over the
    noise of its checkpoint: no calibration, and `make_private` checks that its loader
    samples at the rate and steps the noise was fixed for."""

    def __init__(self, *, noise_multiplier: float, sample_rate: float, steps_per_epoch: int
                 ) -> None:
        self.state = {"accountant": "rdp", "noise_multiplier": noise_multiplier,
                      "sample_rate": sample_rate, "steps_per_epoch": steps_per_epoch}


def run_trial(number: int, settings: dict[str, Any], *, config: Config,
              fit: pl.DataFrame, validation: pl.DataFrame, plan: selection.SearchPlan,
              device: torch.device, rng: random.Random,
              started: Callable[[int], None] = lambda number: None) -> Trial:
    """Train one trial on the `fit` people with DP-SGD and score it on `validation`;
    `started(number)` is called just before its first step."""
    import torch

    from personanet.models import DEFAULT_FAMILY, get_family
    from personanet.models.encoding import Encoder
    from personanet.training.loop import TrainHistory, make_loader, make_optimizer, run_epochs
    from personanet.training.private import make_private

    began = time.perf_counter()
    run_config, resolved = trial_config(config, settings, rows=fit.height)
    cfg = run_config.train
    encoder = Encoder.from_config(run_config)
    rows = encoder.transform(fit)
    family = get_family(DEFAULT_FAMILY)
    torch.manual_seed(rng.getrandbits(63))  # initial weights: any, but not replayable
    spec = family.spec_for(encoder, cfg)
    model = family.build(spec).to(device)
    loss_fn = family.loss(encoder.task, reduction="none")
    optimizer = make_optimizer(model, cfg)
    loader = make_loader(rows, batch_size=cfg.batch_size, device=device, private=True,
                         seed=cfg.seed)
    sample_rate, steps = plan_of(len(rows), int(cfg.batch_size), int(cfg.epochs))
    if abs(sample_rate - 1 / len(loader)) > 1e-12:
        raise InternalError(f"trial {number}: the loader samples at {1 / len(loader):.6g}, "
                            f"not the planned {sample_rate:.6g}")
    sigma = selection.trial_noise(plan, sample_rate=sample_rate, steps=steps)
    run = make_private(model, optimizer, loader, run_config, family=family,
                       task=encoder.task, device=device,
                       checkpoint=_FixedNoise(noise_multiplier=sigma, sample_rate=sample_rate,
                                              steps_per_epoch=int(1 / sample_rate)))
    started(number)
    with _quiet_epochs():
        run_epochs(run, loss_fn, TrainHistory(), cfg.epochs, save=lambda epoch: None)
    if run.steps != steps:
        raise InternalError(f"trial {number} took {run.steps} steps, planned {steps}")
    if run.hooks is not None:
        run.hooks.cleanup()
    score = noisy_score(model, family, encoder, validation, plan=plan,
                        sensitivity=config.clean.max_rows_per_unit, rng=rng)
    return Trial(number=number, settings=settings, resolved=resolved,
                 noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, score=score,
                 seconds=time.perf_counter() - began, model=model, spec=spec,
                 encoder=encoder, family=family)


def noisy_score(model: torch.nn.Module, family: ModelFamily, encoder: Encoder,
                validation: pl.DataFrame, *, plan: selection.SearchPlan, sensitivity: int,
                rng: random.Random) -> float:
    """The share of validation rows predicted well, as a DP estimate: the sum of each
    row's goodness in [0, 1] (correct class; 1 - |error| of the scaled value, clipped)
    plus Gaussian noise of the plan's score noise times `sensitivity` (rows per person),
    over the number of rows (public, like every row count here)."""
    import torch

    batch = encoder.transform(validation)
    batch = batch.select(batch.labelled)
    total = 0.0
    model.eval()
    with torch.no_grad():
        tensors = batch.tensors(next(model.parameters()).device)
        for start in range(0, len(batch), 8192):
            part = {name: t[start:start + 8192] for name, t in tensors.items()}
            out = model.predict(**family.inputs(part))
            if encoder.task == "regression":
                good = 1 - (out - part["target"]).abs().clamp(max=1.0)
            else:
                good = (out.argmax(dim=1) == part["target"]).double()
            total += float(good.sum())
    noisy = selection.noisy_count(total, noise_multiplier=plan.score_noise_multiplier,
                                  sensitivity=sensitivity, rng=rng)
    return noisy / max(len(batch), 1)


class _quiet_epochs:
    """The loop logs each epoch's loss at INFO: a losing trial's losses are not covered by
    the search's bound (only the winner is released), so they stay out of the log."""

    def __enter__(self) -> None:
        self.level = logger.level
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))

    def __exit__(self, *exc: object) -> None:
        logger.setLevel(self.level)
