"""The "auto" training settings of the image model (cnn), chosen from the number of people.

The tabular rules (`personanet.training.defaults`) size an MLP; a CNN on images wants
other numbers. Measured on the bundled forms sample (4,000 training digits, epsilon 1, 3
and 8 at delta 1e-5; `benchmarks/bench_forms.py`, docs/training.md "Images"):

- **batch**: 256 expected (Poisson rate 1/16 at 4,000 people), the power of two nearest
  ``rows / 16`` below that, at least 16;
- **learning rate**: Adam at 5e-3 (SGD 0.1): at epsilon 1 and 30 epochs, 0.868 (3 runs)
  against 0.854 (3 runs) for 3e-3, the reference's, and 0.838 (one run) for 1e-2;
- **epochs**: 45: at epsilon 1, 0.881 against 0.868 for 30 and 0.867 for 15; at epsilon
  3 0.930 against 0.926; at 8 0.954 against 0.951 (3 runs each); batch 512 with 60
  epochs (the same steps) 0.873 at epsilon 1;
- **augmentation**: off. At epsilon 3 (3 seeds, paired) K = 4 copies raised accuracy
  from 0.921 to 0.928 at 15 epochs and from 0.926 to 0.933 at 30, and K = 1 lowered it
  (0.920 against 0.931, one seed); but K = 4 makes an epoch about 7x longer (Opacus'
  hooks, four times the rows), and 45 epochs without it reach 0.930 in a fifth of the
  time of 30 with it: the compute is better spent on epochs;
- ``hidden_sizes`` and ``numeric_bins`` do not apply to the CNN: set to the preset's
  dense width and 0 in the resolved config, left out of the "auto:" line.

Every explicit number in the config keeps its meaning; only "auto" keys are chosen here,
and `train` records the choice in its figures and privacy.json.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from personanet.config import AUTO, TrainConfig

IMAGE_MAX_BATCH, IMAGE_MIN_BATCH = 256, 16
IMAGE_LEARNING_RATE = 5e-3
IMAGE_EPOCHS = 45
#: augmentation under "auto": off (the module docstring: epochs buy more for the compute)
AUGMENT = False
#: K under "auto", when augmentation is switched on
MULTIPLICITY = 1
OTHER_LEARNING_RATES = {"sgd": 0.1, "lbfgs": 1.0}


def resolve_image_train_config(train: TrainConfig, *, n_train_rows: int
                               ) -> tuple[TrainConfig, dict[str, Any]]:
    """`train` with every "auto" key the cnn reads replaced; what was chosen, for the log."""
    rows = max(int(n_train_rows), 1)
    batch = 2 ** round(math.log2(max(rows / 16, 1.0)))
    preset = train.preset if train.preset != AUTO else "tanh"
    choices: dict[str, Any] = {
        "batch_size": min(max(batch, IMAGE_MIN_BATCH), IMAGE_MAX_BATCH),
        "epochs": IMAGE_EPOCHS,
        "learning_rate": OTHER_LEARNING_RATES.get(train.optimizer, IMAGE_LEARNING_RATE),
        "hidden_sizes": [128 if preset == "seed" else 32],
        "numeric_bins": 0,
        "augment": AUGMENT,
        "augment_multiplicity": MULTIPLICITY,
    }
    chosen = {k: v for k, v in choices.items() if getattr(train, k) == AUTO}
    if not chosen:
        return train, {}
    resolved = dataclasses.replace(train, **chosen)
    # The tabular network's words (hidden sizes, numeric bins) would only puzzle a reader
    # of the cnn's log line and manifest: the preset says what the network is.
    told = {k: v for k, v in chosen.items() if k not in ("hidden_sizes", "numeric_bins")}
    if train.preset == AUTO:
        told["preset"] = preset
    return resolved, {**told, "regime": "image", "train_rows": rows}
