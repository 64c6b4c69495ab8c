"""Image columns' keys: what a `type = "image"` column may say, and what it may not be.

An image column (`shape`, `resize`, `image_source`) is a feature a model sees, or
ignored: never an identifier, the target, the privacy unit, a dedupe or split key,
nor a fairness group, and never given bounds, categories or an imputed value (a row
without a valid image is quarantined with its reason). Each error names the key and
the fix (exit 78).
"""

from __future__ import annotations

from personanet.config.schema import ColumnConfig, Config
from personanet.errors import ConfigError

#: the image keys and their values when unset
IMAGE_KEYS = (("shape", None), ("resize", "refuse"), ("image_source", "path"))
#: the largest image a column may promise (height x width)
MAX_SHAPE_PIXELS = 4096 * 4096


def check_image_column(col: ColumnConfig, where: str) -> None:
    """An image column's keys; image keys on any other column are refused."""
    if col.kind != "image":
        for key, unset in IMAGE_KEYS:
            if getattr(col, key) != unset:
                raise ConfigError(f"{where}.{key} only applies to type = \"image\" columns")
        return
    if col.shape is None:
        raise ConfigError(f"{where} is an image column without shape: add shape = [height, "
                          "width, channels], e.g. [28, 28, 1] for grey or [32, 32, 3] for RGB")
    if len(col.shape) != 3 or any(n < 1 for n in col.shape) or col.shape[2] not in (1, 3):
        raise ConfigError(f"{where}.shape must be [height, width, channels] with positive sizes "
                          f"and 1 (grey) or 3 (RGB) channels, got {list(col.shape)}")
    if col.shape[0] * col.shape[1] > MAX_SHAPE_PIXELS:
        raise ConfigError(f"{where}.shape {list(col.shape)} is larger than 4096 x 4096 pixels")
    if col.role not in ("feature", "ignore"):
        raise ConfigError(f"{where} is an image: its role must be \"feature\" (or \"ignore\"), "
                          f"not {col.role!r}")
    if col.sensitive:
        raise ConfigError(f"{where} is an image, never a fairness group: set sensitive = false")
    for key in ("bounds", "categories", "groups", "impute"):
        if getattr(col, key) is not None:
            raise ConfigError(f"{where}.{key} does not apply to an image column (a row without "
                              "a valid image is quarantined with its reason)")
    if col.missing_indicator:
        raise ConfigError(f"{where}.missing_indicator does not apply to an image column")


def check_image_references(config: Config) -> None:
    """No image column as the privacy unit, split, timestamp or dedupe key."""
    clean = config.clean
    for key, name in (("dataset.privacy_unit", config.dataset.privacy_unit),
                      ("clean.split_column", clean.split_column),
                      ("clean.timestamp_column", clean.timestamp_column),
                      *(("clean.dedupe_key", n) for n in clean.dedupe_key or [])):
        column = config.columns.get(name or "")
        if column is not None and column.kind == "image":
            raise ConfigError(f"{key} names {name!r}, an image column: name a text column")
