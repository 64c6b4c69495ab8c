"""Privacy units: the person a guarantee protects when a person has several rows.

`clean` keeps up to ``k = clean.max_rows_per_unit`` rows per person. Two honest ways to
train on them (docs/training.md, "Person level"):

- **person level** (the default): sample people, not rows, and clip each sampled
  person's gradient over all their rows (the mean of their rows' gradients) to C. One
  person then changes the sum of clipped gradients by at most C, exactly what one row
  does in row-level DP-SGD, so the accountant's epsilon holds per person whatever k
  (Levy et al. 2021, "Learning with User-Level Privacy"; Charles et al. 2024,
  "Fine-Tuning Large Language Models with User-Level Differential Privacy").
  `UnitLayout` arranges a batch's rows by person for the clipper, and
  `sum_grad_samples_by_unit` turns Opacus' per-row gradients into per-person ones.
- **row level**: DP-SGD over rows; a person with k rows is a group of k rows, protected
  only by group privacy. `group_privacy` computes that per-person bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the RDP orders the group-privacy search converts at (wide: it needs tiny deltas)
_GROUP_ORDERS = ([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64))
                 + [80, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192])


class UnitLayout:
    """A batch's rows grouped by person: ``index[i]`` is row i's person, 0 .. count-1.

    `pad` lays rows out as ``(count, max_rows, features)`` with zero rows where a person
    has fewer (zero rows add nothing to a gradient or to a Gram matrix), `sum` adds rows
    up per person.
    """

    def __init__(self, index: torch.Tensor) -> None:
        import torch

        self.index = index.long()
        n = int(self.index.shape[0])
        self.count = int(self.index.max()) + 1 if n else 0
        counts = torch.bincount(self.index, minlength=self.count)
        self.max_rows = int(counts.max()) if n else 0
        order = torch.sort(self.index, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        self.position = torch.empty_like(self.index)
        self.position[order] = (torch.arange(n, device=self.index.device)
                                - starts[self.index[order]])

    def pad(self, rows: torch.Tensor, *, fill: float = 0) -> torch.Tensor:
        """``(n, ...)`` -> ``(count, max_rows, ...)``."""
        out = rows.new_full((self.count, self.max_rows, *rows.shape[1:]), fill)
        out[self.index, self.position] = rows
        return out

    def sum(self, rows: torch.Tensor) -> torch.Tensor:
        """``(n, ...)`` -> ``(count, ...)``: each person's rows added up."""
        out = rows.new_zeros((self.count, *rows.shape[1:]))
        return out.index_add_(0, self.index, rows)


def sum_grad_samples_by_unit(params: Iterable[Any], index: torch.Tensor) -> None:
    """Replace Opacus' per-row ``p.grad_sample`` (n, ...) by per-person sums (U, ...).

    Called between the backward pass and ``optimizer.step()``, so that the optimizer
    clips one gradient per person. With the loss of row i weighted by one over its
    person's row count, each sum is the mean of the person's row gradients.
    """
    layout = UnitLayout(index)
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if sample is None:
            continue
        if isinstance(sample, list):  # several forward passes: Opacus keeps a list
            sample = sum(sample[1:], sample[0])
        p.grad_sample = layout.sum(sample)


@dataclass(frozen=True)
class GroupPrivacy:
    """The per-person (epsilon, delta) of a row-level run with up to `rows` rows a person.

    Row-level DP-SGD is (e, d')-DP per row for every d' (from its accountant). Group
    privacy (Dwork and Roth 2014, §2.3; Vadhan 2017, "The Complexity of Differential
    Privacy", Lemma 2.2): k changed rows, one at a time, give
    ``(k e, d' (e^{k e} - 1) / (e^e - 1))``, the geometric sum that the usual
    ``k e^{(k-1) e} d'`` bounds from above. The search picks the d' that brings that delta
    to at most `delta` at the smallest k e.
    """

    epsilon: float
    delta: float
    rows: int
    row_delta: float
    method: str = "group privacy of (epsilon, delta)-DP over RDP, Vadhan 2017 Lemma 2.2"

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "delta": self.delta, "rows_per_unit": self.rows,
                "row_delta": self.row_delta, "method": self.method}


def group_privacy(*, history: Sequence[tuple[float, float, int]], rows: int,
                  delta: float) -> GroupPrivacy:
    """The per-person bound of row-level DP-SGD with `history` (noise multiplier,
    sample rate, steps) when a person has up to `rows` rows; `delta` is the person's.

    The row-level (e', d') curve comes from the run's RDP (Balle et al. 2020's
    conversion, the one Opacus uses), evaluated in log space so that d' may go far
    below the smallest double: group privacy needs d' around ``delta e^{-(k-1) e'}``.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    if rows == 1:
        raise ValueError("one row per person: the row-level epsilon is the person's")
    orders = [float(a) for a in _GROUP_ORDERS]
    rdp = [0.0] * len(orders)
    for sigma, q, steps in history:
        phase = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                         orders=orders)
        rdp = [a + float(b) for a, b in zip(rdp, phase, strict=True)]
    # Opacus' series can overflow at the largest orders: those orders just drop out.
    orders, rdp = zip(*[(a, r) for a, r in zip(orders, rdp, strict=True) if math.isfinite(r)],
                      strict=True)
    target = math.log(delta)
    best: GroupPrivacy | None = None
    log_inv = math.log(1 / delta)  # log(1/d'), searched upwards in 1% steps
    while log_inv < 1e6:
        row_eps = max(0.0, min(r + (log_inv - math.log(a)) / (a - 1) + math.log((a - 1) / a)
                               for a, r in zip(orders, rdp, strict=True)))
        if row_eps == 0:
            log_group_delta = math.log(rows) - log_inv
        else:  # log of d' (e^{k e'} - 1) / (e^{e'} - 1), without overflow
            log_group_delta = (rows * row_eps + math.log(-math.expm1(-rows * row_eps))
                               - row_eps - math.log(-math.expm1(-row_eps)) - log_inv)
        if log_group_delta <= target and (best is None or rows * row_eps < best.epsilon):
            best = GroupPrivacy(epsilon=rows * row_eps, delta=delta, rows=rows,
                                row_delta=math.exp(-log_inv))
        elif best is not None and rows * row_eps > 2 * best.epsilon:
            break  # e' only grows with log(1/d') from here
        log_inv *= 1.01
    if best is None:
        return GroupPrivacy(epsilon=math.inf, delta=delta, rows=rows, row_delta=0.0)
    return best
