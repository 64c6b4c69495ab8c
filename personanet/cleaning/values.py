"""Values: what clean's rules accept and produce, one value at a time.

The vocabulary of the per-row rules (quarantine reasons, the `__other__` and
`__missing__` categories, the datetime formats accepted, internal column names) and
the public knowledge a value is judged by: text normalisation, datetime parsing, a
column's bounds and its imputed value. Only the config shapes these; no statistic of
the private rows does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from personanet.config import ColumnConfig, Config
from personanet.config.categories import fold_text  # noqa: F401  (its home is config)
from personanet.errors import ConfigError
from personanet.sources.images import (
    IMAGE_TOO_LARGE,
    MISSING_FILE,
    PATH_OUTSIDE_FOLDER,
    UNDECODABLE_IMAGE,
)

if TYPE_CHECKING:
    import polars as pl

#: a categorical value outside the declared domain (unknown_category = "other")
OTHER = "__other__"
#: a missing categorical value (impute = "missing")
MISSING = "__missing__"
#: suffix of the 0/1 feature that says a value was missing (missing_indicator = true)
INDICATOR_SUFFIX = "__missing"

# Quarantine reasons. A row is quarantined once, under its first reason: the privacy
# unit first, then the columns in config order, then the split.
MISSING_PRIVACY_UNIT = "missing_privacy_unit"
INVALID_VALUE = "invalid_value"
OUT_OF_BOUNDS = "out_of_bounds"
IN_FUTURE = "in_future"
UNKNOWN_CATEGORY = "unknown_category"
MISSING_VALUE = "missing_value"
MISSING_TARGET = "missing_target"
INVALID_TARGET = "invalid_target"
UNKNOWN_TARGET = "unknown_target"
UNKNOWN_SPLIT_VALUE = "unknown_split_value"
SPLIT_CONFLICT = "split_conflict"
# An image column's reasons (personanet.cleaning.images; the first four are collect's).
EMPTY_IMAGE = "empty_image"
TRUNCATED_IMAGE = "truncated_image"
NOT_8BIT = "not_8bit"
WRONG_MODE = "wrong_mode"
WRONG_SIZE = "wrong_size"
CONSTANT_IMAGE = "constant_image"
IMAGE_REASONS = (PATH_OUTSIDE_FOLDER, MISSING_FILE, IMAGE_TOO_LARGE, UNDECODABLE_IMAGE,
                 EMPTY_IMAGE, TRUNCATED_IMAGE, NOT_8BIT, WRONG_MODE, WRONG_SIZE, CONSTANT_IMAGE)
REASONS = (MISSING_PRIVACY_UNIT, INVALID_VALUE, OUT_OF_BOUNDS, IN_FUTURE, UNKNOWN_CATEGORY,
           MISSING_VALUE, MISSING_TARGET, INVALID_TARGET, UNKNOWN_TARGET, UNKNOWN_SPLIT_VALUE,
           SPLIT_CONFLICT, *IMAGE_REASONS)

#: datetime text formats accepted, tried in order; a value matching none is invalid.
#: Values without an offset are UTC. The first two are the common exact ISO shapes,
#: which polars parses several times faster than the general forms after them.
DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%SZ",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)

# Internal column names; the prefix keeps them apart from any config column.
INTERNAL_PREFIX = "__personanet."
#: the 0-based input row number
ROW = f"{INTERNAL_PREFIX}row"
#: the privacy unit's pseudonym
UNIT = f"{INTERNAL_PREFIX}unit"
#: a row's first quarantine reason, and the column that gave it
REASON = f"{INTERNAL_PREFIX}reason"
REASON_COLUMN = f"{INTERNAL_PREFIX}reason_column"


def work_column(kind: str, column: str) -> str:
    """The name of an intermediate column of a rule ("parsed", "bounded", a flag ...)."""
    return f"{INTERNAL_PREFIX}{kind}:{column}"


def check_config(config: Config) -> None:
    """What the config loader cannot know is needed by clean (exit 78)."""
    cc = config.clean
    if cc.timestamp_column is not None:
        kind = config.columns[cc.timestamp_column].kind
        if kind not in ("datetime", "numeric"):
            raise ConfigError(
                f"clean.timestamp_column = {cc.timestamp_column!r} is a {kind} column: give "
                f"[columns.{cc.timestamp_column}] type = \"datetime\" so \"newest\" can be decided"
            )
    for col in config.columns.values():
        indicator = col.name + INDICATOR_SUFFIX
        if col.missing_indicator and indicator in config.columns:
            raise ConfigError(f"columns.{col.name}.missing_indicator would add {indicator!r}, "
                              "which is already a column: rename that column")
        if col.role == "feature" and col.kind in ("numeric", "datetime"):
            filler = impute_value(col)
            lo, hi = bounds_of(col)
            if filler is not None and lo is not None and not lo <= filler <= hi:
                raise ConfigError(f"columns.{col.name}.impute = {col.impute!r} is outside its "
                                  f"bounds {list(col.bounds or ())}: pick a value within them")


def normalized_text(expr: pl.Expr, case: str) -> pl.Expr:
    """Trimmed text, case-folded as configured; blank is null."""
    import polars as pl

    text = expr.cast(pl.String).str.strip_chars()
    if case == "lower":
        text = text.str.to_lowercase()
    elif case == "upper":
        text = text.str.to_uppercase()
    return pl.when(text.str.len_bytes() > 0).then(text)


def datetime_expr(expr: pl.Expr, raw: pl.Series,
                  formats: Sequence[str] | None = None) -> pl.Expr:
    """Datetime(us, UTC) from text in `formats` (default DATETIME_FORMATS), or from a
    temporal column."""
    import polars as pl

    target = pl.Datetime("us", "UTC")
    if isinstance(raw.dtype, pl.Datetime):
        moment = expr.dt.convert_time_zone("UTC") if raw.dtype.time_zone else \
            expr.dt.replace_time_zone("UTC")
        return moment.cast(target)
    if raw.dtype == pl.Date:
        return expr.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    return pl.lit(parsed_datetimes(raw, formats or DATETIME_FORMATS))


def parsed_datetimes(raw: pl.Series, formats: Sequence[str] = DATETIME_FORMATS) -> pl.Series:
    """Each text value parsed by the first of `formats` that fits it; null where none
    does (or the value is blank). A format without an offset reads UTC.

    The first format is tried on every value, each later one only on the values still
    unparsed: usually none are left, so a column costs one parse (trying every format
    on every row would cost a full parse each for nothing).
    """
    import polars as pl

    def parse(values: pl.Series, fmt: str) -> pl.Series:
        # A lazy frame: the plan splits the rows over polars' threads.
        return (values.to_frame("text").lazy()
                .select(pl.col("text").str.strip_chars()
                        .str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC"))
                .collect().to_series().alias(raw.name))

    text = raw.cast(pl.String)
    parsed = parse(text, formats[0])
    present = (text.str.strip_chars().str.len_bytes() > 0).fill_null(False)
    for fmt in formats[1:]:
        left = parsed.is_null() & present
        if not left.any():
            break
        positions = left.arg_true()
        parsed = parsed.scatter(positions, parse(text.gather(positions), fmt))
    return parsed


def bounds_of(col: ColumnConfig) -> tuple[Any, Any]:
    if col.bounds is None:
        return None, None
    if col.kind == "datetime":
        return parse_instant(col.bounds[0]), parse_instant(col.bounds[1])
    return float(col.bounds[0]), float(col.bounds[1])


def impute_value(col: ColumnConfig) -> Any:
    """The public value that fills a missing one, or None (rule "none" or "drop")."""
    rule = col.impute_rule
    if rule in ("none", "drop"):
        return None
    if rule == "missing":
        return MISSING
    if rule == "midpoint":
        lo, hi = bounds_of(col)
        if lo is None:
            return None
        if col.kind == "datetime":
            return (lo + (hi - lo) / 2).replace(microsecond=0)
        return (lo + hi) / 2
    if col.kind == "datetime":
        return parse_instant(str(rule))
    if col.kind == "numeric":
        return float(rule)
    return str(rule)


def parse_instant(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def format_instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
