"""Row rules: clean's per-row rules applied to a whole frame of records.

`prepare_rows` is what predict applies to new records and what the clean stage
builds on: every configured column's rule (`personanet.cleaning.columns`) in one
lazy polars plan, run while the identifiers are pseudonymized, giving per row its
typed values, its first quarantine reason and the flags the report counts. A row
here is judged alone; what needs the other rows (duplicates, contribution
bounding, the split) is the clean stage's business (`personanet.stages.clean`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from personanet.cleaning.columns import ColumnRule
from personanet.cleaning.values import (
    INDICATOR_SUFFIX,
    MISSING_PRIVACY_UNIT,
    REASON,
    REASON_COLUMN,
    ROW,
    UNIT,
    check_config,
    normalized_text,
    work_column,
)
from personanet.config import ColumnConfig, Config
from personanet.errors import BadInputError
from personanet.privacy.pseudonym import pseudonymize

if TYPE_CHECKING:
    import polars as pl


@dataclass
class ColumnCounts:
    """What happened to one column's values, counted over the rows that reached train or test."""

    #: absent in the source: null, empty or blank text, NaN or infinite
    missing: int = 0
    #: present but unparseable (a non-number, an impossible date), then treated as missing
    invalid: int = 0
    #: outside the public bounds (or after collection), moved to the nearest bound
    clipped: int = 0
    #: categories outside the declared domain, now "__other__"
    other: int = 0
    #: missing or invalid values replaced by the column's impute rule
    imputed: int = 0


@dataclass(frozen=True)
class PreparedRows:
    """Records after the per-row rules of `prepare_rows`.

    Attributes:
        frame: the rows a model may see, in the output schema (identifiers as
            pseudonyms, typed features, target), in input order.
        rows: the 0-based input row number of each row of `frame` (UInt64).
        quarantine: the rows refused, as (row, column, reason); no record values.
        counters: per column, values missing, invalid, clipped, "__other__", imputed
            among the rows of `frame`.
    """

    frame: pl.DataFrame
    rows: pl.Series
    quarantine: pl.DataFrame
    counters: dict[str, ColumnCounts]


def prepare_rows(frame: pl.DataFrame | pl.LazyFrame, config: Config, pseudonym_key: bytes, *,
                 require_target: bool, as_of: dt.datetime | None = None) -> PreparedRows:
    """Apply clean's per-row rules to records, e.g. new records that predict scores.

    Types, trimming and case, NaN/inf as missing, public bounds, imputation from
    public values and pseudonymization, exactly as `clean` does; no dedupe, no
    contribution bounding, no split.

    Args:
        frame: raw records (text columns, or already typed ones), named as in the config.
        config: the config the model was trained with.
        pseudonym_key: HMAC key for identifiers; the same key as at clean gives the same
            pseudonyms, so a person scored later can be matched to the training data by
            whoever holds the key, and by no one else.
        require_target: True: a row without a valid target is quarantined and the target
            column must exist. False: the target may be absent, or missing per row (null).
        as_of: datetimes after this instant are impossible (clip or quarantine, as for
            bounds); None: only the bounds apply.

    Raises:
        BadInputError: a required column is absent (exit 65).
    """
    import polars as pl

    check_config(config)
    raw = frame.collect() if isinstance(frame, pl.LazyFrame) else frame
    transform = RowTransform(config, require_target=require_target, as_of=as_of)
    raw = check_columns(raw, config, transform.needed_columns(),
                        optional=transform.optional_columns())
    transform.resolve_target(raw.columns)
    raw = raw.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.UInt64))
    prepared = evaluate_rules(transform, raw, pseudonym_key)
    kept = pl.Series(prepared[REASON].is_null())
    return PreparedRows(
        frame=prepared[transform.output_columns()].filter(kept),
        rows=prepared.filter(kept)[ROW].alias("row"),
        quarantine=quarantine_rows(prepared.filter(~kept)),
        counters=transform.counters(prepared, kept),
    )


def evaluate_rules(transform: RowTransform, raw: pl.DataFrame, key: bytes, *,
                   keep: Sequence[str] = ()) -> pl.DataFrame:
    """Run the per-row rules: polars' lazy plan and the HMAC loop at the same time.

    The HMAC loop is Python and holds the GIL; polars releases it while it runs its
    plan on its own threads, so with cores to spare the two overlap instead of adding
    up (on 2 cores, both already busy, it measured neither faster nor slower). The
    plan is built first: building it makes many short polars calls, each of which
    would wait for the GIL behind the HMAC loop.
    """
    from concurrent.futures import ThreadPoolExecutor

    plan = transform.plan(raw, keep=keep)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="personanet-hmac") as pool:
        hashed = pool.submit(transform.pseudonyms, raw, key)
        frame = plan.collect()
        return frame.with_columns(hashed.result())


class RowTransform:
    """The per-row rules of one config, as a lazy polars plan plus the pseudonyms.

    `plan` leaves, per row: ROW, the first quarantine reason and its column, each
    non-identifier output column (typed, bounded, imputed), `<col>__missing` where
    asked, 0/1 flag columns for the counters, and the pre-imputation value of `extra`
    columns. `pseudonyms` gives the identifier columns (and UNIT, the privacy unit's
    pseudonym, when `unit` is set).
    """

    def __init__(self, config: Config, *, require_target: bool, as_of: dt.datetime | None,
                 extra: Sequence[str] = (), unit: str | None = None) -> None:
        self.config = config
        self.require_target = require_target
        self.as_of = as_of
        self.unit = unit
        self.has_target = True
        #: (column, reason-or-null expression) checked after every column rule
        self.last_checks: list[tuple[str, pl.Expr]] = []
        #: more expressions for the plan's first stage (the caller's helper columns)
        self.first_exprs: list[pl.Expr] = []
        wanted = {c.name for c in config.columns.values()
                  if c.role in ("identifier", "feature", "target")} | set(extra)
        self.columns = [c for c in config.columns.values() if c.name in wanted]
        self.flags: list[tuple[str, str]] = []

    def needed_columns(self) -> list[str]:
        names = [c.name for c in self.columns]
        return names + ([self.unit] if self.unit and self.unit not in names else [])

    def optional_columns(self) -> set[str]:
        # The target is never optional where rows need one.
        optional = {c.name for c in self.columns if not c.required and c.role != "target"}
        if not self.require_target:
            optional.add(self.config.dataset.target)
        return optional

    def resolve_target(self, present: Iterable[str]) -> None:
        """Without require_target, a source lacking the target column simply has none."""
        if not self.require_target and self.config.dataset.target not in set(present):
            self.has_target = False

    def _active(self) -> list[ColumnConfig]:
        return [c for c in self.columns if c.role != "target" or self.has_target]

    def output_columns(self) -> list[str]:
        names = []
        for col in self._active():
            if col.role not in ("identifier", "feature", "target"):
                continue
            names.append(col.name)
            if col.role == "feature" and col.missing_indicator:
                names.append(col.name + INDICATOR_SUFFIX)
        return names

    def hashed_names(self) -> list[str]:
        names = [c.name for c in self._active() if c.role == "identifier"]
        return names + ([UNIT] if self.unit else [])

    def pseudonyms(self, raw: pl.DataFrame, key: bytes) -> list[pl.Series]:
        """Identifier columns as pseudonyms (and UNIT for the privacy unit)."""
        out = []
        for col in self._active():
            if col.role == "identifier":
                out.append(pseudonymize(raw[col.name], key=key, column=col.name, case=col.case))
        if self.unit:
            done = {s.name: s for s in out}
            series = done.get(self.unit)
            if series is None:
                series = pseudonymize(raw[self.unit], key=key, column=self.unit,
                                      case=self._unit_case())
            out.append(series.alias(UNIT))
        return out

    def _unit_case(self) -> str:
        # The generated row unit (ROW_UNIT) is digits: no case to fold.
        unit = self.config.columns.get(self.unit or "")
        return unit.case if unit is not None else "none"

    def counters(self, prepared: pl.DataFrame, kept: pl.Series) -> dict[str, ColumnCounts]:
        """Flag totals over the rows where `kept` is true."""
        import polars as pl

        names = [work_column(kind, col) for col, kind in self.flags]
        mask = pl.lit(kept)
        sums = (prepared.select((pl.col(n) & mask).sum() for n in names).row(0)
                if names else ())
        out = {c.name: ColumnCounts() for c in self._active()}
        for (col, kind), total in zip(self.flags, sums, strict=True):
            setattr(out[col], kind, int(total or 0))
        return out

    def plan(self, raw: pl.DataFrame, *, keep: Sequence[str] = ()) -> pl.LazyFrame:
        """The rules as one lazy plan over `raw`, in explicit stages so nothing runs twice."""
        import polars as pl

        self.flags = []
        stages: list[list[pl.Expr]] = [list(self.first_exprs), [], [], []]
        reasons: list[tuple[str, pl.Expr]] = []
        outputs: list[str] = []
        if self.unit is not None:
            blank = work_column("blank", self.unit)
            # Case folding never makes a non-blank value blank: no fold needed here.
            stages[0].append(normalized_text(pl.col(self.unit), "none").is_null().alias(blank))
            reasons.append((self.unit, pl.when(pl.col(blank))
                            .then(pl.lit(MISSING_PRIVACY_UNIT))))
        categorical = [c.name for c in self._active()
                       if c.role != "identifier" and c.kind == "categorical"]
        # One parallel pass for the distinct spellings of every categorical column.
        distinct = raw.select(
            pl.col(c).cast(pl.String).drop_nulls().unique().implode() for c in categorical
        ).row(0, named=True) if categorical else {}
        for col in self._active():
            spellings = distinct.get(col.name)
            rule = ColumnRule(col, self, raw[col.name],
                              None if spellings is None else pl.Series(spellings, dtype=pl.String))
            for stage, exprs in zip(stages, rule.stages(), strict=True):
                stage.extend(exprs)
            if rule.reason is not None:
                stages[3].append(rule.reason.alias(work_column("reason", col.name)))
                reasons.append((col.name, pl.col(work_column("reason", col.name))))
            outputs += rule.outputs
            self.flags += rule.flags
        reasons += self.last_checks

        images = [c for c in self._active() if c.kind == "image"]
        if images:
            from personanet.cleaning.images import decoded_columns

            raw = raw.with_columns(decoded_columns(raw, images))
        frame = raw.lazy()
        for exprs in stages:
            if exprs:
                frame = frame.with_columns(exprs)
        if reasons:
            frame = frame.with_columns(
                pl.coalesce([r for _, r in reasons]).alias(REASON),
                pl.coalesce([pl.when(r.is_not_null()).then(pl.lit(name))
                             for name, r in reasons]).alias(REASON_COLUMN),
            )
        else:
            frame = frame.with_columns(pl.lit(None, pl.String).alias(REASON),
                                       pl.lit(None, pl.String).alias(REASON_COLUMN))
        flags = [work_column(kind, col) for col, kind in self.flags]
        columns = [ROW, REASON, REASON_COLUMN, *outputs, *flags, *keep]
        return frame.select(list(dict.fromkeys(columns)))


def check_columns(records: pl.DataFrame, config: Config, needed: Iterable[str], *,
                  optional: set[str]) -> pl.DataFrame:
    """The records with every needed column (optional ones added as nulls); exit 65 if not."""
    import polars as pl

    present = set(records.columns)
    wanted = list(dict.fromkeys(needed))
    lacking = [c for c in wanted if c not in present and c not in optional]
    if lacking:
        hint = "add them to the source, or set required = false for optional columns"
        if len(records.columns) == 1:
            header = records.columns[0]
            for sep, label in ((";", "';'"), ("\t", "tab"), ("|", "'|'")):
                if sep in header:
                    hint = (f"the file looks {label}-separated: set [source] delimiter in the "
                            "config and collect again")
                    break
        shown = ", ".join(repr(c) for c in lacking[:5]) + (" ..." if len(lacking) > 5 else "")
        raise BadInputError(f"the records lack required column(s) {shown}: {hint}")
    absent = [c for c in wanted if c not in present and c != config.dataset.target]
    if absent:
        records = records.with_columns(pl.lit(None, pl.String).alias(c) for c in absent)
    return records


def quarantine_rows(frame: pl.DataFrame) -> pl.DataFrame:
    import polars as pl

    return frame.select(
        pl.col(ROW).cast(pl.UInt64).alias("row"),
        pl.col(REASON_COLUMN).cast(pl.String).alias("column"),
        pl.col(REASON).cast(pl.String).alias("reason"),
    )
