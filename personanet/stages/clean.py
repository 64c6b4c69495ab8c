"""The clean stage: one `collect` artifact in, data a model may learn from out.

Every row that enters leaves in exactly one place, and the report says how many
went where:

    rows_in = rows_train + rows_test + duplicates_removed + rows_quarantined
              + rows_dropped_by_bounding

The steps, in order (docs/cleaning.md gives the reasons for each choice):

1. exact duplicates: a record identical to an earlier one in every column is counted
   and removed;
2. per-row rules (`prepare_rows`, shared with predict): parse each column into its
   declared type, trim and case-fold text, treat NaN/inf as missing, clip or
   quarantine values outside the public bounds (and datetimes after the data was
   collected), impute from public values only, pseudonymize identifiers;
3. quarantine: a row that breaks a rule whose policy is "quarantine" (or has no
   target, or no privacy unit, or an unknown split value) goes to the quarantine
   file with its first reason;
4. duplicates by key (default: the privacy unit), resolved by "first" or "newest";
5. contribution bounding: at most `max_rows_per_unit` rows per person;
6. split by privacy unit: a config column fixes it, or a keyed hash of the
   pseudonym and the seed does.

Only public knowledge (the config's bounds, domains and constants) shapes a value;
no statistic of the private rows is computed, so cleaning spends no privacy budget.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personanet.config import ROW_UNIT, ColumnConfig, Config
from personanet.errors import BadInputError, ConfigError, InternalError
from personanet.privacy.pseudonym import pseudonym_key, pseudonymize
from personanet.stages.base import StageResult, find_reusable, require_key
from personanet.stages.lineage import chain_input, clean_fingerprint
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    from rich.console import RenderableType

    from personanet.store.crypto import MasterKey

log = logging.getLogger("personanet")

RECORDS_FILE = "records.parquet.enc"
TRAIN_FILE = "train.parquet.enc"
TEST_FILE = "test.parquet.enc"
QUARANTINE_FILE = "quarantine.parquet.enc"

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
REASONS = (MISSING_PRIVACY_UNIT, INVALID_VALUE, OUT_OF_BOUNDS, IN_FUTURE, UNKNOWN_CATEGORY,
           MISSING_VALUE, MISSING_TARGET, INVALID_TARGET, UNKNOWN_TARGET, UNKNOWN_SPLIT_VALUE,
           SPLIT_CONFLICT)

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
_P = "__personanet."
ROW = f"{_P}row"
UNIT = f"{_P}unit"
REASON = f"{_P}reason"
REASON_COLUMN = f"{_P}reason_column"
IS_TEST = f"{_P}is_test"
POSITION = f"{_P}position"
UNIT_ID = f"{_P}unit_id"
# What a categorical spelling outside the domain maps to before the policy applies.
_UNKNOWN = "\x00unknown"
FLAG_KINDS = ("missing", "invalid", "clipped", "other", "imputed")


def _tmp(kind: str, column: str) -> str:
    return f"{_P}{kind}:{column}"


# ------------------------------------------------------------------------- report


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


@dataclass
class CleanReport:
    """The clean stage's figures: the manifest, `--json` and the summary table show these."""

    #: records in the collect artifact
    rows_in: int
    rows_train: int
    rows_test: int
    #: records identical to an earlier record in every column
    duplicates_exact: int
    #: records sharing the dedupe key with a record that was kept
    duplicates_by_key: int
    #: duplicates_exact + duplicates_by_key
    duplicates_removed: int
    #: records in the quarantine file (one reason each)
    rows_quarantined: int
    quarantined_by_reason: dict[str, int]
    #: the column that gave each quarantined record its reason
    quarantined_by_column: dict[str, int]
    #: records over max_rows_per_unit for their person
    rows_dropped_by_bounding: int
    #: distinct privacy units (people) on each side
    units_train: int
    units_test: int
    #: how the split was made: "column '<name>'" or "hash of the pseudonym (seed ..., ...)"
    split_by: str
    #: datetimes after this instant (when the data was collected) count as in the future
    as_of: str | None
    #: per column: values missing, invalid, clipped, mapped to "__other__", imputed
    columns: dict[str, ColumnCounts] = field(default_factory=dict)

    @property
    def rows_accounted(self) -> int:
        return (self.rows_train + self.rows_test + self.duplicates_removed
                + self.rows_quarantined + self.rows_dropped_by_bounding)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, figures: Mapping[str, Any]) -> CleanReport:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in figures.items() if k in names}
        values["columns"] = {name: ColumnCounts(**counts)
                             for name, counts in figures.get("columns", {}).items()}
        return cls(**values)


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


@dataclass(frozen=True)
class CleanOutcome:
    """What `clean_records` computed: the three tables and the report."""

    train: pl.DataFrame
    test: pl.DataFrame
    quarantine: pl.DataFrame
    report: CleanReport


# ------------------------------------------------------------------------- stage


def clean(config: Config, store: ArtifactStore, key: MasterKey, *,
          input_version: str | None = None, force: bool = False) -> StageResult:
    """Clean one collect artifact into encrypted train/test/quarantine tables.

    Args:
        config: the dataset's config; `columns` and `clean` say what every value may be.
        store: the artifact store of the dataset.
        key: the master key. It decrypts the collect artifact, encrypts the outputs, and
            (through `derive("pseudonym")`) keys the identifier pseudonyms.
        input_version: the collect version to read; default the one of the config's chain
            (its `dataset.source` collected with its columns), never merely the newest.
        force: recompute even when an identical clean artifact exists.

    Returns:
        The artifact written, or the identical one reused (`reused=True`); its figures
        are the `CleanReport` as a dict.

    Raises:
        BadInputError: the records are empty or lack a required column (exit 65).
        ConfigError: the config cannot be applied to cleaning (exit 78).
    """
    require_key(store, key)  # a root holds one master key: refuse another before any write
    source = (store.get("collect", input_version) if input_version
              else chain_input(config, store, "collect", reader="clean")[0])
    config_hash = config.section_hash("dataset", "columns", "clean")
    fp = clean_fingerprint(config, source.version)
    reused = find_reusable(store, "clean", fp, force=force)
    if reused is not None:
        log.info("clean: reusing %s (same collect input and config)", reused.version)
        return reused
    records = tables.read_artifact_table(source, RECORDS_FILE, key)
    # "In the future" means after the records were collected: a property of the input
    # artifact, so the same input always cleans the same way.
    as_of = _parse_instant(source.created_at) if source.created_at else None
    outcome = clean_records(records, config, pseudonym_key(key), as_of=as_of)
    del records
    with store.lock():
        if not force:
            # Another writer may have finished the same work while we computed.
            done = find_reusable(store, "clean", fp, force=False)
            if done is not None:
                return done
        with store.create("clean", fingerprint=fp, inputs=[source.as_input()],
                          config={"columns": config.section("columns"),
                                  "clean": config.section("clean")},
                          config_hash=config_hash, seed=config.clean.seed) as writer:
            for name, frame in ((TRAIN_FILE, outcome.train), (TEST_FILE, outcome.test),
                                (QUARANTINE_FILE, outcome.quarantine)):
                tables.write_encrypted_parquet(writer.path(name), frame, key)
                writer.add(name, rows=frame.height, encrypted=True, key_id=key.key_id)
            writer.figures = outcome.report.to_dict()
            artifact = writer.commit()
    report = outcome.report
    log.info(
        "clean %s: %d rows in -> %d train + %d test; %d duplicates, %d quarantined, "
        "%d dropped by bounding", artifact.version, report.rows_in, report.rows_train,
        report.rows_test, report.duplicates_removed, report.rows_quarantined,
        report.rows_dropped_by_bounding,
    )
    warnings = []
    if report.rows_train == 0 or report.rows_test == 0:
        warnings.append(
            f"clean left {report.rows_train} train and {report.rows_test} test rows: "
            "see quarantined_by_reason and the split settings"
        )
        log.warning(warnings[-1])
    return StageResult.of(artifact, reused=False, warnings=warnings)


def clean_records(records: pl.DataFrame, config: Config, pseudonym_key: bytes, *,
                  as_of: dt.datetime | None = None) -> CleanOutcome:
    """The whole clean computation on records in memory (no store, no files).

    Args:
        records: the source records, all columns text, in source order; the row
            number in the quarantine is the 0-based index here.
        config: columns and clean settings.
        pseudonym_key: HMAC key for identifiers (`pseudonym.pseudonym_key(master)`).
        as_of: when the records were collected; a datetime after it is impossible and
            handled like one outside its bounds. None: only the bounds apply.
    """
    import numpy as np
    import polars as pl

    _check_config(config)
    rows_in = records.height
    if rows_in == 0:
        raise BadInputError(
            "the collected records are empty (the source had only a header?): "
            "collect a source with at least one record"
        )
    cc = config.clean
    unit = config.dataset.privacy_unit
    dedupe_key = list(cc.dedupe_key or [unit])
    ts = cc.timestamp_column if cc.dedupe_keep == "newest" else None
    transform = _RowTransform(config, require_target=True, as_of=as_of,
                              extra=[ts] if ts else [], unit=unit)
    needed = transform.needed_columns() + [c for c in (cc.split_column, *dedupe_key) if c]
    if unit == ROW_UNIT:
        # Each row is a person: the unit is the record's 0-based position in the collect
        # artifact (stable: collect keeps the sources' order). Every unit is distinct, so
        # dedupe by it and contribution bounding rightly do nothing.
        records = records.with_row_index(ROW_UNIT).with_columns(pl.col(ROW_UNIT).cast(pl.String))
    raw = _check_columns(records, config, needed, optional=transform.optional_columns())
    source_columns = raw.columns
    raw = raw.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.UInt64))

    # Text forms of the dedupe key (identifiers use their pseudonym instead) and the split.
    hashed = {c for c in dedupe_key if c == ROW_UNIT or config.columns[c].role == "identifier"}
    keys = [c if c in hashed else _tmp("key", c) for c in dedupe_key]
    helpers = [_text(pl.col(c), config.columns[c].case).alias(_tmp("key", c))
               for c in dedupe_key if c not in hashed]
    last_checks = []
    if cc.split_column is not None:
        case = config.columns[cc.split_column].case
        train_value, test_value = (_fold_text(v, case)
                                   for v in (cc.split_train_value, cc.split_test_value))
        split_text = _text(pl.col(cc.split_column), case)
        helpers.append((split_text == test_value).fill_null(False).alias(IS_TEST))
        last_checks.append((cc.split_column, pl.when(
            ~split_text.is_in([train_value, test_value]).fill_null(False)
        ).then(pl.lit(UNKNOWN_SPLIT_VALUE))))
    transform.last_checks = last_checks
    transform.first_exprs = helpers
    key_columns = [UNIT_ID if k == unit else k for k in dict.fromkeys(keys)]
    decision_columns = [c for c in key_columns if c != UNIT_ID]
    decision_columns += [IS_TEST] if cc.split_column is not None else []
    decision_columns += [_tmp("bounded", ts)] if ts else []
    prepared = _evaluate(transform, raw, pseudonym_key,
                         keep=[c for c in decision_columns if c not in transform.hashed_names()])
    unit_ids = _group_ids(prepared[UNIT]).alias(UNIT_ID)
    # Identical records share their privacy unit, so only rows whose unit repeats
    # (or is missing) need the full comparison.
    repeats = _exact_duplicates(raw[source_columns], unit_ids.is_duplicated())
    del raw
    duplicates_exact = int(repeats.sum())
    has_reason = prepared[REASON].is_not_null()
    quarantined = [_quarantine_rows(prepared[[ROW, REASON, REASON_COLUMN]]
                                    .filter(has_reason & ~repeats))]

    # Who goes where is decided on a narrow frame of integer keys; the wide frame is
    # filtered once per output at the end.
    kept = pl.DataFrame([
        prepared[ROW], unit_ids, pl.Series(POSITION, range(prepared.height), dtype=pl.UInt32),
        *(prepared[c] for c in decision_columns),
    ]).filter(~(has_reason | repeats))

    # Duplicates by key, then contribution bounding, in one preference order: newest
    # first (by the timestamp column) or source order; ties by row number (the sort is
    # stable and `kept` is in row order).
    if ts:
        kept = kept.sort(_tmp("bounded", ts), descending=True, nulls_last=True,
                         maintain_order=True)
    before = kept.height
    distinct = (pl.col(key_columns[0]) if len(key_columns) == 1
                else pl.struct(key_columns)).is_first_distinct()
    kept = kept.filter(distinct)
    duplicates_by_key = before - kept.height
    before = kept.height
    if kept[UNIT_ID].n_unique() < kept.height:
        kept = kept.filter(pl.int_range(pl.len()).over(UNIT_ID) < cc.max_rows_per_unit)
    dropped_by_bounding = before - kept.height

    # Split by person.
    if cc.split_column is not None:
        split_by = f"column {cc.split_column!r}"
        if cc.max_rows_per_unit > 1:
            # The column could put one person's rows on both sides: the person's
            # preferred row decides, and rows that disagree are quarantined.
            conflict = pl.col(IS_TEST) != pl.col(IS_TEST).first().over(UNIT_ID)
            quarantined.append(_quarantine_rows(kept.filter(conflict).with_columns(
                pl.lit(SPLIT_CONFLICT).alias(REASON),
                pl.lit(cc.split_column).alias(REASON_COLUMN),
            )))
            kept = kept.filter(~conflict)
    else:
        split_by = f"hash of the pseudonym (seed {cc.seed}, test_fraction {cc.test_fraction:g})"
        units_kept = prepared[UNIT].gather(kept[POSITION])
        kept = kept.with_columns(
            hash_split(units_kept, seed=cc.seed, test_fraction=cc.test_fraction).alias(IS_TEST)
        )

    sides, units = {}, {}
    for name, is_test in (("train", False), ("test", True)):
        side = kept.filter(pl.col(IS_TEST) == is_test)
        mask = np.zeros(prepared.height, dtype=bool)
        mask[side[POSITION].to_numpy()] = True
        sides[name] = pl.Series(mask)
        units[name] = side[UNIT_ID].n_unique()
    outputs = transform.output_columns()
    # (Indexing picks columns without a query plan; `select` would run one.)
    train = prepared[outputs].filter(sides["train"])
    test = prepared[outputs].filter(sides["test"])
    quarantine = pl.concat(quarantined).sort("row")
    by_reason = quarantine.group_by("reason").len()
    by_column = quarantine.group_by("column").len().drop_nulls("column")
    report = CleanReport(
        rows_in=rows_in,
        rows_train=train.height,
        rows_test=test.height,
        duplicates_exact=duplicates_exact,
        duplicates_by_key=duplicates_by_key,
        duplicates_removed=duplicates_exact + duplicates_by_key,
        rows_quarantined=quarantine.height,
        quarantined_by_reason=_sorted_counts(by_reason["reason"], by_reason["len"]),
        quarantined_by_column=_sorted_counts(by_column["column"], by_column["len"]),
        rows_dropped_by_bounding=dropped_by_bounding,
        units_train=units["train"],
        units_test=units["test"],
        split_by=split_by,
        as_of=_format_instant(as_of) if as_of else None,
        columns=transform.counters(prepared, sides["train"] | sides["test"]),
    )
    if report.rows_accounted != rows_in:
        raise InternalError(
            f"clean lost track of rows: {rows_in} in, {report.rows_accounted} accounted for"
        )
    return CleanOutcome(train=train, test=test, quarantine=quarantine, report=report)


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

    _check_config(config)
    raw = frame.collect() if isinstance(frame, pl.LazyFrame) else frame
    transform = _RowTransform(config, require_target=require_target, as_of=as_of)
    raw = _check_columns(raw, config, transform.needed_columns(),
                         optional=transform.optional_columns())
    transform.resolve_target(raw.columns)
    raw = raw.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.UInt64))
    prepared = _evaluate(transform, raw, pseudonym_key)
    kept = pl.Series(prepared[REASON].is_null())
    return PreparedRows(
        frame=prepared[transform.output_columns()].filter(kept),
        rows=prepared.filter(kept)[ROW].alias("row"),
        quarantine=_quarantine_rows(prepared.filter(~kept)),
        counters=transform.counters(prepared, kept),
    )


def hash_split(units: pl.Series, *, seed: int, test_fraction: float) -> pl.Series:
    """True for the privacy units that go to test: deterministic in pseudonym and seed.

    The pseudonym is already a keyed pseudo-random value, so 60 of its bits mixed with
    the seed by SplitMix64 give a uniform number u in [0, 1); u < test_fraction is test.
    A person's rows share a pseudonym, so they always land on the same side, and the
    side depends on no other record.
    """
    import numpy as np
    import polars as pl

    bits = units.str.slice(0, 15).str.to_integer(base=16, strict=True).cast(pl.UInt64)
    mixed = _splitmix64(bits.to_numpy() ^ _splitmix64(np.array([seed % 2**64], np.uint64))[0])
    threshold = np.uint64(min(int(test_fraction * 2.0**64), 2**64 - 1))
    return pl.Series(units.name, mixed < threshold, dtype=pl.Boolean)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    import numpy as np

    # uint64 arithmetic wraps modulo 2**64, which is what the mixer wants.
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _group_ids(values: pl.Series) -> pl.Series:
    """A UInt64 per value, equal exactly when the values are equal (nulls: one id).

    Grouping 32-character pseudonyms is several times slower than grouping integers.
    A 64-bit hash is used after checking, among the values whose hash repeats, that
    no two different values share one; otherwise the exact dense rank.
    """
    import polars as pl

    hashed = values.hash(seed=0)
    repeated = hashed.is_duplicated()
    if values.filter(repeated).n_unique() == hashed.filter(repeated).n_unique():
        return hashed
    return values.rank("dense").cast(pl.UInt64)


def _exact_duplicates(frame: pl.DataFrame, suspects: pl.Series) -> pl.Series:
    """True for each record identical (every column) to an earlier one.

    `suspects` must include every row that has an identical twin; the full comparison
    runs on those rows only.
    """
    import numpy as np
    import polars as pl

    columns = frame.columns
    repeats = np.zeros(frame.height, dtype=bool)
    if suspects.any():
        positions = suspects.arg_true()
        first = frame[positions].select(pl.struct(columns).is_first_distinct()).to_series()
        repeats[positions.filter(~first).to_numpy()] = True
    return pl.Series(repeats)


# ------------------------------------------------------------------------- the per-row rules


def _evaluate(transform: _RowTransform, raw: pl.DataFrame, key: bytes, *,
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


class _RowTransform:
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

        names = [_tmp(kind, col) for col, kind in self.flags]
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
            blank = _tmp("blank", self.unit)
            stages[0].append(
                _text(pl.col(self.unit), self._unit_case()).is_null()
                .alias(blank)
            )
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
            rule = _ColumnRule(col, self, raw[col.name],
                               None if spellings is None else pl.Series(spellings, dtype=pl.String))
            for stage, exprs in zip(stages, rule.stages(), strict=True):
                stage.extend(exprs)
            if rule.reason is not None:
                stages[3].append(rule.reason.alias(_tmp("reason", col.name)))
                reasons.append((col.name, pl.col(_tmp("reason", col.name))))
            outputs += rule.outputs
            self.flags += rule.flags
        reasons += self.last_checks

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
        flags = [_tmp(kind, col) for col, kind in self.flags]
        columns = [ROW, REASON, REASON_COLUMN, *outputs, *flags, *keep]
        return frame.select(list(dict.fromkeys(columns)))


class _ColumnRule:
    """One column's rule as four stages of expressions (parse, value, bounds, outcome).

    Attributes after construction: `reason` (first quarantine reason of the row for
    this column, or null), `outputs` (the output column names it makes, identifiers
    excluded: they come from `pseudonyms`), `flags` ((column, kind) counters).
    """

    def __init__(self, col: ColumnConfig, transform: _RowTransform, raw: pl.Series,
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
        return _tmp(kind, self.col.name)

    def stages(self) -> list[list[pl.Expr]]:
        if self.col.role == "identifier":
            return self._identifier()
        if self.col.kind == "categorical":
            return self._categorical()
        return self._number_or_datetime()

    def _identifier(self) -> list[list[pl.Expr]]:
        import polars as pl

        self.flags.append((self.col.name, "missing"))
        return [[_text(pl.col(self.col.name), self.col.case).is_null().alias(self.t("missing"))],
                [], [], []]

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
                parse = [text.cast(pl.Float64, strict=False).alias(t("parsed")),
                         (text.str.len_bytes() == 0).fill_null(True).alias(t("blank"))]
            parsed = pl.col(t("parsed"))
            # NaN and infinities are missing values, not numbers to clip.
            value = [
                pl.when(parsed.is_finite()).then(parsed).alias(t("value")),
                (pl.col(t("blank")) | ~parsed.is_finite().fill_null(True)).alias(t("missing")),
                (~pl.col(t("blank")) & parsed.is_null()).alias(t("invalid")),
            ]
        else:
            parse = [_datetime_expr(pl.col(name), self.raw).alias(t("parsed")),
                     (text.str.len_bytes() == 0).fill_null(True).alias(t("blank"))]
            parsed = pl.col(t("parsed"))
            value = [
                parsed.alias(t("value")),
                pl.col(t("blank")).alias(t("missing")),
                (~pl.col(t("blank")) & parsed.is_null()).alias(t("invalid")),
            ]
        self.flags += [(name, "missing"), (name, "invalid"), (name, "clipped")]

        v = pl.col(t("value"))
        lo, hi = _bounds(col)
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
        domain = {_fold_text(c, col.case): c for c in col.categories or ()}
        spellings = self.spellings if self.spellings is not None else \
            self.raw.cast(pl.String).drop_nulls().unique()
        matched = []
        for spelling in spellings.to_list():
            folded = _fold_text(spelling, col.case)
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
        filler = _impute_value(col)
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


# ------------------------------------------------------------------------- helpers


def _check_config(config: Config) -> None:
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
            filler = _impute_value(col)
            lo, hi = _bounds(col)
            if filler is not None and lo is not None and not lo <= filler <= hi:
                raise ConfigError(f"columns.{col.name}.impute = {col.impute!r} is outside its "
                                  f"bounds {list(col.bounds or ())}: pick a value within them")


def _check_columns(records: pl.DataFrame, config: Config, needed: Iterable[str], *,
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


def _text(expr: pl.Expr, case: str) -> pl.Expr:
    """Trimmed text, case-folded as configured; blank is null."""
    import polars as pl

    text = expr.cast(pl.String).str.strip_chars()
    if case == "lower":
        text = text.str.to_lowercase()
    elif case == "upper":
        text = text.str.to_uppercase()
    return pl.when(text.str.len_bytes() > 0).then(text)


def _fold_text(value: str, case: str) -> str:
    text = unicodedata.normalize("NFC", value.strip())
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    return text


def _datetime_expr(expr: pl.Expr, raw: pl.Series) -> pl.Expr:
    """Datetime(us, UTC) from text in DATETIME_FORMATS, or from a temporal column."""
    import polars as pl

    target = pl.Datetime("us", "UTC")
    if isinstance(raw.dtype, pl.Datetime):
        moment = expr.dt.convert_time_zone("UTC") if raw.dtype.time_zone else \
            expr.dt.replace_time_zone("UTC")
        return moment.cast(target)
    if raw.dtype == pl.Date:
        return expr.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    text = expr.cast(pl.String).str.strip_chars()
    return pl.coalesce([
        text.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        for fmt in _formats_in_use(raw)
    ])


def _formats_in_use(raw: pl.Series) -> list[str]:
    """The DATETIME_FORMATS that parse at least one value not parsed by an earlier one.

    Usually one format parses everything; trying the others on every row would
    cost a full parse each for nothing.
    """
    import polars as pl

    text = raw.cast(pl.String).str.strip_chars()
    left = text.filter(text.str.len_bytes() > 0)
    used = []
    for fmt in DATETIME_FORMATS:
        if left.is_empty():
            break
        parsed = left.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        ok = parsed.is_not_null()
        if ok.any():
            used.append(fmt)
            left = left.filter(~ok)
    return used or [DATETIME_FORMATS[0]]


def _bounds(col: ColumnConfig) -> tuple[Any, Any]:
    if col.bounds is None:
        return None, None
    if col.kind == "datetime":
        return _parse_instant(col.bounds[0]), _parse_instant(col.bounds[1])
    return float(col.bounds[0]), float(col.bounds[1])


def _impute_value(col: ColumnConfig) -> Any:
    """The public value that fills a missing one, or None (rule "none" or "drop")."""
    rule = col.impute_rule
    if rule in ("none", "drop"):
        return None
    if rule == "missing":
        return MISSING
    if rule == "midpoint":
        lo, hi = _bounds(col)
        if lo is None:
            return None
        if col.kind == "datetime":
            return (lo + (hi - lo) / 2).replace(microsecond=0)
        return (lo + hi) / 2
    if col.kind == "datetime":
        return _parse_instant(str(rule))
    if col.kind == "numeric":
        return float(rule)
    return str(rule)


def _first_reason(checks: list[tuple[pl.Expr, str]]) -> pl.Expr | None:
    import polars as pl

    if not checks:
        return None
    expr = pl.when(checks[0][0]).then(pl.lit(checks[0][1]))
    for condition, reason in checks[1:]:
        expr = expr.when(condition).then(pl.lit(reason))
    return expr.otherwise(pl.lit(None, pl.String))


def _quarantine_rows(frame: pl.DataFrame) -> pl.DataFrame:
    import polars as pl

    return frame.select(
        pl.col(ROW).cast(pl.UInt64).alias("row"),
        pl.col(REASON_COLUMN).cast(pl.String).alias("column"),
        pl.col(REASON).cast(pl.String).alias("reason"),
    )


def _sorted_counts(keys: pl.Series, counts: pl.Series) -> dict[str, int]:
    return dict(sorted((str(k), int(n)) for k, n in zip(keys, counts, strict=True)))


def _parse_instant(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _format_instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------- rendering


def render_report(report: CleanReport | Mapping[str, Any]) -> RenderableType:
    """The report as rich tables (the CLI prints it on stderr; nothing here prints)."""
    from rich.console import Group
    from rich.table import Table

    if not isinstance(report, CleanReport):
        report = CleanReport.from_dict(report)
    summary = Table(title="clean", show_header=False, title_justify="left")
    summary.add_column("what")
    summary.add_column("rows", justify="right")
    summary.add_row("rows in", f"{report.rows_in:,}")
    summary.add_row("train", f"{report.rows_train:,} ({report.units_train:,} people)")
    summary.add_row("test", f"{report.rows_test:,} ({report.units_test:,} people)")
    summary.add_row("duplicates (exact)", f"{report.duplicates_exact:,}")
    summary.add_row("duplicates (by key)", f"{report.duplicates_by_key:,}")
    summary.add_row("quarantined", f"{report.rows_quarantined:,}")
    for reason, count in report.quarantined_by_reason.items():
        summary.add_row(f"  {reason}", f"{count:,}")
    summary.add_row("dropped by bounding", f"{report.rows_dropped_by_bounding:,}")
    summary.add_row("split", report.split_by)

    columns = Table(title="values per column (train + test)", title_justify="left")
    columns.add_column("column")
    for kind in (*FLAG_KINDS, "quarantined"):
        columns.add_column(kind, justify="right")
    for name, counts in report.columns.items():
        figures = [getattr(counts, k) for k in FLAG_KINDS]
        figures.append(report.quarantined_by_column.get(name, 0))
        columns.add_row(name, *(f"{n:,}" if n else "-" for n in figures))
    return Group(summary, columns)
