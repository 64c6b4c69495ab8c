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
ColumnType = Literal["numeric", "categorical", "datetime", "text", "image"]

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
class DatabaseConfig:
    """`[dataset.database]`: records read from a SQLite file or a PostgreSQL server, in place
    of `dataset.source` files. The URI (and its password) never appears here: it is read from
    the environment variable `uri_env` or the file `uri_file` (README, "Databases")."""

    #: a SQLite database file, relative to the config's folder (holds no secret)
    sqlite: str | None = None
    #: the environment variable holding the URI, e.g. "PERSONA_DB" holding
    #: postgresql://user:password@host:5432/dbname (or sqlite:///path/to/file.db)
    uri_env: str | None = None
    #: a file (relative to the config's folder) whose first line is the URI; keep it mode 0600
    uri_file: str | None = None
    #: the table (or schema.table) to read whole; or `query`
    table: str | None = None
    #: a SELECT whose rows are the records; or `table`
    query: str | None = None
    #: rows per batch streamed from the database into the encrypted artifact
    batch_size: int = 65536
    #: a column that grows with every new or changed row (an id, `updated_at`): rows are read in
    #: its order and `collect --incremental` reads only rows past the last collected value
    watermark: str | None = None


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    target: str
    privacy_unit: str
    #: file, glob, or list of them (csv, csv.gz, parquet, ndjson); `collect --source` overrides
    source: list[str] = field(default_factory=list)
    #: records from a database instead of files: [dataset.database] (DatabaseConfig)
    database: DatabaseConfig | None = None


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
    #: other spellings of categories in the sources, e.g. {">50K." = ">50K"}: each is
    #: matched like a category (trimmed, NFC, `case`) and becomes the category it names
    aliases: dict[str, str] | None = None
    #: datetime text formats (strptime, e.g. "%d/%m/%Y %H:%M"), tried in order instead of
    #: the ISO 8601 shapes; a value without an offset is UTC
    formats: tuple[str, ...] | None = None
    #: a numeric column's decimal mark in text: "." or ","
    decimal: Literal[".", ","] = "."
    #: a numeric column's thousands separator in text, removed before parsing: "", ",",
    #: ".", " " or "'"
    thousands: Literal["", ",", ".", " ", "'"] = ""
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
    #: image columns (type = "image"): [height, width, channels], channels 1 (grey) or 3 (RGB);
    #: clean's output holds height*width*channels uint8 bytes per row, row-major HWC
    shape: tuple[int, int, int] | None = None
    #: an image of another size: "refuse" (quarantined), "fit" (resized to height x width),
    #: "pad" (centred on a zero canvas; a larger image is refused)
    resize: Literal["refuse", "fit", "pad"] = "refuse"
    #: what an image column holds: "path" (of a PNG/JPEG/NPY file, relative to the manifest's
    #: folder and inside it) or "bytes" (the file's bytes, raw or base64)
    image_source: Literal["path", "bytes"] = "path"

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
    #: rows kept per privacy unit (person), k; above 1, train.privacy_unit_level decides
    #: whether training's epsilon is per person (default) or per row
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
    #: "batchnorm": the cnn without DP only (it mixes the examples of a batch; refused under DP)
    norm: Literal["none", "layernorm", "groupnorm", "batchnorm"] = "none"
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
    #: model family: "tabular" (the MLP), "cnn" (one image column); "auto": "cnn" when a
    #: feature column has type = "image", else "tabular"
    model: Literal["auto", "tabular", "cnn"] = "auto"
    #: the cnn's architecture: "seed" (the founding document's Keras CNN) or "tanh" (the
    #: DP-MNIST CNN); "auto": "tanh", measured better (docs/training.md, "Images")
    preset: Literal["auto", "seed", "tanh"] = "auto"
    #: random augmentation of training images (cnn only): shifts, small rotations, flips;
    #: "auto": the measured default (docs/training.md, "Images")
    augment: bool | Auto = "auto"
    #: largest random shift in pixels, each axis (zero-filled: a padded random crop)
    augment_shift: int = 2
    #: largest random rotation in degrees, either way
    augment_rotate: float = 10.0
    #: random horizontal flips (off: they change what a digit or a letter is)
    augment_flip: bool = False
    #: augmented copies per example under DP, whose gradients are averaged before clipping
    #: (De et al. 2022): one example still makes one clipped contribution; "auto": measured
    augment_multiplicity: int | Auto = "auto"
    #: share of the training people held out to report loss and accuracy per epoch (never
    #: the test split); "auto": 0.1 for the cnn, 0 for tabular
    validation_fraction: float | Auto = "auto"
    #: what one clipped gradient covers when clean keeps k = clean.max_rows_per_unit > 1
    #: rows per person: "person" (sample people, clip each person's gradient over all their
    #: rows: epsilon per person) or "row" (epsilon per row; privacy.json states the per-person
    #: bound group privacy gives). Identical at k = 1 (docs/training.md, "Person level")
    privacy_unit_level: Literal["person", "row"] = "person"


#: The largest train.epsilon accepted without train.allow_large_epsilon. At epsilon 100 a
#: single person may shift the odds of any outcome by e^100: no meaningful guarantee.
MAX_TRAIN_EPSILON = 100.0


@dataclass(frozen=True)
class TuneConfig:
    """`personanet tune`: a private search over [train] settings, charged to the budget as
    one repeat-and-select mechanism (docs/training.md, "Tuning"). Each trial draws one value
    of each search-space list; "auto" is [train]'s rule for the trial's rows."""

    #: total epsilon of the whole search: every trial, their scores and the choice of the best
    epsilon: float = 2.0
    delta: float = 1e-5
    #: how the number of trials K is drawn (Papernot & Steinke 2022): "truncated_negative_binomial"
    #: (at least one trial) or "poisson" (draws none with probability exp(-trials_mean))
    trials: Literal["truncated_negative_binomial", "poisson"] = "truncated_negative_binomial"
    #: E[K], the expected number of trials; the search costs more as it grows (slowly)
    trials_mean: float = 2.0
    #: the truncated negative binomial's shape eta >= 0: 0 logarithmic, 1 geometric
    trials_shape: float = 0.0
    #: share of the training people held out to score the trials, by a hash of the person
    #: (the test split is never read); 0: every trial trains on all of them and is scored
    #: on them, its score's Gaussian (`score_noise_multiplier`) charged with it
    validation_fraction: float = 0.0
    #: with validation_fraction = 0: the score count's noise multiplier, per person
    score_noise_multiplier: float = 20.0
    #: search space: values to draw from, or with learning_rate_log_uniform [low, high]
    learning_rate: list[float | Auto] = field(default_factory=lambda: [0.005, 0.05])
    #: draw the learning rate log-uniformly between the two values of `learning_rate`
    learning_rate_log_uniform: bool = True
    batch_size: list[int | Auto] = field(default_factory=lambda: ["auto"])
    epochs: list[int | Auto] = field(default_factory=lambda: ["auto"])
    hidden_sizes: list[list[int] | Auto] = field(default_factory=lambda: ["auto"])
    max_grad_norm: list[float] = field(default_factory=lambda: [1.0])
    activation: list[Literal["tanh", "tempered_sigmoid", "relu"]] = field(
        default_factory=lambda: ["tanh"])
    optimizer: list[Literal["adam", "adamw", "sgd"]] = field(default_factory=lambda: ["adam"])
    #: evaluate, predict and serve use the config's tuned model (its newest) when they are
    #: not told which model, instead of the one `train` makes
    use_in_chain: bool = False


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
    tune: TuneConfig = field(default_factory=TuneConfig)
    #: the file it came from; relative sources resolve against its folder
    path: Path | None = None

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON values, as recorded in manifests."""
        if name == "columns":
            # `groups` unset is left out, so configs without it keep the hashes they had
            # before the key existed: their clean and train artifacts stay reusable.
            return {k: _jsonable({f: x for f, x in dataclasses.asdict(v).items()
                                  if not (f in _UNSET_COLUMN_KEYS
                                          and x == _UNSET_COLUMN_KEYS[f])})
                    for k, v in self.columns.items()}
        section = _jsonable(dataclasses.asdict(getattr(self, name)))
        if name == "dataset" and section.get("database") is None:
            # Files only: left out, so configs written before [dataset.database] keep their
            # hashes (and their clean and train artifacts stay reusable).
            section.pop("database", None)
        if name == "train" and self.clean.max_rows_per_unit == 1:
            # One row per person: both levels train the same way, so the key is left out and
            # configs written before it keep their hashes (their models stay reusable).
            section.pop("privacy_unit_level", None)
        if name == "train":
            for unset, default in _UNSET_TRAIN_KEYS.items():
                if section.get(unset) == default:
                    section.pop(unset)
        return section

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


#: column keys left out of `Config.section("columns")` at these values, so configs written
#: before the key existed keep their hashes (and their clean and train artifacts stay reusable)
_UNSET_COLUMN_KEYS: dict[str, Any] = {"groups": None, "shape": None, "resize": "refuse",
                                      "image_source": "path", "aliases": None,
                                      "formats": None, "decimal": ".", "thousands": ""}


#: train keys of the image model left out of `Config.section("train")` at their defaults,
#: so tabular configs written before them keep their hashes (and reusable models)
_UNSET_TRAIN_KEYS: dict[str, Any] = {
    "model": "auto", "preset": "auto", "augment": "auto", "augment_shift": 2,
    "augment_rotate": 10.0, "augment_flip": False, "augment_multiplicity": "auto",
    "validation_fraction": "auto"}


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
    "tune": TuneConfig,
}


def keys_named(name: str) -> list[str]:
    """Every ``SECTION.KEY`` whose key is `name`: ``"epsilon"`` -> train.epsilon, budget.epsilon."""
    return [f"{section}.{f.name}" for section, cls in OPTION_SECTIONS.items()
            for f in dataclasses.fields(cls) if f.name == name]
