"""The clean stage: one `collect` artifact in, data a model may learn from out.

Every row that enters leaves in exactly one place, and the report says how many
went where:

    rows_in = rows_train + rows_test + duplicates_removed + rows_quarantined
              + rows_dropped_by_bounding

The steps, in order (docs/cleaning.md gives the reasons for each choice):

1. exact duplicates: a record identical to an earlier one in every column is counted
   and removed;
2. per-row rules (`personanet.cleaning`, which predict applies too): parse each
   column into its declared type, trim and case-fold text, treat NaN/inf as missing,
   clip or quarantine values outside the public bounds (and datetimes after the data
   was collected), impute from public values only, pseudonymize identifiers;
3. quarantine: a row that breaks a rule whose policy is "quarantine" (or has no
   target, or no privacy unit, or an unknown split value) goes to the quarantine
   file with its first reason;
4. duplicates by key (default: the privacy unit), resolved by "first" or "newest";
5. contribution bounding: at most `max_rows_per_unit` rows per person;
6. split by privacy unit: a config column fixes it, or a keyed hash of the
   pseudonym and the seed does.

Only public knowledge (the config's bounds, domains and constants) shapes a value;
no statistic of the private rows is computed, so cleaning spends no privacy budget.

This module is the stage and its set-level steps (1, 3 to 6: a row judged against
the other rows); a row judged alone is `personanet.cleaning`'s, a library apart from
the stages so that predict applies the same rules without importing this stage. The
terminal view of the report is `personanet.reporting.clean_view`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personanet.cleaning.rows import (
    ColumnCounts,
    RowTransform,
    check_columns,
    evaluate_rules,
    quarantine_rows,
)
from personanet.cleaning.values import (
    INTERNAL_PREFIX,
    REASON,
    REASON_COLUMN,
    ROW,
    SPLIT_CONFLICT,
    UNIT,
    UNKNOWN_SPLIT_VALUE,
    check_config,
    fold_text,
    format_instant,
    normalized_text,
    parse_instant,
    work_column,
)
from personanet.config import ROW_UNIT, Config
from personanet.errors import BadInputError, InternalError
from personanet.privacy.pseudonym import pseudonym_key
from personanet.stages.base import StagePlan, StageResult, run_stage
from personanet.stages.files import QUARANTINE, RECORDS, TEST_TABLE, TRAIN_TABLE
from personanet.stages.lineage import chain_input, clean_fingerprint
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from personanet.store.artifacts import ArtifactWriter
    from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")

# Columns of the set-level decisions (who is a duplicate, who goes to test).
IS_TEST = f"{INTERNAL_PREFIX}is_test"
POSITION = f"{INTERNAL_PREFIX}position"
UNIT_ID = f"{INTERNAL_PREFIX}unit_id"


# ------------------------------------------------------------------------- report


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
    def plan() -> StagePlan:
        source = (store.get("collect", input_version) if input_version
                  else chain_input(config, store, "collect", reader="clean")[0])
        warnings: list[str] = []

        def write(writer: ArtifactWriter) -> None:
            records = tables.read_artifact_table(source, RECORDS, key)
            # "In the future" means after the records were collected: a property of the
            # input artifact, so the same input always cleans the same way.
            as_of = parse_instant(source.created_at) if source.created_at else None
            outcome = clean_records(records, config, pseudonym_key(key), as_of=as_of)
            del records
            for name, frame in ((TRAIN_TABLE, outcome.train), (TEST_TABLE, outcome.test),
                                (QUARANTINE, outcome.quarantine)):
                tables.write_encrypted_parquet(writer.path(name), frame, key)
                writer.add(name, rows=frame.height, encrypted=True, key_id=key.key_id)
            writer.figures = outcome.report.to_dict()
            warnings.extend(_warnings(outcome.report))

        return StagePlan("clean", clean_fingerprint(config, source.version),
                         inputs=[source.as_input()],
                         config={"columns": config.section("columns"),
                                 "clean": config.section("clean")},
                         config_hash=config.section_hash("dataset", "columns", "clean"),
                         write=write, seed=config.clean.seed, warnings=warnings)

    result = run_stage(store, key, plan, force=force)
    if not result.reused:
        report = CleanReport.from_dict(result.figures)
        log.info(
            "clean %s: %d rows in -> %d train + %d test; %d duplicates, %d quarantined, "
            "%d dropped by bounding", result.version, report.rows_in, report.rows_train,
            report.rows_test, report.duplicates_removed, report.rows_quarantined,
            report.rows_dropped_by_bounding,
        )
    return result


def _warnings(report: CleanReport) -> list[str]:
    """What the user must hear about a new clean artifact (said once, when it is made)."""
    if report.rows_train > 0 and report.rows_test > 0:
        return []
    warning = (f"clean left {report.rows_train} train and {report.rows_test} test rows: "
               "see quarantined_by_reason and the split settings")
    log.warning(warning)
    return [warning]


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

    check_config(config)
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
    transform = RowTransform(config, require_target=True, as_of=as_of,
                             extra=[ts] if ts else [], unit=unit)
    needed = transform.needed_columns() + [c for c in (cc.split_column, *dedupe_key) if c]
    if unit == ROW_UNIT:
        # Each row is a person: the unit is the record's 0-based position in the collect
        # artifact (stable: collect keeps the sources' order). Every unit is distinct, so
        # dedupe by it and contribution bounding rightly do nothing.
        records = records.with_row_index(ROW_UNIT).with_columns(pl.col(ROW_UNIT).cast(pl.String))
    raw = check_columns(records, config, needed, optional=transform.optional_columns())
    source_columns = raw.columns
    raw = raw.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.UInt64))

    # Text forms of the dedupe key (identifiers use their pseudonym instead) and the split.
    hashed = {c for c in dedupe_key if c == ROW_UNIT or config.columns[c].role == "identifier"}
    keys = [c if c in hashed else work_column("key", c) for c in dedupe_key]
    helpers = [normalized_text(pl.col(c), config.columns[c].case).alias(work_column("key", c))
               for c in dedupe_key if c not in hashed]
    last_checks = []
    if cc.split_column is not None:
        case = config.columns[cc.split_column].case
        train_value, test_value = (fold_text(v, case)
                                   for v in (cc.split_train_value, cc.split_test_value))
        split_text = normalized_text(pl.col(cc.split_column), case)
        helpers.append((split_text == test_value).fill_null(False).alias(IS_TEST))
        last_checks.append((cc.split_column, pl.when(
            ~split_text.is_in([train_value, test_value]).fill_null(False)
        ).then(pl.lit(UNKNOWN_SPLIT_VALUE))))
    transform.last_checks = last_checks
    transform.first_exprs = helpers
    key_columns = [UNIT_ID if k == unit else k for k in dict.fromkeys(keys)]
    decision_columns = [c for c in key_columns if c != UNIT_ID]
    decision_columns += [IS_TEST] if cc.split_column is not None else []
    decision_columns += [work_column("bounded", ts)] if ts else []
    hashed_names = transform.hashed_names()
    prepared = evaluate_rules(transform, raw, pseudonym_key,
                              keep=[c for c in decision_columns if c not in hashed_names])
    unit_ids = _group_ids(prepared[UNIT]).alias(UNIT_ID)
    # Identical records share their privacy unit, so only rows whose unit repeats
    # (or is missing) need the full comparison.
    repeats = _exact_duplicates(raw[source_columns], unit_ids.is_duplicated())
    del raw
    duplicates_exact = int(repeats.sum())
    has_reason = prepared[REASON].is_not_null()
    quarantined = [quarantine_rows(prepared[[ROW, REASON, REASON_COLUMN]]
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
        kept = kept.sort(work_column("bounded", ts), descending=True, nulls_last=True,
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
            quarantined.append(quarantine_rows(kept.filter(conflict).with_columns(
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
        as_of=format_instant(as_of) if as_of else None,
        columns=transform.counters(prepared, sides["train"] | sides["test"]),
    )
    if report.rows_accounted != rows_in:
        raise InternalError(
            f"clean lost track of rows: {rows_in} in, {report.rows_accounted} accounted for"
        )
    return CleanOutcome(train=train, test=test, quarantine=quarantine, report=report)


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


def _sorted_counts(keys: pl.Series, counts: pl.Series) -> dict[str, int]:
    return dict(sorted((str(k), int(n)) for k, n in zip(keys, counts, strict=True)))
