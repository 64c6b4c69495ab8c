"""Reading a config: TOML text and ``--set`` overrides into typed, checked sections.

`load_config` reads the file, applies the overrides to the parsed document and
hands it to `parse_config`, which builds each section's dataclass from its table
(`_coerce` checks every value against the field's type hint) and then runs the
rules of `personanet.config.validation`. Unknown keys are errors, and every
error names the key and the fix (exit 78).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from personanet.config.schema import (
    DATASET_NAME,
    BudgetConfig,
    CleanConfig,
    ColumnConfig,
    Config,
    DatabaseConfig,
    DatasetConfig,
    EvaluateConfig,
    PredictConfig,
    SourceConfig,
    TrainConfig,
    TuneConfig,
)
from personanet.config.validation import check_cross_references, normalise_column, resolve_target
from personanet.errors import ConfigError


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
    if "database" in ds_raw:
        ds_raw["database"] = _build(DatabaseConfig, _table(ds_raw["database"], "dataset.database"),
                                    "dataset.database")
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
    columns = {name: normalise_column(col) for name, col in columns.items()}
    columns = resolve_target(columns, dataset.target)
    sections: dict[str, Any] = {}
    for name, cls in (("clean", CleanConfig), ("train", TrainConfig), ("budget", BudgetConfig),
                      ("evaluate", EvaluateConfig), ("predict", PredictConfig),
                      ("source", SourceConfig), ("tune", TuneConfig)):
        sections[name] = _build(cls, _table(raw.get(name, {}), name), name)
    config = Config(dataset=dataset, columns=columns, path=path, **sections)
    check_cross_references(config)
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
