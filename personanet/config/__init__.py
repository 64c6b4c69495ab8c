"""The TOML config of a dataset and its pipeline: typed sections, strict validation.

- `schema`: one frozen dataclass per section, every key's default and meaning;
  `Config.section()` is what manifests record.
- `loading`: TOML text and ``--set`` overrides into those dataclasses, each value
  checked against its type.
- `validation`: the rules that need more than one key (bounds against types,
  the target and privacy unit against the columns, ranges).

Every error names the key and the fix (exit 78). Import from here:
``from personanet.config import Config, load_config``.
"""

from personanet.config.loading import apply_override, load_config, parse_config
from personanet.config.schema import (
    AUTO,
    COLUMN_TYPES,
    DATASET_NAME,
    IMPUTE_RULES,
    MAX_TRAIN_EPSILON,
    ROLES,
    ROW_UNIT,
    Auto,
    BudgetConfig,
    CleanConfig,
    ColumnConfig,
    ColumnType,
    Config,
    DatabaseConfig,
    DatasetConfig,
    EvaluateConfig,
    PredictConfig,
    Role,
    SourceConfig,
    TrainConfig,
    canonical_json,
    keys_named,
)

__all__ = [
    "AUTO", "COLUMN_TYPES", "DATASET_NAME", "IMPUTE_RULES", "MAX_TRAIN_EPSILON", "ROLES",
    "ROW_UNIT", "Auto", "BudgetConfig", "CleanConfig", "ColumnConfig", "ColumnType", "Config",
    "DatabaseConfig", "DatasetConfig", "EvaluateConfig", "PredictConfig", "Role", "SourceConfig",
    "TrainConfig",
    "apply_override", "canonical_json", "keys_named", "load_config", "parse_config",
]
