"""Feature encoding from the public schema: never fitted on the private rows.

An `Encoder` is built from the config alone (bounds, category domains, datetime
bounds), so it reveals nothing about the people in the data and costs no
privacy budget. It is saved as ``encoder.json`` beside the model, and
`predict` and `evaluate` rebuild it with `Encoder.from_json` so they apply
exactly the transform the model was trained with.

What `transform` produces for each feature column (in config order):

- categorical: an index column. Slots ``0 .. K-1`` are the declared
  categories in config order, slot ``K`` is "other" (``"__other__"`` or any
  value outside the domain) and slot ``K+1`` is "missing" (null or
  ``"__missing__"``); the cardinality is therefore ``K + 2``.
- numeric: clipped to its bounds and scaled to ``[0, 1]``, linearly, or with
  ``log1p`` for ``scale = "log"``. A null (clean leaves one only with
  ``impute = "none"``) becomes ``0.5``, the middle of the scaled range.
- datetime: clipped to its bounds and scaled linearly to ``[0, 1]``; null -> ``0.5``.
- ``train.numeric_bins = k`` (default 16): each numeric or datetime value ``x``
  (scaled as above) also gets a piecewise-linear encoding over ``k`` equal-width
  bins of its public range, ``clip(k * x - j, 0, 1)`` for ``j = 0 .. k-1``
  (Gorishniy et al., "On Embeddings for Numerical Features in Tabular Deep
  Learning", 2022). The bins come from the bounds, not from data quantiles, so
  they cost no privacy; they let a small network bend at thresholds (capital
  gains, age) within the few hundred noisy steps DP-SGD can afford.
- ``missing_indicator = true``: one more numeric feature ``<col>__missing``
  (0 or 1), read from the ``<col>__missing`` column that clean writes, or
  derived from the value itself (null / ``"__missing__"``) when that column
  is absent.

The target becomes a class index (categorical; ``-1`` when null or outside
the domain, so the row is unlabelled) or, for regression, a float scaled to
``[0, 1]`` by the target's bounds (``NaN`` when null); `unscale_target` maps
model outputs back to the original units.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from personanet.errors import BadInputError, ConfigError
from personanet.training.defaults import settled

if TYPE_CHECKING:
    import polars as pl
    import torch

    from personanet.config import ColumnConfig, Config

ENCODER_FORMAT = "personanet.encoder/1"
OTHER = "__other__"
MISSING = "__missing__"
#: value a null numeric or datetime feature takes: the middle of the scaled range
NULL_NUMERIC = 0.5


@dataclass(frozen=True)
class EncodedBatch:
    """Model inputs for a frame: one row per record, in the frame's order.

    Attributes:
        categorical: int64 ``(rows, n_categorical)``, one index column per categorical.
        numeric: float32 ``(rows, n_numeric)``, every value in ``[0, 1]``.
        target: int64 class indices (``-1`` = unlabelled) or float32 scaled values
            (``NaN`` = unlabelled); None when the frame has no target column.
    """

    categorical: np.ndarray
    numeric: np.ndarray
    target: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of rows whose target is usable for training or scoring."""
        if self.target is None:
            return np.zeros(len(self), dtype=bool)
        if self.target.dtype.kind == "f":
            return ~np.isnan(self.target)
        return self.target >= 0

    def select(self, mask: np.ndarray) -> EncodedBatch:
        return EncodedBatch(self.categorical[mask], self.numeric[mask],
                            None if self.target is None else self.target[mask])

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The batch as named torch tensors on `device`: ``{"categorical", "numeric"}``,
        and ``"target"`` when the frame had one (a model family takes its inputs by name,
        `personanet.models.ModelFamily.inputs`)."""
        import torch

        out = {"categorical": torch.as_tensor(self.categorical, device=device),
               "numeric": torch.as_tensor(self.numeric, device=device)}
        if self.target is not None:
            out["target"] = torch.as_tensor(self.target, device=device)
        return out


class Encoder:
    """The public-schema transform from clean frames to model inputs (see module doc)."""

    def __init__(self, *, categorical: list[dict[str, Any]], numeric: list[dict[str, Any]],
                 indicators: list[dict[str, Any]], target: dict[str, Any],
                 numeric_bins: int = 0) -> None:
        if numeric_bins < 0:
            raise ConfigError("train.numeric_bins must be >= 0")
        self.categorical = categorical
        self.numeric = numeric
        self.indicators = indicators
        self.target = target
        self.numeric_bins = int(numeric_bins)
        self._index = [
            {**{c: i for i, c in enumerate(spec["categories"])},
             OTHER: len(spec["categories"]), MISSING: len(spec["categories"]) + 1}
            for spec in categorical
        ]

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: Config) -> Encoder:
        """Build from the config's public bounds and domains only (no data is read)."""
        categorical: list[dict[str, Any]] = []
        numeric: list[dict[str, Any]] = []
        indicators: list[dict[str, Any]] = []
        for col in config.features():
            if col.kind == "categorical":
                categorical.append({"name": col.name, "categories": list(col.categories or ()),
                                    "case": col.case})
            elif col.kind in ("numeric", "datetime"):
                numeric.append(_numeric_spec(col))
            else:  # config validation refuses text features; never guess
                raise ConfigError(f"columns.{col.name}: a {col.kind} column cannot be a feature")
            if col.missing_indicator:
                indicators.append({"name": f"{col.name}__missing", "column": col.name,
                                   "kind": col.kind})
        return cls(categorical=categorical, numeric=numeric, indicators=indicators,
                   target=_target_spec(config.target_column),
                   numeric_bins=settled(config.train).numeric_bins)

    def to_json(self) -> dict[str, Any]:
        return {"format": ENCODER_FORMAT, "categorical": self.categorical,
                "numeric": self.numeric, "numeric_bins": self.numeric_bins,
                "indicators": self.indicators, "target": self.target,
                "null_numeric": NULL_NUMERIC}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Encoder:
        if not isinstance(value, dict) or value.get("format") != ENCODER_FORMAT:
            raise BadInputError(f"not a personanet encoder (expected format {ENCODER_FORMAT!r})")
        try:
            return cls(categorical=list(value["categorical"]), numeric=list(value["numeric"]),
                       indicators=list(value["indicators"]), target=dict(value["target"]),
                       numeric_bins=int(value.get("numeric_bins", 0)))
        except (KeyError, TypeError) as exc:
            raise BadInputError(f"encoder JSON is incomplete: {exc}") from exc

    # ------------------------------------------------------------ description

    @property
    def task(self) -> str:
        """"binary", "multiclass" or "regression" (chooses the loss and the output layer)."""
        return str(self.target["task"])

    @property
    def target_name(self) -> str:
        return str(self.target["name"])

    @property
    def target_classes(self) -> list[str]:
        """Class labels in output order (empty for regression)."""
        return list(self.target.get("classes", []))

    @property
    def cardinalities(self) -> list[int]:
        """Slots per categorical: its categories plus "other" and "missing"."""
        return [len(spec["categories"]) + 2 for spec in self.categorical]

    @property
    def numeric_names(self) -> list[str]:
        """Names of the columns of `EncodedBatch.numeric`: scaled values, bins, indicators."""
        bins = [f"{s['name']}__bin{j}" for s in self.numeric for j in range(self.numeric_bins)]
        return [s["name"] for s in self.numeric] + bins + [s["name"] for s in self.indicators]

    @property
    def n_numeric(self) -> int:
        return len(self.numeric) * (1 + self.numeric_bins) + len(self.indicators)

    @property
    def n_outputs(self) -> int:
        return 1 if self.task in ("binary", "regression") else len(self.target_classes)

    @property
    def columns(self) -> list[str]:
        """The clean-frame columns this encoder reads (indicator columns are optional)."""
        return [s["name"] for s in self.categorical] + [s["name"] for s in self.numeric]

    # ------------------------------------------------------------ transform

    def transform(self, frame: pl.DataFrame) -> EncodedBatch:
        """Encode a clean-schema frame; null-safe; extra columns are ignored.

        Raises:
            BadInputError: a feature column is absent, or a value cannot be read as its type.
        """
        import polars as pl

        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise BadInputError(f"input has no column {missing[0]!r}, which the model needs "
                                f"(columns it needs: {', '.join(self.columns)})")
        rows = frame.height
        exprs: list[pl.Expr] = []
        for spec, index in zip(self.categorical, self._index, strict=True):
            exprs.append(_category_expr(spec, index).alias(f"c:{spec['name']}"))
        for spec in self.numeric:
            exprs.append(_scaled_expr(spec, frame.schema[spec["name"]]).alias(f"n:{spec['name']}"))
        for spec in self.indicators:
            exprs.append(_indicator_expr(spec, frame).alias(f"i:{spec['name']}"))
        try:
            encoded = frame.select(exprs) if exprs else pl.DataFrame()
        except pl.exceptions.PolarsError as exc:
            raise BadInputError(f"cannot encode the input: {str(exc).splitlines()[0]}") from exc
        cat_cols = [f"c:{s['name']}" for s in self.categorical]
        num_cols = [f"n:{s['name']}" for s in self.numeric] + \
                   [f"i:{s['name']}" for s in self.indicators]
        categorical = (encoded.select(cat_cols).to_numpy().astype(np.int64, copy=False)
                       if cat_cols else np.zeros((rows, 0), dtype=np.int64))
        numeric = (encoded.select(num_cols).to_numpy().astype(np.float32, copy=False)
                   if num_cols else np.zeros((rows, 0), dtype=np.float32))
        if self.numeric_bins and self.numeric:
            scaled = numeric[:, :len(self.numeric)]
            steps = np.arange(self.numeric_bins, dtype=np.float32)
            bins = np.clip(scaled[:, :, None] * self.numeric_bins - steps, 0.0, 1.0)
            numeric = np.concatenate([scaled, bins.reshape(rows, scaled.shape[1] * len(steps)),
                                      numeric[:, len(self.numeric):]], axis=1)
        target = None
        if self.target_name in frame.columns:
            target = self._encode_target(frame)
        # Polars hands out read-only views; torch wants arrays it may write.
        return EncodedBatch(np.require(categorical, requirements=["C", "W"]),
                            np.require(numeric, requirements=["C", "W"]),
                            None if target is None else np.require(target,
                                                                   requirements=["C", "W"]))

    def _encode_target(self, frame: pl.DataFrame) -> np.ndarray:
        import polars as pl

        spec = self.target
        column = pl.col(spec["name"])
        if spec["task"] == "regression":
            expr = _scaled_expr({**spec, "kind": "numeric"}, frame.schema[spec["name"]],
                                null_value=None)
            values = frame.select(expr).to_series().to_numpy().astype(np.float32)
            return np.where(np.isfinite(values), values, np.nan).astype(np.float32)
        mapping = {c: i for i, c in enumerate(spec["classes"])}
        expr = (column.cast(pl.String)
                .replace_strict(mapping, default=-1, return_dtype=pl.Int64).fill_null(-1))
        return frame.select(expr).to_series().to_numpy().astype(np.int64)

    def unscale_target(self, values: np.ndarray) -> np.ndarray:
        """Regression outputs (scaled to [0, 1]) back to the target's units."""
        if self.task != "regression":
            raise ValueError("unscale_target applies to regression targets only")
        return _unscale(np.asarray(values, dtype=np.float64), self.target)


# -------------------------------------------------------------------- helpers


def _epoch_us(iso: str) -> int:
    moment = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1_000_000)


def _numeric_spec(col: ColumnConfig) -> dict[str, Any]:
    lo, hi = col.bounds or (None, None)
    if col.kind == "datetime":
        return {"name": col.name, "kind": "datetime", "bounds": [str(lo), str(hi)],
                "low": _epoch_us(str(lo)), "high": _epoch_us(str(hi)), "scale": "linear"}
    scale = col.scale
    if scale == "log" and float(lo) < 0:
        raise ConfigError(f"columns.{col.name}: scale = \"log\" needs bounds >= 0")
    return {"name": col.name, "kind": "numeric", "bounds": [float(lo), float(hi)],
            "low": float(lo), "high": float(hi), "scale": scale}


def _target_spec(col: ColumnConfig) -> dict[str, Any]:
    if col.kind == "categorical":
        classes = list(col.categories or ())
        if len(classes) < 2:
            raise ConfigError(f"columns.{col.name}: a categorical target needs at least two "
                              "categories")
        return {"name": col.name, "task": "binary" if len(classes) == 2 else "multiclass",
                "classes": classes}
    return {**_numeric_spec(col), "task": "regression", "classes": []}


def _category_expr(spec: dict[str, Any], index: dict[str, int]) -> pl.Expr:
    import polars as pl

    value = pl.col(spec["name"]).cast(pl.String)
    case = spec.get("case", "none")
    mapping = dict(index)
    if case in ("lower", "upper"):
        # Clean already normalised case; the encoder tolerates frames that were not.
        value = value.str.to_lowercase() if case == "lower" else value.str.to_uppercase()
        fold = str.lower if case == "lower" else str.upper
        for category, slot in index.items():
            mapping.setdefault(fold(category), slot)
    other, missing = index[OTHER], index[MISSING]
    # replace_strict sends null to the default ("other"), so null is routed first.
    return (pl.when(value.is_null()).then(pl.lit(missing, dtype=pl.Int64))
            .otherwise(value.replace_strict(mapping, default=other, return_dtype=pl.Int64)))


def _as_number(name: str, kind: str, dtype: pl.DataType) -> pl.Expr:
    import polars as pl

    column = pl.col(name)
    if kind == "datetime":
        if dtype == pl.String:
            column = column.str.to_datetime(time_zone="UTC", strict=False)
        elif isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
            column = column.dt.replace_time_zone("UTC")
        elif isinstance(dtype, pl.Date):
            column = column.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        return column.dt.epoch("us").cast(pl.Float64)
    return column.cast(pl.Float64, strict=False)


def _scaled_expr(spec: dict[str, Any], dtype: pl.DataType, *,
                 null_value: float | None = NULL_NUMERIC) -> pl.Expr:
    import polars as pl

    lo, hi = float(spec["low"]), float(spec["high"])
    value = _as_number(spec["name"], spec["kind"], dtype)
    value = pl.when(value.is_nan()).then(None).otherwise(value).clip(lo, hi)
    if spec.get("scale") == "log":
        scaled = (value - lo).log1p() / math.log1p(hi - lo)
    else:
        scaled = (value - lo) / (hi - lo)
    return scaled.fill_null(null_value) if null_value is not None else scaled


def _indicator_expr(spec: dict[str, Any], frame: pl.DataFrame) -> pl.Expr:
    import polars as pl

    if spec["name"] in frame.columns:
        return pl.col(spec["name"]).cast(pl.Float32, strict=False).fill_null(1.0)
    value = pl.col(spec["column"])
    missing = value.is_null()
    if spec["kind"] == "categorical":
        missing = missing | (value.cast(pl.String) == MISSING).fill_null(True)
    return missing.cast(pl.Float32)


def _unscale(values: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    lo, hi = float(spec["low"]), float(spec["high"])
    clipped = np.clip(values, 0.0, 1.0)
    if spec.get("scale") == "log":
        return lo + np.expm1(clipped * math.log1p(hi - lo))
    return lo + clipped * (hi - lo)
