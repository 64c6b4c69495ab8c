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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
                   group_privacy=bound.to_json())
        return doc


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
