"""The config's rules beyond types: per column, and across sections.

Types are checked while the sections are built (`personanet.config.loading`);
what is checked here needs more than one key at a time: a column's bounds,
categories, groups and imputation against its type; the target and privacy
unit against the columns; the [source] options polars can honour; ranges of
the training, budget and evaluation settings. Each error names the key and
the fix (exit 78).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import math
from typing import Any

from personanet.config.categories import checked_aliases, checked_formats
from personanet.config.image_keys import check_image_column, check_image_references
from personanet.config.schema import (
    AUTO,
    IMPUTE_RULES,
    MAX_TRAIN_EPSILON,
    ROW_UNIT,
    ColumnConfig,
    Config,
    SourceConfig,
)
from personanet.errors import ConfigError


def normalise_column(col: ColumnConfig) -> ColumnConfig:
    where = f"columns.{col.name}"
    kind = col.kind
    changes: dict[str, Any] = {}
    check_image_column(col, where)
    if col.bounds is not None:
        if kind == "numeric":
            lo, hi = (_number(b, f"{where}.bounds") for b in col.bounds)
        elif kind == "datetime":
            lo = _instant(col.bounds[0], f"{where}.bounds")
            hi = _instant(col.bounds[1], f"{where}.bounds", end_of_day=True)
        else:
            raise ConfigError(f"{where}.bounds only applies to numeric or datetime columns")
        if not lo < hi:
            raise ConfigError(f"{where}.bounds must be [low, high] with low < high")
        changes["bounds"] = (lo, hi)
    if col.categories is not None:
        if kind != "categorical":
            raise ConfigError(f"{where}.categories only applies to categorical columns")
        cats = tuple(str(c) for c in col.categories)
        if not cats:
            raise ConfigError(f"{where}.categories is empty: list the public domain of values")
        if len(set(cats)) != len(cats):
            raise ConfigError(f"{where}.categories has duplicates")
        changes["categories"] = cats
    if col.formats is not None:
        changes["formats"] = checked_formats(col, where)
    if (col.decimal, col.thousands) != (".", ""):
        if kind != "numeric":
            raise ConfigError(f"{where}.decimal / thousands only apply to numeric columns")
        if col.decimal == col.thousands:
            raise ConfigError(f"{where}: decimal and thousands cannot both be "
                              f"{col.decimal!r}")
    if col.aliases is not None:
        changes["aliases"] = checked_aliases(col, changes.get("categories", col.categories),
                                             where)
    if col.groups is not None or col.sensitive:
        groups = _group_edges(col, changes.get("bounds", col.bounds), where)
        if groups is not None:
            changes["groups"] = groups
    needs_domain = col.role in ("feature", "target")
    if needs_domain and kind in ("numeric", "datetime") and col.bounds is None:
        raise ConfigError(
            f"{where} is a {kind} {col.role} without bounds: add bounds = [low, high] from public "
            "knowledge (never from the data), or set role = \"ignore\""
        )
    if needs_domain and kind == "categorical" and col.categories is None:
        raise ConfigError(
            f"{where} is a categorical {col.role} without categories: list its public domain in "
            "categories = [...], or set role = \"ignore\""
        )
    if col.role == "feature" and kind == "text":
        raise ConfigError(
            f"{where} is free text, which is never a feature: set role = \"ignore\" or "
            "\"identifier\", or give it a type"
        )
    impute = col.impute
    if impute is not None:
        if isinstance(impute, str) and impute in IMPUTE_RULES:
            if impute == "midpoint" and kind not in ("numeric", "datetime"):
                raise ConfigError(
                    f"{where}.impute = \"midpoint\" needs a numeric or datetime column")
            if impute == "missing" and kind != "categorical":
                raise ConfigError(f"{where}.impute = \"missing\" needs a categorical column")
        elif kind == "numeric":
            changes["impute"] = _number(impute, f"{where}.impute")
        elif kind == "categorical":
            if str(impute) not in (changes.get("categories") or col.categories or ()):
                raise ConfigError(f"{where}.impute constant {impute!r} is not in its categories")
            changes["impute"] = str(impute)
        elif kind == "datetime":
            changes["impute"] = _instant(impute, f"{where}.impute")
        else:
            raise ConfigError(f"{where}.impute must be one of {', '.join(IMPUTE_RULES)}")
    return dataclasses.replace(col, **changes) if changes else col


def _group_edges(col: ColumnConfig, bounds: tuple[Any, Any] | None, where: str
                 ) -> tuple[Any, ...] | None:
    """A sensitive column's `groups` edges, checked against its type and public bounds.

    Edges are numbers (ISO dates for datetime columns), strictly increasing, within the
    bounds; at least one must fall strictly inside them, or there would be one group.
    """
    kind = col.kind
    if col.sensitive and col.role == "identifier":
        raise ConfigError(f"{where} is an identifier: as a sensitive column every person would be "
                          "a group of one; set sensitive = false")
    if col.groups is None:
        if col.sensitive and kind in ("numeric", "datetime") and bounds is None:
            raise ConfigError(f"{where} is sensitive: its groups are bins of its bounds; add "
                              "bounds = [low, high] or groups = [edges] from public knowledge")
        return None
    if not col.sensitive:
        raise ConfigError(f"{where}.groups only applies with sensitive = true")
    if kind not in ("numeric", "datetime"):
        raise ConfigError(f"{where}.groups only applies to numeric or datetime columns (a "
                          f"{kind} column's groups are its values)")
    if kind == "numeric":
        edges: list[Any] = [_number(e, f"{where}.groups") for e in col.groups]
    else:
        edges = [_instant(e, f"{where}.groups") for e in col.groups]
    if any(not a < b for a, b in zip(edges, edges[1:], strict=False)):
        raise ConfigError(f"{where}.groups must be strictly increasing, got {list(col.groups)}")
    if bounds is not None:
        lo, hi = bounds
        outside = [raw for e, raw in zip(edges, col.groups, strict=True) if not lo <= e <= hi]
        if outside:
            raise ConfigError(f"{where}.groups edge {outside[0]!r} is outside bounds "
                              f"{list(col.bounds or ())}")
        if not any(lo < e < hi for e in edges):
            raise ConfigError(f"{where}.groups needs an edge strictly inside bounds "
                              f"{list(col.bounds or ())}, or there is one group")
    elif not edges:
        raise ConfigError(f"{where}.groups is empty: list the edges between groups")
    return tuple(edges)


def resolve_target(columns: dict[str, ColumnConfig], target: str) -> dict[str, ColumnConfig]:
    if target not in columns:
        raise ConfigError(
            f"dataset.target = {target!r} is not a column{_did_you_mean(target, columns)}: "
            f"add [columns.{target}] with its type"
        )
    col = columns[target]
    if col.role not in ("feature", "target"):
        raise ConfigError(f"dataset.target {target!r} has role {col.role!r}: a target must be "
                          "role = \"target\"")
    if col.kind not in ("categorical", "numeric"):
        raise ConfigError(f"columns.{target}: a target must be categorical or numeric")
    out = dict(columns)
    out[target] = dataclasses.replace(col, role="target")
    others = [n for n, c in out.items() if c.role == "target" and n != target]
    if others:
        raise ConfigError(f"columns {others[0]!r} has role \"target\" but dataset.target is "
                          f"{target!r}: one target per dataset")
    return out


def _did_you_mean(name: str, known: Any) -> str:
    """"; did you mean 'applicant_id'?" when a configured column name is close to `name`."""
    names = [str(k) for k in known]
    guess = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    if not guess:
        guess = [k for k in names if name.lower() in k.lower() or k.lower() in name.lower()][:1]
    return f" (did you mean {guess[0]!r}?)" if guess else ""


def check_cross_references(config: Config) -> None:
    cols = config.columns
    if ROW_UNIT in cols:
        raise ConfigError(f"[columns.{json.dumps(ROW_UNIT)}] is reserved: {ROW_UNIT!r} is the "
                          "generated row number (dataset.privacy_unit = \"@row\"); rename it")
    _check_source(config.source)
    if config.dataset.database is not None:
        _check_database(config)
    if config.dataset.privacy_unit == ROW_UNIT:
        pass  # each row is a person: clean numbers the rows, no column is needed
    elif config.dataset.privacy_unit not in cols:
        raise ConfigError(
            f"dataset.privacy_unit = {config.dataset.privacy_unit!r} is not a column"
            f"{_did_you_mean(config.dataset.privacy_unit, cols)}: add "
            f"[columns.{config.dataset.privacy_unit}] with role = \"identifier\""
        )
    if not config.features():
        raise ConfigError("no feature columns: at least one column needs role = \"feature\"")
    clean = config.clean
    for key, name in (("clean.split_column", clean.split_column),
                      ("clean.timestamp_column", clean.timestamp_column)):
        if name is not None and name not in cols:
            raise ConfigError(f"{key} = {name!r} is not a column{_did_you_mean(name, cols)}: "
                              f"add [columns.{name}]")
    for name in clean.dedupe_key or []:
        if name not in cols:
            raise ConfigError(f"clean.dedupe_key names {name!r}, which is not a column"
                              f"{_did_you_mean(name, cols)}")
    check_image_references(config)
    if clean.dedupe_keep == "newest" and clean.timestamp_column is None:
        raise ConfigError("clean.dedupe_keep = \"newest\" needs clean.timestamp_column")
    if clean.max_rows_per_unit < 1:
        raise ConfigError("clean.max_rows_per_unit must be at least 1")
    if not 0.0 < clean.test_fraction < 1.0:
        raise ConfigError("clean.test_fraction must be between 0 and 1 (exclusive)")
    train = config.train
    _positive(train.epsilon, "train.epsilon")
    if train.epsilon > MAX_TRAIN_EPSILON and not train.allow_large_epsilon:
        raise ConfigError(
            f"train.epsilon = {train.epsilon:g} is above {MAX_TRAIN_EPSILON:g}, where DP "
            "promises next to nothing (a typo for 1.0?); lower it, or set "
            "train.allow_large_epsilon = true if you mean it")
    if not 0.0 < train.delta < 1.0:
        raise ConfigError("train.delta must be in (0, 1); use about 1/rows or smaller")
    for key, value in (("train.epochs", train.epochs), ("train.batch_size", train.batch_size),
                       ("train.max_physical_batch_size", train.max_physical_batch_size),
                       ("train.embedding_dim", train.embedding_dim)):
        if value != AUTO and value < 1:
            auto = " (or \"auto\")" if key in ("train.epochs", "train.batch_size") else ""
            raise ConfigError(f"{key} must be at least 1{auto}")
    _positive(train.max_grad_norm, "train.max_grad_norm")
    if (train.privacy_unit_level == "person"
            and clean.max_rows_per_unit > train.max_physical_batch_size):
        raise ConfigError(
            f"clean.max_rows_per_unit = {clean.max_rows_per_unit} is above "
            f"train.max_physical_batch_size = {train.max_physical_batch_size}: person-level "
            "training keeps a person's rows in one physical batch; raise the batch cap or "
            "lower the rows per person")
    if train.learning_rate != AUTO:
        _positive(train.learning_rate, "train.learning_rate")
    if train.hidden_sizes != AUTO and (not train.hidden_sizes
                                       or any(h < 1 for h in train.hidden_sizes)):
        raise ConfigError("train.hidden_sizes must be a non-empty list of positive integers "
                          "(or \"auto\")")
    if not 0.0 <= train.dropout < 1.0:
        raise ConfigError("train.dropout must be in [0, 1)")
    _check_image_training(config)
    _positive(config.budget.epsilon, "budget.epsilon")
    if not 0.0 < config.budget.delta < 1.0:
        raise ConfigError("budget.delta must be in (0, 1)")
    if config.evaluate.bootstrap < 0:
        raise ConfigError("evaluate.bootstrap must be >= 0")
    if config.evaluate.min_group_size < 1:
        raise ConfigError("evaluate.min_group_size must be at least 1 (20 or more keeps a "
                          "group's metrics from describing a few people)")
    if config.predict.batch_size < 1:
        raise ConfigError("predict.batch_size must be at least 1")
    _check_tune(config)


def _check_image_training(config: Config) -> None:
    """The [train] keys of the image model (cnn): ranges, and the family against the columns."""
    train = config.train
    images = [c.name for c in config.features() if c.kind == "image"]
    model = train.model if train.model != AUTO else ("cnn" if images else "tabular")
    if model == "cnn" and len(images) != 1:
        raise ConfigError(f"train.model = \"cnn\" needs exactly one image feature column "
                          f"(type = \"image\"); the config has {len(images)}")
    if model == "tabular" and images:
        raise ConfigError(f"columns.{images[0]} is an image, which the tabular model cannot "
                          "read: set train.model = \"cnn\" (or \"auto\"), or role = \"ignore\"")
    if model == "tabular" and train.norm == "batchnorm":
        raise ConfigError("train.norm = \"batchnorm\" is for the cnn without DP only; the "
                          "tabular model uses \"none\", \"layernorm\" or \"groupnorm\"")
    if model == "cnn" and train.norm == "layernorm":
        raise ConfigError("train.norm = \"layernorm\" is not a cnn layer: use \"groupnorm\" "
                          "(per example, allowed under DP) or \"none\"")
    if train.augment_shift < 0 or train.augment_shift > 16:
        raise ConfigError("train.augment_shift must be between 0 and 16 pixels")
    if not 0.0 <= train.augment_rotate <= 45.0:
        raise ConfigError("train.augment_rotate must be between 0 and 45 degrees")
    if train.augment_multiplicity != AUTO and not 1 <= train.augment_multiplicity <= 64:
        raise ConfigError("train.augment_multiplicity must be between 1 and 64 (or \"auto\")")
    if (train.augment is True and train.augment_multiplicity not in (AUTO, 1)
            and config.clean.max_rows_per_unit > 1):
        raise ConfigError("train.augment_multiplicity > 1 averages one row's copies before "
                          "clipping; with clean.max_rows_per_unit > 1 a person has several "
                          "rows: set augment_multiplicity = 1 or max_rows_per_unit = 1")
    if train.augment is True and model != "cnn":
        raise ConfigError("train.augment applies to images: the cnn model only")
    if train.validation_fraction != AUTO and not 0.0 <= train.validation_fraction < 0.5:
        raise ConfigError("train.validation_fraction must be in [0, 0.5) (or \"auto\")")


def _check_source(source: SourceConfig) -> None:
    """The [source] read options polars can honour, or the key to fix (exit 78)."""
    if len(source.delimiter) != 1 or len(source.delimiter.encode("utf-8")) != 1 \
            or source.delimiter in "\r\n":
        raise ConfigError(f"source.delimiter = {source.delimiter!r} must be one ASCII character "
                          "such as \",\", \";\", \"\\t\", \"|\" or \" \" (for \", \" use \",\" "
                          "with trim_whitespace = true)")
    if source.quote_char and (len(source.quote_char.encode("utf-8")) != 1
                              or source.quote_char == source.delimiter):
        raise ConfigError(f"source.quote_char = {source.quote_char!r} must be one ASCII "
                          "character other than the delimiter, or \"\" for none")
    if source.column_names is not None:
        if not source.column_names or any(not n.strip() for n in source.column_names):
            raise ConfigError("source.column_names must list a non-blank name per column")
        seen: set[str] = set()
        for name in source.column_names:
            if name in seen:
                raise ConfigError(f"source.column_names names {name!r} twice")
            seen.add(name)
    elif not source.has_header:
        raise ConfigError("source.has_header = false needs source.column_names = [...], the "
                          "names of the columns in file order")
    if source.skip_rows < 0:
        raise ConfigError("source.skip_rows must be >= 0")


#: a table or column name a query may carry unquoted (schema.table for a table)
SQL_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,62}"


def _check_database(config: Config) -> None:
    """[dataset.database]: one place to connect, one thing to read, names that are names."""
    import re

    db = config.dataset.database
    assert db is not None
    where = "dataset.database"
    if config.dataset.source:
        raise ConfigError(f"dataset.source and [{where}] are both set: records come from files "
                          "or from a database; remove one")
    places = [k for k in ("sqlite", "uri_env", "uri_file") if getattr(db, k)]
    if len(places) != 1:
        raise ConfigError(f"[{where}] needs exactly one of sqlite = \"file.db\", uri_env = "
                          "\"VAR\" (an environment variable holding the URI) or uri_file = "
                          "\"path\"; the URI itself never goes in the config")
    if db.uri_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", db.uri_env):
        raise ConfigError(f"{where}.uri_env must name an environment variable (e.g. "
                          "\"PERSONA_DB\"), not hold the URI")
    if (db.table is None) == (db.query is None):
        raise ConfigError(f"[{where}] needs exactly one of table = \"name\" or query = "
                          "\"SELECT ...\"")
    if db.table is not None and not re.fullmatch(rf"{SQL_NAME}(\.{SQL_NAME})?", db.table):
        raise ConfigError(f"{where}.table = {db.table!r} must be a plain name or schema.name "
                          "(letters, digits, _); use query = \"SELECT ...\" for anything else")
    if db.query is not None and not db.query.strip().rstrip(";").strip():
        raise ConfigError(f"{where}.query is empty")
    if db.watermark is not None and not re.fullmatch(SQL_NAME, db.watermark):
        raise ConfigError(f"{where}.watermark = {db.watermark!r} must be a column name "
                          "(letters, digits, _)")
    if db.batch_size < 1:
        raise ConfigError(f"{where}.batch_size must be at least 1")


def _check_tune(config: Config) -> None:
    """[tune]: the search's budget, the distribution of its trials, its search space."""
    tune = config.tune
    _positive(tune.epsilon, "tune.epsilon")
    if tune.epsilon > MAX_TRAIN_EPSILON and not config.train.allow_large_epsilon:
        raise ConfigError(f"tune.epsilon = {tune.epsilon:g} is above {MAX_TRAIN_EPSILON:g}, "
                          "where DP promises next to nothing; lower it")
    if not 0.0 < tune.delta < 1.0:
        raise ConfigError("tune.delta must be in (0, 1); use about 1/rows or smaller")
    if not 1.0 <= tune.trials_mean <= 1000.0:
        raise ConfigError("tune.trials_mean must be between 1 and 1000 (the expected number of "
                          "trials)")
    if tune.trials_shape < 0:
        raise ConfigError("tune.trials_shape must be >= 0 (0: logarithmic, 1: geometric)")
    if not 0.0 <= tune.validation_fraction < 1.0:
        raise ConfigError("tune.validation_fraction must be in [0, 1) (0: score the trials "
                          "on their own training people)")
    _positive(tune.score_noise_multiplier, "tune.score_noise_multiplier")
    space = {"learning_rate": tune.learning_rate, "batch_size": tune.batch_size,
             "epochs": tune.epochs, "hidden_sizes": tune.hidden_sizes,
             "max_grad_norm": tune.max_grad_norm, "activation": tune.activation,
             "optimizer": tune.optimizer}
    for key, values in space.items():
        if not values:
            raise ConfigError(f"tune.{key} is empty: list at least one value")
    if tune.learning_rate_log_uniform:
        low_high = [v for v in tune.learning_rate if v != AUTO]
        if len(tune.learning_rate) != 2 or len(low_high) != 2 or not 0 < low_high[0] < low_high[1]:
            raise ConfigError("tune.learning_rate_log_uniform = true needs learning_rate = "
                              "[low, high] with 0 < low < high (or set it to false and list "
                              "the rates to draw from)")
    for value in tune.learning_rate:
        if value != AUTO:
            _positive(value, "tune.learning_rate")
    for key in ("batch_size", "epochs"):
        if any(v != AUTO and v < 1 for v in space[key]):
            raise ConfigError(f"tune.{key} values must be at least 1 (or \"auto\")")
    for sizes in tune.hidden_sizes:
        if sizes != AUTO and (not sizes or any(h < 1 for h in sizes)):
            raise ConfigError("tune.hidden_sizes must list \"auto\" or non-empty lists of "
                              "positive integers, e.g. [\"auto\", [16], [64, 64]]")
    for value in tune.max_grad_norm:
        _positive(value, "tune.max_grad_norm")


def _positive(value: float, key: str) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be greater than 0")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _instant(value: Any, key: str, *, end_of_day: bool = False) -> str:
    """A datetime bound as an ISO string in UTC (TOML dates, datetimes or strings).

    A bare date names a whole day: as an upper bound (`end_of_day`) it means its last
    second, so `bounds = ["2024-01-01", "2026-12-31"]` keeps records of 31 December.
    """
    if isinstance(value, str) and len(value) == 10:
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            raise ConfigError(
                f"{key}: {value!r} is not an ISO date such as \"2024-01-31\"") from None
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
        if end_of_day:
            moment += dt.timedelta(days=1, seconds=-1)
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"{key}: {value!r} is not an ISO date such as \"2024-01-31\"") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
    else:
        raise ConfigError(f"{key} must be an ISO date string, got {value!r}")
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
