"""Training settings that adapt to how many people there are to learn from ("auto").

DP-SGD's defaults cannot be one set of numbers. A batch of 1024 suits the 32,561
people of the bundled sample (Poisson rate q = 1/32, 320 noisy steps in 10 epochs),
but with 795 people it makes q = 1: every step sees everyone, sampling no longer
amplifies privacy, the noise needed for epsilon 1 swamps the 10 steps there are,
and the network ends up predicting the majority class for everyone. So
``train.batch_size``, ``epochs``, ``learning_rate``, ``hidden_sizes`` and
``numeric_bins`` default to ``"auto"``, and `auto_settings` chooses them from the
number of training rows (one per person after `clean`) and the target epsilon:

- **batch**: the power of two nearest ``rows / 32``, within [16, 1024]. The
  sampling rate stays near 1/32 (never above 0.1 from 145 rows up), about 32
  noisy steps an epoch at every size.
- **small data**, ``rows * epsilon < SMALL_DATA_PEOPLE_EPSILON`` (5,000): one hidden
  layer of 16, no numeric bins, Adam at 3e-2, 15 epochs (about 480 steps). The
  noise added to a step is the same whatever the network; it drowns a network
  with many weights (2x64 with 16 bins: ~13k) sooner than a small one (~1.4k).
- **otherwise**: the settings measured on the full sample, 2x64 tanh with 16
  bins, Adam at 1e-2, 10 epochs (0.855 accuracy at epsilon 1).
- SGD gets a learning rate of 0.1 (momentum 0.9) and L-BFGS (``--no-dp``) 1.0.

The product ``rows * epsilon`` decides because the noise on the averaged
gradient scales like ``1 / (rows * epsilon)`` at a fixed sampling rate and
number of steps. At 1,000 rows the small network won at epsilon 1 (0.710
against 0.601) and 3 (0.713 against 0.687) and tied at 8 (0.738 against 0.732);
at epsilon 1 they tied at 2,000 rows and the large one led at 5,000.

Measured on public data (`benchmarks/bench_small_data.py`, epsilon 1, delta
1e-5, balanced accuracy on held-out people, 10 seeds; docs/training.md "Small
data" has the tables): 1,000 rows of the bundled sample reach 0.672 at these
defaults against 0.500 (the majority class) at the old fixed ones and 0.686 for
the best hand setting found (within the seed-to-seed spread); 500 rows 0.602,
2,000 rows 0.722, 5,000 rows 0.745; the full sample keeps 0.856 accuracy; 455
people of scikit-learn's breast cancer set reach 0.900 against 0.500.

Every explicit number in the config keeps its meaning; only ``"auto"`` keys are
chosen here, and `train` records what was chosen in its figures and privacy.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from personanet.config import AUTO, TrainConfig

#: the sampling rate `auto` aims at: small enough for subsampling to amplify privacy
AUTO_SAMPLE_RATE = 1 / 32
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 16, 1024
#: below this many people x epsilon the small network wins (see the module docstring)
SMALL_DATA_PEOPLE_EPSILON = 5_000
#: warn above this sampling rate: amplification by subsampling weakens as q grows
WARN_SAMPLE_RATE = 0.1
#: warn below this many planned steps: too few noisy steps to learn anything
WARN_MIN_STEPS = 100



@dataclass(frozen=True)
class Regime:
    """The network and the training length of one side of the small-data boundary."""

    hidden_sizes: tuple[int, ...]
    numeric_bins: int
    learning_rate: float  # Adam's
    epochs: int


SMALL_NETWORK = Regime(hidden_sizes=(16,), numeric_bins=0, learning_rate=3e-2, epochs=15)
#: the settings measured on the full bundled sample (0.855 at epsilon 1)
LARGE_NETWORK = Regime(hidden_sizes=(64, 64), numeric_bins=16, learning_rate=1e-2, epochs=10)
#: learning rates of the optimizers whose step size is not Adam's
OTHER_LEARNING_RATES = {"sgd": 0.1, "lbfgs": 1.0}

AUTO_KEYS = ("batch_size", "epochs", "learning_rate", "hidden_sizes", "numeric_bins")


@dataclass(frozen=True)
class AutoSettings:
    """What `auto_settings` chose, and for what."""

    batch_size: int
    epochs: int
    learning_rate: float
    hidden_sizes: list[int]
    numeric_bins: int
    #: "small" or "large" network, from rows * epsilon
    regime: str
    train_rows: int
    epsilon: float


def auto_settings(n_train_rows: int, epsilon: float, *, optimizer: str = "adam"
                  ) -> AutoSettings:
    """The `auto` training settings for `n_train_rows` people at target `epsilon`.

    Args:
        n_train_rows: labelled training rows, one per person: with Poisson sampling the
            rate is ``batch / rows``, and privacy amplification needs it small.
        epsilon: the run's target epsilon; less budget means more noise per step, which a
            smaller network tolerates better.
        optimizer: the learning rate depends on it (Adam's steps are scale-free; SGD's not).
    """
    rows = max(int(n_train_rows), 1)
    batch = 2 ** round(math.log2(max(rows * AUTO_SAMPLE_RATE, 1.0)))
    batch = min(max(batch, MIN_AUTO_BATCH), MAX_AUTO_BATCH)
    small = rows * epsilon < SMALL_DATA_PEOPLE_EPSILON
    network = SMALL_NETWORK if small else LARGE_NETWORK
    return AutoSettings(batch_size=batch, epochs=network.epochs,
                        learning_rate=OTHER_LEARNING_RATES.get(optimizer, network.learning_rate),
                        hidden_sizes=list(network.hidden_sizes),
                        numeric_bins=network.numeric_bins,
                        regime="small" if small else "large", train_rows=rows,
                        epsilon=float(epsilon))


def settled(train: TrainConfig) -> TrainConfig:
    """`train` with "auto" architecture keys at their large-data values.

    For code that builds an encoder or a network with no rows to choose from (a
    notebook, a test); `train` itself resolves "auto" from the rows first.
    """
    changes: dict[str, object] = {}
    if train.hidden_sizes == AUTO:
        changes["hidden_sizes"] = list(LARGE_NETWORK.hidden_sizes)
    if train.numeric_bins == AUTO:
        changes["numeric_bins"] = LARGE_NETWORK.numeric_bins
    return dataclasses.replace(train, **changes) if changes else train


def auto_keys(train: TrainConfig) -> list[str]:
    """The [train] keys set to "auto" in this config."""
    return [name for name in AUTO_KEYS if getattr(train, name) == AUTO]


def resolve_train_config(train: TrainConfig, *, n_train_rows: int
                         ) -> tuple[TrainConfig, dict[str, object]]:
    """`train` with every "auto" key replaced by `auto_settings`' choice.

    Returns the resolved config and what was chosen (empty when nothing was "auto"),
    for the log, the figures and privacy.json.
    """
    keys = auto_keys(train)
    if not keys:
        return train, {}
    chosen = auto_settings(n_train_rows, train.epsilon, optimizer=train.optimizer)
    values = {name: getattr(chosen, name) for name in keys}
    resolved = dataclasses.replace(train, **values)
    return resolved, {**values, "regime": chosen.regime, "train_rows": chosen.train_rows}


def describe_auto(chosen: dict[str, object], *, epsilon: float) -> str:
    """One log line: "auto: batch 32, 15 epochs, lr 0.03, hidden [16], 0 bins, for ..."."""
    parts = []
    if "batch_size" in chosen:
        parts.append(f"batch {chosen['batch_size']}")
    if "epochs" in chosen:
        parts.append(f"{chosen['epochs']} epochs")
    if "learning_rate" in chosen:
        parts.append(f"lr {chosen['learning_rate']:g}")
    if "hidden_sizes" in chosen:
        parts.append(f"hidden {chosen['hidden_sizes']}")
    if "numeric_bins" in chosen:
        parts.append(f"{chosen['numeric_bins']} numeric bins")
    return (f"auto: {', '.join(parts)}, for {chosen['train_rows']} rows at epsilon "
            f"{epsilon:g} ({chosen['regime']} data)")


def small_data_warnings(*, sample_rate: float, planned_steps: int, rows: int) -> list[str]:
    """Warnings for a plan that DP-SGD is unlikely to learn from, "auto" or not."""
    found: list[str] = []
    if sample_rate > WARN_SAMPLE_RATE:
        found.append(
            f"sampling rate {sample_rate:.3g} (batch / {rows} rows) is above "
            f"{WARN_SAMPLE_RATE:g}: subsampling barely amplifies privacy, so the noise is "
            "large; lower train.batch_size (or set it to \"auto\")")
    if planned_steps < WARN_MIN_STEPS:
        found.append(
            f"only {planned_steps} training steps planned (fewer than {WARN_MIN_STEPS}): "
            "the model may not learn beyond the majority class; raise train.epochs or lower "
            "train.batch_size (or set them to \"auto\")")
    return found
