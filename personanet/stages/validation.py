"""Validation during training: a share of the *training people*, loss and accuracy per epoch.

The founding document's ``fit(..., validation_data=...)`` habit. ``train.validation_fraction``
(default "auto": 0.1 for the cnn, 0 for tabular, whose artifacts stay as they were) of the
training split's people is held out by a hash of their pseudonym (`hash_split`, with a seed
of its own so it is independent of the test split), never drawn from the test split, which
evaluate alone reads. The held-out people are not trained on: the model's DP guarantee
covers the rows it trained on, and the epsilon is accounted on those.

The figures per epoch (mean loss, and accuracy for a classifier) describe private rows: a
held-out person is still a person whose record is in the artifact. Under DP they are *not*
covered by the model's epsilon. They are written only into the train artifact's sealed
manifest (its figures, with `NOTE`), never into evaluate's metrics.json or report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personanet.cleaning.values import UNIT
from personanet.config import AUTO, Config

if TYPE_CHECKING:
    import polars as pl
    import torch

    from personanet.models import ModelFamily

logger = logging.getLogger("personanet")

#: `train.validation_fraction = "auto"` per model family (absent: 0)
AUTO_VALIDATION_FRACTION = {"cnn": 0.1}
NOTE = ("computed on held-out training people, whose records are private: under DP these "
        "figures are not covered by the model's epsilon and are not released outside the "
        "train artifact")


def validation_fraction(config: Config, family_name: str) -> float:
    """``train.validation_fraction`` with "auto" resolved for the model family."""
    value = config.train.validation_fraction
    if value == AUTO:
        return AUTO_VALIDATION_FRACTION.get(family_name, 0.0)
    return float(value)


def split_validation(frame: pl.DataFrame, *, seed: int, fraction: float
                     ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows to train on, held-out validation rows), by person: a person's rows stay
    together. `seed` is ``train.seed``; the hash's seed is derived from it so that it never
    equals the test split's (which would leave no one: every training person is above the
    test cut). evaluate repeats the split to leave the held-out people out of the audit's
    members."""
    import numpy as np
    import polars as pl

    from personanet.stages.clean import hash_split

    if fraction <= 0 or frame.height == 0:
        return frame, frame.clear()
    seed = (int(seed) * 1_000_003 + 0x5A17) % 2**63
    if UNIT in frame.columns:  # the pseudonym of the person
        held = hash_split(frame.get_column(UNIT).cast(pl.String), seed=seed,
                          test_fraction=fraction).to_numpy()
    else:  # a frame without pseudonyms (a notebook's): a seeded draw per row
        held = np.random.default_rng(seed).random(frame.height) < fraction
    mask = pl.Series(held)
    return frame.filter(~mask), frame.filter(mask)


@dataclass
class ValidationCurve:
    """Loss and accuracy of the network on the validation rows, one point per epoch."""

    tensors: dict[str, Any]
    rows: int
    fraction: float
    points: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, encoded: Any, *, fraction: float, device: torch.device) -> ValidationCurve | None:
        """From the validation rows' encoded batch (None when there are none)."""
        if encoded is None or len(encoded) == 0:
            return None
        return cls(tensors=encoded.tensors(device), rows=len(encoded), fraction=fraction)

    def measure(self, model: torch.nn.Module, family: ModelFamily, loss_fn: torch.nn.Module,
                *, epoch: int, batch_size: int = 4096) -> dict[str, Any]:
        """Score the rows in eval mode (then back to train mode) and record the point."""
        import torch

        inner = getattr(model, "_module", model)
        was_training = inner.training
        inner.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, self.rows, batch_size):
                part = {k: v[start:start + batch_size] for k, v in self.tensors.items()}
                output = inner(**family.inputs(part))
                total += float(loss_fn(output, part["target"]).sum())
                if part["target"].dtype == torch.int64:
                    predicted = (output[:, 0] > 0).long() if output.shape[1] == 1 \
                        else output.argmax(1)
                    correct += int((predicted == part["target"]).sum())
        inner.train(was_training)
        point: dict[str, Any] = {"epoch": epoch, "loss": round(total / self.rows, 6)}
        if self.tensors["target"].dtype == torch.int64:
            point["accuracy"] = round(correct / self.rows, 6)
        self.points.append(point)
        logger.info("epoch %d validation (held-out training people): %s", epoch,
                    ", ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "epoch"),
                    extra={"fields": {"validation": point}})
        return point

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "rows": self.rows, "curve": self.points,
                "note": NOTE}
