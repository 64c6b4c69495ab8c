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

from personanet.cleaning.images import repeated_images
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
from personanet.reporting.clean_view import clean_warnings
from personanet.stages.base import StagePlan, StageResult, run_stage
from personanet.stages.clean_keys import (  # noqa: F401  (hash_split: public here too)
    _exact_duplicates,
    _group_ids,
    hash_split,
)
from personanet.stages.increments import lineage
from personanet.stages.lineage import chain_input, clean_fingerprint
from personanet.store.artifacts import ArtifactStore

if TYPE_CHECKING:
    from collections.abc import Callable

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
            from personanet.stages.clean_stream import clean_into

            # "In the future" means after the records were collected: a property of the
            # input artifact, so the same input always cleans the same way.
            as_of = parse_instant(source.created_at) if source.created_at else None
            # In batches, past memory; an incremental collection is its whole chain.
            report = clean_into(writer, store, source, config, key,
                                pseudonym_key=pseudonym_key(key), as_of=as_of)
            writer.figures = report.to_dict()
            warnings.extend(clean_warnings(report.to_dict(), config))

        return StagePlan("clean", clean_fingerprint(config, source.version),
                         inputs=[a.as_input() for a in lineage(store, source)],
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
    rows_in = records.height
    if rows_in == 0:
        raise BadInputError(
            "the collected records are empty (the source had only a header?): "
            "collect a source with at least one record"
        )
    setup = CleanSetup(config, as_of=as_of)
    prepared, raw = setup.prepare(records, pseudonym_key)
    del records
    decision = setup.decide(prepared, lambda suspects: _exact_duplicates(raw, suspects))
    outputs = setup.transform.output_columns()
    # (Indexing picks columns without a query plan; `select` would run one.)
    return CleanOutcome(train=prepared[outputs].filter(decision.train),
                        test=prepared[outputs].filter(decision.test),
                        quarantine=decision.quarantine, report=decision.report)


@dataclass(frozen=True)
class Decision:
    """Who goes where: a mask per side over the prepared rows, the quarantine, the figures."""

    train: pl.Series
    test: pl.Series
    quarantine: pl.DataFrame
    report: CleanReport


class CleanSetup:
    """One config's clean: the per-row stage of a batch of records (`prepare`) and the
    set-level steps over every prepared row (`decide`). `clean_records` runs both on
    records in memory; `personanet.stages.clean_stream` runs `prepare` batch by batch."""

    def __init__(self, config: Config, *, as_of: dt.datetime | None) -> None:
        import polars as pl

        check_config(config)
        self.config, self.as_of = config, as_of
        cc = config.clean
        unit = config.dataset.privacy_unit
        dedupe_key = list(cc.dedupe_key or [unit])
        ts = cc.timestamp_column if cc.dedupe_keep == "newest" else None
        transform = RowTransform(config, require_target=True, as_of=as_of,
                                 extra=[ts] if ts else [], unit=unit)
        self.needed = transform.needed_columns() + [c for c in (cc.split_column, *dedupe_key)
                                                    if c]
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
        self.cc, self.unit, self.ts, self.transform = cc, unit, ts, transform
        self.key_columns, self.decision_columns = key_columns, decision_columns
        self.keep = [c for c in decision_columns if c not in hashed_names]
        self.images = [c.name for c in transform.columns
                       if c.kind == "image" and c.role == "feature"]

    def source_rows(self, records: pl.DataFrame, *, offset: int = 0) -> pl.DataFrame:
        """The records as the rules read them and exact duplicates compare them."""
        import polars as pl

        if self.unit == ROW_UNIT:
            # Each row is a person: the unit is the record's 0-based position in the collect
            # artifact (stable: collect keeps the sources' order). Every unit is distinct, so
            # dedupe by it and contribution bounding rightly do nothing.
            records = (records.with_row_index(ROW_UNIT, offset=offset)
                       .with_columns(pl.col(ROW_UNIT).cast(pl.String)))
        return check_columns(records, self.config, self.needed,
                             optional=self.transform.optional_columns())

    def prepare(self, records: pl.DataFrame, key: bytes, *, offset: int = 0
                ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The per-row stage of records whose first is row `offset` of the input: the
        prepared rows (`evaluate_rules`) and the source columns as compared for exact
        duplicates."""
        import polars as pl

        raw = self.source_rows(records, offset=offset)
        source_columns = raw.columns
        raw = raw.with_row_index(ROW, offset=offset).with_columns(pl.col(ROW).cast(pl.UInt64))
        prepared = evaluate_rules(self.transform, raw, key, keep=self.keep)
        return prepared, raw[source_columns]

    def decide(self, prepared: pl.DataFrame,
               exact_repeats: Callable[[pl.Series], pl.Series]) -> Decision:
        """The set-level steps over every prepared row, in input order. `prepared` needs
        ROW, the reasons, UNIT, the decision and flag columns (not the outputs);
        `exact_repeats(suspects)` marks each row identical to an earlier one, given a
        mask that includes every such row."""
        import numpy as np
        import polars as pl

        cc, ts, transform = self.cc, self.ts, self.transform
        key_columns, decision_columns = self.key_columns, self.decision_columns
        rows_in = prepared.height
        unit_ids = _group_ids(prepared[UNIT]).alias(UNIT_ID)
        # Identical records share their privacy unit, so only rows whose unit repeats
        # (or is missing) need the full comparison.
        repeats = exact_repeats(unit_ids.is_duplicated())
        has_reason = prepared[REASON].is_not_null()
        quarantined = [quarantine_rows(prepared[[ROW, REASON, REASON_COLUMN]]
                                       .filter(has_reason & ~repeats))]
        if images := self.images:
            repeats = repeats | repeated_images(  # one person's same pixels again: a duplicate
                prepared[images], unit_ids, ~(has_reason | repeats) & unit_ids.is_duplicated())
        duplicates_exact = int(repeats.sum())

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
        quarantine = pl.concat(quarantined).sort("row")
        by_reason = quarantine.group_by("reason").len()
        by_column = quarantine.group_by("column").len().drop_nulls("column")
        report = CleanReport(
            rows_in=rows_in,
            rows_train=int(sides["train"].sum()),
            rows_test=int(sides["test"].sum()),
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
            as_of=format_instant(self.as_of) if self.as_of else None,
            columns=transform.counters(prepared, sides["train"] | sides["test"]),
        )
        if report.rows_accounted != rows_in:
            raise InternalError(
                f"clean lost track of rows: {rows_in} in, {report.rows_accounted} accounted for"
            )
        return Decision(train=sides["train"], test=sides["test"], quarantine=quarantine,
                        report=report)


def _sorted_counts(keys: pl.Series, counts: pl.Series) -> dict[str, int]:
    return dict(sorted((str(k), int(n)) for k, n in zip(keys, counts, strict=True)))
