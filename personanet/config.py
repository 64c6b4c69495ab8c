"""The TOML config: typed sections, strict validation, documented defaults.

Every key has a default here (or is required and says so), unknown keys are
errors, and every error names the key and the fix (exit 78). Bounds and
category domains are *public* knowledge supplied by the user: the pipeline
scales and encodes with them and never with statistics of the private data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import hashlib
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from personanet.errors import ConfigError

Role = Literal["feature", "identifier", "target", "ignore"]
ColumnType = Literal["numeric", "categorical", "datetime", "text"]

ROLES: tuple[str, ...] = typing.get_args(Role)
COLUMN_TYPES: tuple[str, ...] = typing.get_args(ColumnType)
IMPUTE_RULES = ("midpoint", "missing", "drop", "none")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: a [train] setting chosen from the data by personanet.training.defaults when training starts
Auto = Literal["auto"]
AUTO = "auto"


#: `dataset.privacy_unit` for data without a person identifier: each row is a person. clean
#: numbers the collected records 0, 1, 2, ... in collect's order and uses that as the unit.
#: The '@' keeps it apart from any configured column ([columns."@row"] is refused).
ROW_UNIT = "@row"


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    target: str
    privacy_unit: str
    #: file, glob, or list of them (csv, csv.gz, parquet, ndjson); `collect --source` overrides
    source: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceConfig:
    """How source files are read: every file of `dataset.source`, `collect --source` and
    `predict --input` alike. The CSV-only keys are ignored for Parquet and NDJSON."""

    #: "auto" by the file name (.csv, .csv.gz, .parquet, .ndjson), or the format of every file
    #: whatever its name (a headerless `.data` export: "csv")
    format: Literal["auto", "csv", "parquet", "ndjson"] = "auto"
    #: the one character between fields: ",", ";", "\t", "|", " "
    delimiter: str = ","
    #: the character that quotes a field holding the delimiter; "" for none
    quote_char: str = '"'
    #: whether the first line (after `skip_rows`) names the columns
    has_header: bool = True
    #: names of the columns in file order; required without a header, replaces it otherwise
    column_names: list[str] | None = None
    #: text encoding of CSV files: "utf-8" or "latin-1" (ISO-8859-1, read into memory whole)
    encoding: Literal["utf-8", "latin-1"] = "utf-8"
    #: strip spaces around every field and header name (UCI's "39, State-gov")
    trim_whitespace: bool = False
    #: field values that mean "missing", compared after trimming (UCI Adult: ["?"])
    null_values: list[str] = field(default_factory=list)
    #: lines skipped before the header or the first record (a title or comment line)
    skip_rows: int = 0
    #: a header naming a column twice: "refuse" (exit 65) unless the copies are identical in
    #: every row, or "suffix": the second `score` is read as `score_2`, the third `score_3`
    duplicate_columns: Literal["refuse", "suffix"] = "refuse"


@dataclass(frozen=True)
class ColumnConfig:
    name: str
    role: Role = "feature"
    #: default: "text" for identifiers, "categorical" otherwise
    type: ColumnType | None = None
    #: public [low, high]: numbers, or ISO dates for datetime columns
    bounds: tuple[Any, Any] | None = None
    #: how a numeric feature is scaled into [0, 1] by its bounds: "linear" or "log" (log1p,
    #: for heavy tails such as money); both use only the public bounds
    scale: Literal["linear", "log"] = "linear"
    #: public domain of a categorical; values outside it become "other"
    categories: tuple[str, ...] | None = None
    #: evaluate reports every metric per value of this column
    sensitive: bool = False
    #: fairness groups of a sensitive numeric/datetime column: the edges between bins, public
    #: like the bounds (default: 5 equal-width bins of the bounds, never cut from the data)
    groups: tuple[Any, ...] | None = None
    #: "midpoint" of the bounds, "missing" category, "drop" the row, "none", or a constant
    impute: Any = None
    #: add a 0/1 feature saying the value was missing
    missing_indicator: bool = False
    #: what clean does with a value outside `bounds`: "clip" or "quarantine"
    out_of_bounds: Literal["clip", "quarantine"] = "clip"
    #: what clean does with a value that does not parse: "null" (then impute) or "quarantine"
    invalid: Literal["null", "quarantine"] = "null"
    #: a category outside `categories`: "other" or "quarantine" (strict)
    unknown_category: Literal["other", "quarantine"] = "other"
    #: string normalisation before matching categories: "none", "lower" or "upper"
    case: Literal["none", "lower", "upper"] = "none"
    #: a source without this column is refused (exit 65)
    required: bool = True

    @property
    def kind(self) -> str:
        """The effective type (defaults resolved)."""
        if self.type is not None:
            return self.type
        return "text" if self.role == "identifier" else "categorical"

    @property
    def impute_rule(self) -> Any:
        """The effective imputation rule (defaults resolved)."""
        if self.impute is not None:
            return self.impute
        if self.kind in ("numeric", "datetime"):
            return "midpoint"
        if self.kind == "categorical":
            return "missing"
        return "none"


@dataclass(frozen=True)
class CleanConfig:
    #: rows kept per privacy unit (person); the DP guarantee is per person because of it
    max_rows_per_unit: int = 1
    #: share of privacy units held out for evaluation
    test_fraction: float = 0.2
    seed: int = 42
    #: a column whose values fix the split instead of the hash (e.g. the UCI split)
    split_column: str | None = None
    split_train_value: str = "train"
    split_test_value: str = "test"
    #: columns that identify a duplicate record; default: the privacy unit
    dedupe_key: list[str] | None = None
    #: which duplicate survives: "first" in source order or "newest" by `timestamp_column`
    dedupe_keep: Literal["first", "newest"] = "first"
    timestamp_column: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    #: target epsilon of this run; noise is calibrated to reach it at `delta`
    epsilon: float = 1.0
    delta: float = 1e-5
    #: passes over the data; "auto": chosen from the training rows (personanet.training.defaults)
    epochs: int | Auto = "auto"
    #: expected logical batch size (Poisson sampling rate = batch_size / rows); "auto": chosen
    #: from the training rows so the rate stays small enough for sampling to amplify privacy
    batch_size: int | Auto = "auto"
    #: per-example gradient clipping norm C
    max_grad_norm: float = 1.0
    #: "auto": chosen with the batch size (personanet.training.defaults); Adam at 1e-2 measured best
    #: under DP on the full bundled sample (0.855 at epsilon 1)
    learning_rate: float | Auto = "auto"
    optimizer: Literal["adam", "adamw", "sgd", "lbfgs"] = "adam"
    #: MLP widths; "auto": one layer of 16 for small data, [64, 64] otherwise (defaults.py)
    hidden_sizes: list[int] | Auto = "auto"
    activation: Literal["tanh", "tempered_sigmoid", "relu"] = "tanh"
    norm: Literal["none", "layernorm", "groupnorm"] = "none"
    dropout: float = 0.0
    categorical_encoding: Literal["onehot", "embedding"] = "onehot"
    embedding_dim: int = 8
    #: privacy accountant: "prv" (tight), falls back to "rdp" if PRV fails
    accountant: Literal["prv", "rdp"] = "prv"
    #: per-sample gradient mode: "ghost" clipping, or Opacus "hooks"
    grad_sample_mode: Literal["ghost", "hooks"] = "ghost"
    #: physical batch cap for BatchMemoryManager; the logical batch is unchanged
    max_physical_batch_size: int = 4096
    seed: int = 42
    device: str = "auto"
    #: piecewise-linear encoding of each numeric/datetime feature into this many equal-width
    #: bins of its public bounds, beside the scaled value (0: the scaled value only);
    #: "auto": 0 for small data, 16 otherwise (defaults.py)
    numeric_bins: int | Auto = "auto"
    #: ghost clipping in one backward pass (book-keeping) where every layer allows it;
    #: false: Opacus' own two-pass ghost clipping
    bookkeeping: bool = True
    #: momentum of the "sgd" optimizer (the others ignore it)
    momentum: float = 0.9
    #: decoupled weight decay of the "adamw" optimizer (the others ignore it)
    weight_decay: float = 0.01
    #: permit `epsilon` above MAX_TRAIN_EPSILON (100): such a run promises next to no
    #: privacy, so it must be asked for by name, never reached by a typo
    allow_large_epsilon: bool = False


#: The largest train.epsilon accepted without train.allow_large_epsilon. At epsilon 100 a
#: single person may shift the odds of any outcome by e^100: no meaningful guarantee.
MAX_TRAIN_EPSILON = 100.0


@dataclass(frozen=True)
class BudgetConfig:
    #: total epsilon this dataset may spend across all training runs
    epsilon: float = 10.0
    #: total delta this dataset may spend
    delta: float = 1e-4


@dataclass(frozen=True)
class EvaluateConfig:
    #: gate: exit 69 when test accuracy is below it
    min_accuracy: float | None = None
    #: gate: largest accuracy gap between groups of a sensitive column
    max_group_gap: float | None = None
    #: gate: membership-inference attack AUC
    max_attack_auc: float | None = None
    #: bootstrap resamples for confidence intervals
    bootstrap: int = 200
    #: run the membership-inference audit (and fail when its lower bound exceeds the claim)
    audit: bool = True
    #: smallest group whose metrics and size are published: a group of one would say whether
    #: that person was classified correctly, and metrics.json is not encrypted
    min_group_size: int = 20
    seed: int = 42


@dataclass(frozen=True)
class PredictConfig:
    #: input that `personanet run` scores after evaluate; empty: skip predict
    source: str | None = None
    batch_size: int = 8192


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig
    columns: dict[str, ColumnConfig]
    clean: CleanConfig = field(default_factory=CleanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    #: the file it came from; relative sources resolve against its folder
    path: Path | None = None

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON values, as recorded in manifests."""
        if name == "columns":
            # `groups` unset is left out, so configs without it keep the hashes they had
            # before the key existed: their clean and train artifacts stay reusable.
            return {k: _jsonable({f: x for f, x in dataclasses.asdict(v).items()
                                  if not (f == "groups" and x is None)})
                    for k, v in self.columns.items()}
        return _jsonable(dataclasses.asdict(getattr(self, name)))

    def section_hash(self, *names: str) -> str:
        """sha256 over the canonical JSON of the named sections (identity for reuse)."""
        payload = {n: self.section(n) for n in names}
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def features(self) -> list[ColumnConfig]:
        return [c for c in self.columns.values() if c.role == "feature"]

    def identifiers(self) -> list[ColumnConfig]:
        return [c for c in self.columns.values() if c.role == "identifier"]

    @property
    def target_column(self) -> ColumnConfig:
        return self.columns[self.dataset.target]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value


# --------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """Read and validate a TOML config; ConfigError (exit 78) names the key and the fix.

    `overrides` are ``KEY=VALUE`` strings (``train.epsilon=3``, ``columns.age.sensitive=true``)
    applied on top of the file before validation, so they are typed and checked exactly like
    keys written in the file (`personanet --set`).
    """
    p = Path(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} not found: pass --config PATH or set PERSONANET_CONFIG") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    for override in overrides or []:
        apply_override(raw, override)
    return parse_config(raw, path=p)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set one ``SECTION.KEY=VALUE`` (``columns.NAME.KEY=VALUE``) in a parsed TOML document.

    The value is read as a TOML value (``3``, ``true``, ``[17, 90]``, ``"x"``); anything that is
    not valid TOML is taken as a bare string, so ``--set dataset.name=mine`` needs no quotes.
    Which keys exist and what type they take is checked afterwards by `parse_config`, with the
    same messages as for the file.
    """
    name, sep, text = override.partition("=")
    path = [part.strip() for part in name.strip().split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {override!r}: use --set SECTION.KEY=VALUE, e.g. "
                          "--set train.epsilon=3 or --set columns.age.sensitive=true")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = raw
    for part in path[:-1]:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is a value, not a table")
        table = child
    table[path[-1]] = value


def parse_config(raw: dict[str, Any], *, path: Path | None = None) -> Config:
    """Validate a config already parsed from TOML."""
    where = str(path) if path else "config"
    _reject_unknown(raw, [f.name for f in dataclasses.fields(Config) if f.name != "path"], "")
    for required in ("dataset", "columns"):
        if required not in raw:
            raise ConfigError(f"{where}: missing section [{required}]")
    ds_raw = dict(_table(raw["dataset"], "dataset"))
    if isinstance(ds_raw.get("source"), str):
        ds_raw["source"] = [ds_raw["source"]]
    dataset = _build(DatasetConfig, ds_raw, "dataset")
    if not DATASET_NAME.match(dataset.name):
        raise ConfigError(
            f"dataset.name {dataset.name!r} must be 1-64 letters, digits, '_', '-' or '.' "
            "(it names a folder)"
        )
    columns_raw = _table(raw["columns"], "columns")
    if not columns_raw:
        raise ConfigError("[columns] is empty: describe at least the target and one feature")
    columns = {
        name: _build(ColumnConfig, _table(spec, f"columns.{name}"), f"columns.{name}", name=name)
        for name, spec in columns_raw.items()
    }
    columns = {name: _normalise_column(col) for name, col in columns.items()}
    columns = _resolve_target(columns, dataset.target)
    sections: dict[str, Any] = {}
    for name, cls in (("clean", CleanConfig), ("train", TrainConfig), ("budget", BudgetConfig),
                      ("evaluate", EvaluateConfig), ("predict", PredictConfig),
                      ("source", SourceConfig)):
        sections[name] = _build(cls, _table(raw.get(name, {}), name), name)
    config = Config(dataset=dataset, columns=columns, path=path, **sections)
    _check_cross_references(config)
    return config


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table ([{where}]), not {type(value).__name__}")
    return value


def _reject_unknown(table: dict[str, Any], known: list[str], where: str) -> None:
    for key in table:
        if key not in known:
            guess = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else f"; known keys: {', '.join(known)}"
            label = f"{where}.{key}" if where else f"[{key}]"
            raise ConfigError(f"unknown config key {label}{hint}")


def _build(cls: type, table: dict[str, Any], where: str, **fixed: Any) -> Any:
    """Make dataclass `cls` from a TOML table; `fixed` fields are not read from the table."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    _reject_unknown(table, list(fields), where)
    values = dict(fixed)
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {where}.{name}")
            continue
        values[name] = _coerce(table[name], hints[name], f"{where}.{name}")
    return cls(**values)


KIND_NAMES: dict[Any, str] = {int: "an integer", float: "a number", list: "a list"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint; raise ConfigError naming `key` when it does not fit."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        keywords = [a for arg in args if typing.get_origin(arg) is Literal
                    for a in typing.get_args(arg)]
        kinds = [KIND_NAMES[kind] for kind in (typing.get_origin(arg) or arg for arg in args)
                 if kind in KIND_NAMES]
        if keywords and len(kinds) == 1:  # a number or a keyword such as "auto"
            options = " or ".join([kinds[0], *(repr(k) for k in keywords)])
            raise ConfigError(f"{key} must be {options}, got {value!r}")
        raise ConfigError(f"{key} has the wrong type: {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            if len(value) != 2:
                raise ConfigError(f"{key} must be a [low, high] pair, got {value!r}")
            return tuple(value)
        item = args[0] if args else Any
        coerced = [_coerce(v, item, key) for v in value]
        return tuple(coerced) if origin is tuple else coerced
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _normalise_column(col: ColumnConfig) -> ColumnConfig:
    where = f"columns.{col.name}"
    kind = col.kind
    changes: dict[str, Any] = {}
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


def _resolve_target(columns: dict[str, ColumnConfig], target: str) -> dict[str, ColumnConfig]:
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


def _check_cross_references(config: Config) -> None:
    cols = config.columns
    if ROW_UNIT in cols:
        raise ConfigError(f"[columns.{json.dumps(ROW_UNIT)}] is reserved: {ROW_UNIT!r} is the "
                          "generated row number (dataset.privacy_unit = \"@row\"); rename it")
    _check_source(config.source)
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
    if train.learning_rate != AUTO:
        _positive(train.learning_rate, "train.learning_rate")
    if train.hidden_sizes != AUTO and (not train.hidden_sizes
                                       or any(h < 1 for h in train.hidden_sizes)):
        raise ConfigError("train.hidden_sizes must be a non-empty list of positive integers "
                          "(or \"auto\")")
    if not 0.0 <= train.dropout < 1.0:
        raise ConfigError("train.dropout must be in [0, 1)")
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
