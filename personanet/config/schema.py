"""The config's schema: one frozen dataclass per TOML section, with every key's default.

Every key has a default here (or is required and says so); the comment above a
field is its documentation (the README's key tables follow them). Bounds and
category domains are *public* knowledge supplied by the user: the pipeline
scales and encodes with them and never with statistics of the private data.
`Config.section()` is what manifests record, and its hash is a stage's identity
for reuse, so a field's name, order and default are part of the artifact format.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


#: the sections whose keys a misplaced command-line option may name (`--epsilon` for `--set
#: train.epsilon=...`), in the order a hint lists them
OPTION_SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig, "clean": CleanConfig, "train": TrainConfig,
    "budget": BudgetConfig, "evaluate": EvaluateConfig, "predict": PredictConfig,
}


def keys_named(name: str) -> list[str]:
    """Every ``SECTION.KEY`` whose key is `name`: ``"epsilon"`` -> train.epsilon, budget.epsilon."""
    return [f"{section}.{f.name}" for section, cls in OPTION_SECTIONS.items()
            for f in dataclasses.fields(cls) if f.name == name]
