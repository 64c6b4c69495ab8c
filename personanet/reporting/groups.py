"""Fairness groups: how evaluate splits the held-out people by a sensitive column.

A categorical column's groups are its values. A numeric or datetime column's
groups are bins of its public bounds: the config's ``groups = [edges]``, or by
default `DEFAULT_BINS` equal-width bins of ``bounds``. Bins are never cut at
quantiles or distinct values of the private rows: every distinct age as its
own group made dozens of groups of one or two people, each of which would say
whether those people were classified correctly, and edges taken from the data
would themselves describe it.

Bins are half-open, ``[low, high)``, except the last, which holds its upper
bound (``[75.4, 90]``), so every value within the bounds has exactly one group.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from personanet.reporting.metrics import MISSING_GROUP

if TYPE_CHECKING:
    import polars as pl

    from personanet.config import ColumnConfig, Config

#: equal-width bins of the public bounds when a sensitive numeric/datetime column gives no edges
DEFAULT_BINS = 5
_DAY = 86_400.0


@dataclass(frozen=True)
class Grouping:
    """The groups of one sensitive column, from the config alone (never from the data).

    ``edges`` (binned columns only) are ascending bin boundaries, the bounds
    included, in the column's units (seconds since the epoch for datetimes);
    ``labels`` are the groups in reading order: one per bin, or the public
    categories of a categorical column.
    """

    column: str
    kind: str
    labels: tuple[str, ...]
    edges: tuple[float, ...] = ()

    @property
    def binned(self) -> bool:
        return bool(self.edges)

    def to_json(self) -> dict[str, Any]:
        """How the groups were formed, for metrics.json and the evaluate fingerprint."""
        if not self.binned:
            return {"by": "value"}
        edges: list[Any] = ([_instant_text(e) for e in self.edges] if self.kind == "datetime"
                            else [e if math.isfinite(e) else None for e in self.edges])
        return {"by": "bins", "edges": edges, "labels": list(self.labels)}

    def assign(self, values: pl.Series) -> NDArray[np.object_]:
        """Each row's group label; a missing value is the group `MISSING_GROUP`."""
        import polars as pl

        if not self.binned:
            return np.asarray(values.cast(pl.String).fill_null(MISSING_GROUP).to_list(),
                              dtype=object)
        numbers = _as_numbers(values, self.kind)
        edges = np.asarray(self.edges, dtype=np.float64)
        # side="right" puts a value equal to an edge into the bin that starts there; the last
        # bin is closed, so the upper bound itself belongs to it.
        index = np.searchsorted(edges, numbers, side="right") - 1
        index = np.where(numbers == edges[-1], len(self.labels) - 1, index)
        labels = np.array(self.labels, dtype=object)
        out = np.full(len(numbers), MISSING_GROUP, dtype=object)
        inside = ~np.isnan(numbers) & (index >= 0) & (index < len(self.labels))
        out[inside] = labels[index[inside]]
        # clean clips or quarantines values outside the bounds; should one get here, it gets a
        # group of its own rather than being counted in the nearest bin.
        out[numbers < edges[0]] = f"< {self._edge_text(edges[0])}"
        out[numbers > edges[-1]] = f"> {self._edge_text(edges[-1])}"
        return out

    def _edge_text(self, edge: float) -> str:
        return _edge_labels(self.kind, [edge])[0]


def grouping(column: ColumnConfig, *, n_bins: int = DEFAULT_BINS) -> Grouping:
    """The groups of a sensitive column, from its public config.

    ``n_bins`` (default bins of the bounds) trades detail against group size:
    more bins find a narrower group the model serves badly, but each bin holds
    fewer people, so more are suppressed as too small to publish.
    """
    kind = column.kind
    if kind not in ("numeric", "datetime"):
        return Grouping(column.name, kind, tuple(column.categories or ()))
    low, high = _bounds(column)
    if column.groups is not None:
        inner = [_value(e, kind) for e in column.groups]
        inner = [e for e in inner if low < e < high]
    else:
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"sensitive column {column.name!r} has neither bounds nor groups")
        inner = [float(e) for e in np.linspace(low, high, n_bins + 1)[1:-1]]
        if kind == "datetime" and (high - low) / n_bins >= 2 * _DAY:
            # Whole days read better than 2024-08-07T04:47:59, and stay public and in order.
            inner = [round(e / _DAY) * _DAY for e in inner]
    edges = (low, *inner, high)
    texts = _edge_labels(kind, edges)
    labels = [_bin_label(texts[i], texts[i + 1], last=i == len(edges) - 2)
              for i in range(len(edges) - 1)]
    return Grouping(column.name, kind, tuple(labels), tuple(edges))


def groupings(config: Config, sensitive: Sequence[str]) -> dict[str, Grouping]:
    """`grouping` for every named sensitive column of the config."""
    return {name: grouping(config.columns[name]) for name in sensitive}


def _bounds(column: ColumnConfig) -> tuple[float, float]:
    if column.bounds is None:
        return -math.inf, math.inf
    return _value(column.bounds[0], column.kind), _value(column.bounds[1], column.kind)


def _value(edge: Any, kind: str) -> float:
    if kind == "datetime":
        moment = dt.datetime.fromisoformat(str(edge).replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp()
    return float(edge)


def _as_numbers(values: pl.Series, kind: str) -> NDArray[np.float64]:
    import polars as pl

    if kind == "datetime":
        if not isinstance(values.dtype, pl.Datetime):
            values = values.cast(pl.String).str.to_datetime(time_zone="UTC", strict=False)
        seconds = values.dt.epoch("us").cast(pl.Float64) / 1e6
        return seconds.fill_null(np.nan).to_numpy().astype(np.float64)
    return values.cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy().astype(np.float64)


def _bin_label(low: str, high: str, *, last: bool) -> str:
    if low == "-inf":
        return f"< {high}"
    if high == "inf":
        return f">= {low}"
    return f"[{low}, {high}{']' if last else ')'}"


def _edge_labels(kind: str, edges: Sequence[float]) -> list[str]:
    if kind == "datetime":
        return [_instant_label(e) for e in edges]
    texts = [_number_label(e) for e in edges]
    if len(set(texts)) < len(texts):
        texts = [repr(float(e)) for e in edges]  # edges closer than 6 digits tell apart
    return texts


def _number_label(edge: float) -> str:
    if not math.isfinite(edge):
        return "inf" if edge > 0 else "-inf"
    return f"{edge:.6g}"


def _instant_label(edge: float) -> str:
    if not math.isfinite(edge):
        return "inf" if edge > 0 else "-inf"
    moment = dt.datetime.fromtimestamp(edge, dt.UTC)
    # An upper bound given as a bare date means that day's last second (`_instant` in
    # personanet/config/validation.py).
    if moment.time() in (dt.time(0, 0), dt.time(23, 59, 59)):
        return moment.date().isoformat()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _instant_text(edge: float) -> str:
    if not math.isfinite(edge):
        return "inf" if edge > 0 else "-inf"
    return dt.datetime.fromtimestamp(edge, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
