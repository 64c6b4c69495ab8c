"""Person-level batches: Poisson sampling over people, each sampled person with all rows.

Under ``train.privacy_unit_level = "person"`` with ``k = clean.max_rows_per_unit > 1``
the dataset's items are people, not rows: Opacus' Poisson loader samples each person
with probability ``q = 1 / ceil(people / batch_size)`` (``train.batch_size`` is then the
expected number of *people* a batch), and `PersonRows` hands back every row of every
sampled person, with two extra tensors:

- ``UNIT_INDEX``: row i's person within the batch, 0 .. U-1, which the clipper groups by;
- ``UNIT_WEIGHT``: one over the person's row count. Each person's gradient is the *mean*
  of their rows' gradients (the loss of a row weighted by it, then summed per person),
  so a person's gradient has the scale of one row's whatever their k: the clipping norm
  C tuned at one row a person keeps its meaning, and every person weighs the same in
  the objective (one person, one vote) instead of people with many rows dominating.

`BatchMemoryManager` splits a logical batch into physical ones by dataset index, that is
by person, so a person's rows are never split; a physical batch holds
``max_physical_batch_size // k`` people (``validation`` refuses k above the cap).

Under ``"row"`` with k > 1 a person is protected only by group privacy, so the plan also
says what the ledger is charged (`UnitPlan.charge`, `LedgerCharge`): the per-person bound,
planned before the first step and settled at the same function of the final history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personanet.errors import BudgetExhaustedError, InternalError
from personanet.privacy.composition import GROUP_PRIVACY

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from personanet.models.encoding import EncodedBatch
    from personanet.training.private import TrainingRun

#: batch keys: row i's person within the batch, and one over that person's row count
UNIT_INDEX = "unit_index"
UNIT_WEIGHT = "unit_weight"


@dataclass(frozen=True)
class UnitPlan:
    """Who a run samples and clips: people (`by_person`) or rows.

    Attributes:
        level: ``train.privacy_unit_level``, "person" or "row".
        rows_per_unit: k, the most rows one person may have (``clean.max_rows_per_unit``,
            or more when the clean artifact holds more: the guarantee needs the true k).
        people, rows: in the training data.
        units: each row's person, 0 .. people-1.
    """

    level: str
    rows_per_unit: int
    people: int
    rows: int
    units: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def by_person(self) -> bool:
        """Sample people and clip per person: level "person" with k > 1 (at k = 1 rows are
        people, and the row path is the same training)."""
        return self.level == "person" and self.rows_per_unit > 1

    @property
    def sampled(self) -> int:
        """How many items Poisson sampling draws from: people or rows."""
        return self.people if self.by_person else self.rows

    @property
    def physical_rows(self) -> int:
        """Rows a person may bring to a physical batch: k by person, else one."""
        return self.rows_per_unit if self.by_person else 1

    def loader(self, rows: EncodedBatch, *, batch_size: int, device: torch.device,
               private: bool, seed: int) -> DataLoader:
        """The loader over people (each with all their rows) or over rows, for Opacus to
        turn into a Poisson one; `batch_size` counts what it samples."""
        if self.by_person:
            assert self.units is not None
            return make_person_loader(rows, self.units, batch_size=batch_size, device=device,
                                      private=private, seed=seed)
        from personanet.training.loop import make_loader

        return make_loader(rows, batch_size=batch_size, device=device, private=private,
                           seed=seed)

    def record(self, run: TrainingRun) -> dict[str, Any] | None:
        """privacy.json's ``unit_level`` (None at k = 1, whose record stays as it was):
        person level: k, people, expected people a batch; row level: the per-person
        (epsilon, delta) group privacy gives (`personanet.privacy.units.group_privacy`)."""
        if self.rows_per_unit == 1 or not run.private:
            return None
        doc: dict[str, Any] = {"level": self.level, "rows_per_unit": self.rows_per_unit,
                               "people": self.people, "rows": self.rows}
        if self.by_person:
            doc["expected_people_per_batch"] = run.expected_batch_size
            return doc
        from personanet.privacy.units import group_privacy

        bound = group_privacy(history=run.accountant_history, rows=self.rows_per_unit,
                              delta=float(run.delta))
        # None: no delta' brings group privacy's delta down to train.delta (no bound)
        person_epsilon = bound.epsilon if math.isfinite(bound.epsilon) else None
        doc.update(person_epsilon=person_epsilon, person_delta=bound.delta,
                   group_privacy=bound.to_json(), row_epsilon=run.epsilon(final=True),
                   ledger_charged="person_epsilon")
        return doc

    @property
    def by_group_privacy(self) -> bool:
        """Rows sampled while a person may have several: the ledger is charged the
        per-person bound of group privacy, not the row epsilon."""
        return self.level == "row" and self.rows_per_unit > 1

    def charge(self, run: TrainingRun) -> LedgerCharge:
        """What the ledger reserves for `run` before its first step (see `LedgerCharge`)."""
        assert run.private and run.noise_multiplier is not None and run.delta is not None
        plan = {"accountant": run.accountant, "noise_multiplier": run.noise_multiplier,
                "sample_rate": run.sample_rate, "steps_planned": run.planned_steps}
        if not self.by_group_privacy:
            return LedgerCharge(epsilon=float(run.target_epsilon or 0.0),
                                delta=float(run.delta), details=plan)
        from personanet.privacy.units import group_privacy

        # Group privacy is a function of the RDP curve, known from the calibrated noise,
        # the sample rate and the planned steps: the figure the run will settle at.
        bound = group_privacy(history=[(float(run.noise_multiplier), run.sample_rate,
                                        run.planned_steps)],
                              rows=self.rows_per_unit, delta=float(run.delta))
        return LedgerCharge(
            epsilon=bound.epsilon, delta=bound.delta, rows_per_unit=self.rows_per_unit,
            row_epsilon=float(run.target_epsilon or 0.0),
            details={**plan, "mechanism": GROUP_PRIVACY,
                     "accountant": "rdp, group privacy",
                     "charged": "person_epsilon", "rows_per_unit": self.rows_per_unit,
                     "row_epsilon": float(run.target_epsilon or 0.0),
                     "group_privacy": bound.to_json()})

    def settled(self, privacy: Mapping[str, Any]) -> dict[str, Any]:
        """The (epsilon, delta) to settle at, from privacy.json: the accountant's row figure,
        or, charged by group privacy, the person's from the final history (the same
        function of the same curve as `charge`'s plan)."""
        if not self.by_group_privacy:
            return {"epsilon": privacy["epsilon"], "delta": privacy["delta"]}
        level = privacy["unit_level"]
        if level.get("person_epsilon") is None:
            raise InternalError("a row-level run charged by group privacy has no "
                                "per-person bound")
        return {"epsilon": level["person_epsilon"], "delta": level["person_delta"],
                "row_epsilon_spent": privacy["epsilon"]}




@dataclass(frozen=True)
class LedgerCharge:
    """A private run's ledger reservation: (epsilon, delta) and the entry's `details`.

    Mostly the row epsilon the noise was calibrated to, composed tightly with the others
    as DP-SGD. A row-level run where a person may have k > 1 rows protects a person only
    by group privacy: the dataset's budget protects people, so it is charged the
    per-person bound (`personanet.privacy.units.group_privacy`) as a plain (epsilon,
    delta), composed by addition (``mechanism: "group-privacy"``).
    """

    epsilon: float
    delta: float
    details: dict[str, Any]
    rows_per_unit: int = 1
    row_epsilon: float | None = None

    def refused(self, exc: BudgetExhaustedError) -> BudgetExhaustedError:
        """`exc` saying which figure was checked and what costs less, where it was the
        per-person bound of group privacy; else `exc` itself."""
        if self.row_epsilon is None:
            return exc
        bound = (f"{self.epsilon:.4g}" if math.isfinite(self.epsilon)
                 else "unbounded (no delta' reaches train.delta)")
        return BudgetExhaustedError(
            f"{exc}. This row-level run (train.privacy_unit_level = \"row\", up to "
            f"{self.rows_per_unit} rows a person) is charged its per-person epsilon {bound} "
            f"at delta {self.delta:g} (group privacy of its row epsilon "
            f"{self.row_epsilon:.4g}); train.privacy_unit_level = \"person\" (the default) "
            f"costs about the row epsilon per person, far less")


def unit_plan(units: np.ndarray, *, level: str, max_rows_per_unit: int) -> UnitPlan:
    """The plan for rows whose persons are `units` (one id per row, any integers)."""
    import numpy as np

    _, per_person = np.unique(units, return_counts=True)
    seen = int(per_person.max()) if len(per_person) else 1
    return UnitPlan(level=level, rows_per_unit=max(int(max_rows_per_unit), seen),
                    people=len(per_person), rows=int(len(units)), units=units)


class PersonRows:
    """Encoded rows indexed by person: item p is all of person p's rows."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], units: np.ndarray) -> None:
        import torch

        first = next(iter(tensors.values()))
        unit = torch.as_tensor(units, dtype=torch.long, device=first.device)
        if unit.shape[0] != first.shape[0]:
            raise ValueError("one unit per row")
        _, unit = torch.unique(unit, return_inverse=True)  # people numbered 0 .. P-1
        order = torch.sort(unit, stable=True).indices
        self.tensors = {name: t.index_select(0, order) for name, t in tensors.items()}
        self.counts = torch.bincount(unit)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    @property
    def max_rows(self) -> int:
        return int(self.counts.max()) if len(self) else 0

    def __getitem__(self, person: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([person])

    def __getitems__(self, people: list[int]) -> dict[str, torch.Tensor]:
        import torch

        device = self.counts.device
        chosen = torch.as_tensor(people, dtype=torch.long, device=device)
        counts = self.counts.index_select(0, chosen)
        local = torch.repeat_interleave(torch.arange(len(people), device=device), counts)
        first_row = torch.cumsum(counts, 0) - counts
        within = torch.arange(local.shape[0], device=device) - first_row[local]
        rows = self.starts.index_select(0, chosen)[local] + within
        batch = {name: t.index_select(0, rows) for name, t in self.tensors.items()}
        batch[UNIT_INDEX] = local
        batch[UNIT_WEIGHT] = 1.0 / counts[local].to(torch.float32)
        return batch


def make_person_loader(rows: EncodedBatch, units: np.ndarray, *, batch_size: int,
                       device: torch.device, private: bool, seed: int) -> DataLoader:
    """A loader over people (``batch_size`` of them expected a batch); Opacus turns it
    into a Poisson one over people."""
    import secrets

    import torch
    from torch.utils.data import DataLoader

    people = PersonRows(rows.tensors(device), units)
    # Which people are in a batch must stay secret (as in `make_loader`).
    sampling = torch.Generator().manual_seed(secrets.randbits(63) if private else seed)
    return DataLoader(people, batch_size=min(batch_size, len(people)),  # type: ignore[arg-type]
                      collate_fn=_whole_batch, generator=sampling)


def weighted_losses(losses: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each row's loss over its person's row count (person-level batches), else as is."""
    weight = batch.get(UNIT_WEIGHT)
    return losses if weight is None else losses * weight.to(losses.dtype)


def _whole_batch(batch: Any) -> Any:
    return batch
