"""Column rules: how one configured column's raw values become the values a model sees.

Each column's rule is four stages of polars expressions (parse, value, bounds,
outcome) that `personanet.cleaning.rows.RowTransform` runs for every column at once
in one lazy plan: identifiers are only checked for presence (their pseudonyms come
from the HMAC loop), categoricals are matched against their public domain, numbers
and datetimes are parsed, bounded by the public bounds and imputed from public
values. A rule also names the row's first quarantine reason for its column and the
flags the clean report counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from personanet.cleaning.values import (
    IN_FUTURE,
    INDICATOR_SUFFIX,
    INVALID_TARGET,
    INVALID_VALUE,
    MISSING_TARGET,
    MISSING_VALUE,
    OTHER,
    OUT_OF_BOUNDS,
    UNKNOWN_CATEGORY,
    UNKNOWN_TARGET,
    bounds_of,
    datetime_expr,
    fold_text,
    impute_value,
    normalized_text,
    work_column,
)

if TYPE_CHECKING:
    import polars as pl

    from personanet.cleaning.rows import RowTransform
    from personanet.config import ColumnConfig

#: what a categorical spelling outside the domain maps to before the policy applies
_UNKNOWN = "\x00unknown"


class ColumnRule:
    """One column's rule as four stages of expressions (parse, value, bounds, outcome).

    Attributes after construction: `reason` (first quarantine reason of the row for
    this column, or null), `outputs` (the output column names it makes, identifiers
    excluded: they come from `pseudonyms`), `flags` ((column, kind) counters).
    """

    def __init__(self, col: ColumnConfig, transform: RowTransform, raw: pl.Series,
                 spellings: pl.Series | None = None) -> None:
        self.col = col
        self.transform = transform
        self.raw = raw
        #: the distinct non-null values of a categorical column, when already known
        self.spellings = spellings
        self.reason: pl.Expr | None = None
        self.outputs: list[str] = []
        self.flags: list[tuple[str, str]] = []

    def t(self, kind: str) -> str:
        return work_column(kind, self.col.name)

    def stages(self) -> list[list[pl.Expr]]:
        if self.col.role == "identifier":
            return self._identifier()
        if self.col.kind == "image":
            return self._image()
        if self.col.kind == "categorical":
            return self._categorical()
        return self._number_or_datetime()

    def _identifier(self) -> list[list[pl.Expr]]:
        import polars as pl

        self.flags.append((self.col.name, "missing"))
        # Case folding never makes a non-blank value blank: blankness needs no fold
        # (it cost a lowercase pass over every email).
        missing = normalized_text(pl.col(self.col.name), "none").is_null()
        return [[missing.alias(self.t("missing"))], [], [], []]

    def _image(self) -> list[list[pl.Expr]]:
        import polars as pl

        # Decoded before the plan runs (cleaning.images.decoded_columns): Pillow is no
        # polars expression. The reason is the decoder's; the value its pixels.
        self.reason = pl.col(self.t("image_reason"))
        return [[], [], [], self._outcome(pl.col(self.t("pixels")))]

    def _number_or_datetime(self) -> list[list[pl.Expr]]:
        import polars as pl

        col, t = self.col, self.t
        name = col.name
        text = pl.col(name).cast(pl.String).str.strip_chars()
        if col.kind == "numeric":
            if self.raw.dtype.is_numeric():
                parse = [pl.col(name).cast(pl.Float64).alias(t("parsed")),
                         pl.col(name).is_null().alias(t("blank"))]
            else:
                number = text
                if col.thousands:
                    number = number.str.replace_all(col.thousands, "", literal=True)
                if col.decimal != ".":
                    number = number.str.replace(col.decimal, ".", literal=True)
                parse = [number.cast(pl.Float64, strict=False).alias(t("parsed")),
                         (text.str.len_bytes() == 0).fill_null(True).alias(t("blank"))]
            parsed = pl.col(t("parsed"))
            # NaN and infinities are missing values, not numbers to clip.
            value = [
                pl.when(parsed.is_finite()).then(parsed).alias(t("value")),
                (pl.col(t("blank")) | ~parsed.is_finite().fill_null(True)).alias(t("missing")),
                (~pl.col(t("blank")) & parsed.is_null()).alias(t("invalid")),
            ]
        else:
            parse = [datetime_expr(pl.col(name), self.raw, col.formats).alias(t("parsed")),
                     (text.str.len_bytes() == 0).fill_null(True).alias(t("blank"))]
            parsed = pl.col(t("parsed"))
            value = [
                parsed.alias(t("value")),
                pl.col(t("blank")).alias(t("missing")),
                (~pl.col(t("blank")) & parsed.is_null()).alias(t("invalid")),
            ]
        self.flags += [(name, "missing"), (name, "invalid"), (name, "clipped")]

        v = pl.col(t("value"))
        lo, hi = bounds_of(col)
        clip = col.out_of_bounds == "clip"
        bounds = []
        if lo is None:
            bounds += [v.alias(t("bounded")), pl.lit(False).alias(t("clipped"))]
            out_of_bounds = in_future = None
        else:
            upper = hi
            outside = ((v < lo) | (v > hi)).fill_null(False)
            future = pl.lit(False)
            if col.kind == "datetime" and self.transform.as_of is not None:
                # A datetime after the records were collected cannot be true.
                upper = max(lo, min(hi, self.transform.as_of))
                future = (~outside & (v > upper)).fill_null(False)
            bounds += [
                outside.alias(t("outside")),
                future.alias(t("future")),
                (v.clip(lo, upper) if clip else v).alias(t("bounded")),
                ((outside | future) & pl.lit(clip)).alias(t("clipped")),
            ]
            out_of_bounds, in_future = pl.col(t("outside")), pl.col(t("future"))

        is_target = col.role == "target"
        strict_target = is_target and self.transform.require_target
        checks: list[tuple[pl.Expr, str]] = []
        if strict_target:
            checks.append((pl.col(t("invalid")), INVALID_TARGET))
        elif col.invalid == "quarantine":
            checks.append((pl.col(t("invalid")), INVALID_VALUE))
        if not clip and out_of_bounds is not None:
            checks += [(out_of_bounds, OUT_OF_BOUNDS), (in_future, IN_FUTURE)]
        if strict_target:
            checks.append((pl.col(t("missing")), MISSING_TARGET))
        elif col.role == "feature" and col.impute_rule == "drop":
            checks.append((pl.col(t("bounded")).is_null(), MISSING_VALUE))
        self.reason = _first_reason(checks)
        return [parse, value, bounds, self._outcome(pl.col(t("bounded")))]

    def _categorical(self) -> list[list[pl.Expr]]:
        import polars as pl

        col, t = self.col, self.t
        is_target = col.role == "target"
        # Matching (trim, Unicode NFC, case folding) runs once per distinct spelling,
        # of which a categorical has few, and the result is mapped back to every row.
        domain = {fold_text(c, col.case): c for c in col.categories or ()}
        for spelling, category in (col.aliases or {}).items():  # checked: no conflicts
            domain.setdefault(fold_text(spelling, col.case), category)
        spellings = self.spellings if self.spellings is not None else \
            self.raw.cast(pl.String).drop_nulls().unique()
        matched = []
        for spelling in spellings.to_list():
            folded = fold_text(spelling, col.case)
            matched.append(domain.get(folded, _UNKNOWN) if folded else None)
        parse = [pl.col(col.name).cast(pl.String).replace_strict(
            spellings, pl.Series(matched, dtype=pl.String), default=None,
            return_dtype=pl.String,
        ).alias(t("parsed"))]
        parsed = pl.col(t("parsed"))
        unknown = (parsed == _UNKNOWN).fill_null(False)
        value = [
            pl.when(~unknown).then(parsed).alias(t("value")),
            parsed.is_null().alias(t("missing")),
            unknown.alias(t("unknown")),
        ]
        self.flags.append((col.name, "missing"))

        to_other = not is_target and col.unknown_category == "other"
        bounds = [
            (pl.when(pl.col(t("unknown"))).then(pl.lit(OTHER)).otherwise(pl.col(t("value")))
             if to_other else pl.col(t("value"))).alias(t("bounded")),
        ]
        if not is_target:
            bounds.append((pl.col(t("unknown")) & pl.lit(to_other)).alias(t("other")))
            self.flags.append((col.name, "other"))

        checks: list[tuple[pl.Expr, str]] = []
        if is_target and self.transform.require_target:
            checks += [(pl.col(t("missing")), MISSING_TARGET),
                       (pl.col(t("unknown")), UNKNOWN_TARGET)]
        elif not is_target:
            if col.unknown_category == "quarantine":
                checks.append((pl.col(t("unknown")), UNKNOWN_CATEGORY))
            if col.impute_rule == "drop":
                checks.append((pl.col(t("missing")), MISSING_VALUE))
        self.reason = _first_reason(checks)
        return [parse, value, bounds, self._outcome(pl.col(t("bounded")))]

    def _outcome(self, bounded: pl.Expr) -> list[pl.Expr]:
        """Output expressions: the imputed value, its flag, the missing indicator."""
        import polars as pl

        col = self.col
        if col.role not in ("feature", "target"):
            return []  # an extra column: its `bounded` value is what the caller reads
        self.outputs.append(col.name)
        if col.role == "target":
            return [bounded.alias(col.name)]
        filler = impute_value(col)
        absent = bounded.is_null()
        out = [
            (bounded.fill_null(filler) if filler is not None else bounded).alias(col.name),
            (absent & pl.lit(filler is not None)).alias(self.t("imputed")),
        ]
        self.flags.append((col.name, "imputed"))
        if col.missing_indicator:
            out.append(absent.alias(col.name + INDICATOR_SUFFIX))
            self.outputs.append(col.name + INDICATOR_SUFFIX)
        return out


def _first_reason(checks: list[tuple[pl.Expr, str]]) -> pl.Expr | None:
    import polars as pl

    if not checks:
        return None
    expr = pl.when(checks[0][0]).then(pl.lit(checks[0][1]))
    for condition, reason in checks[1:]:
        expr = expr.when(condition).then(pl.lit(reason))
    return expr.otherwise(pl.lit(None, pl.String))
