"""How a column's text is read: categorical spellings and datetime formats.

A value matches a category when both fold alike (`fold_text`: trimmed, Unicode NFC,
then the column's `case`); an alias is one more spelling that folds to its category,
checked here so that no spelling can mean two categories. A datetime column may name
its own strptime `formats` (a regional export's "31/12/2025 14:05"), checked here to
be formats at all.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

from personanet.errors import ConfigError

if TYPE_CHECKING:
    from personanet.config.schema import ColumnConfig


def fold_text(value: str, case: str) -> str:
    """A categorical value as matched: trimmed, Unicode NFC, case-folded as configured."""
    text = unicodedata.normalize("NFC", value.strip())
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    return text


def checked_aliases(col: ColumnConfig, categories: tuple[str, ...] | None,
                    where: str) -> dict[str, str]:
    """`aliases` checked: a table of spellings, each naming one of the categories, none
    matching (after trim, NFC and `case`) a category or another alias of another one."""
    if col.kind != "categorical" or categories is None:
        raise ConfigError(f"{where}.aliases only applies to categorical columns with "
                          "categories")
    if not isinstance(col.aliases, dict) or not col.aliases:
        raise ConfigError(f"{where}.aliases must be a table of spelling = category, e.g. "
                          "{\">50K.\" = \">50K\"}")
    meaning = {fold_text(c, col.case): c for c in categories}
    out: dict[str, str] = {}
    for spelling, category in col.aliases.items():
        if not isinstance(category, str) or category not in categories:
            raise ConfigError(f"{where}.aliases: {spelling!r} names {category!r}, which is not "
                              "one of its categories")
        folded = fold_text(str(spelling), col.case)
        if not folded:
            raise ConfigError(f"{where}.aliases: a blank spelling is a missing value, not "
                              "an alias")
        if meaning.setdefault(folded, category) != category:
            raise ConfigError(f"{where}.aliases: {spelling!r} already means "
                              f"{meaning[folded]!r} (a category or another alias)")
        out[str(spelling)] = category
    return out


def checked_formats(col: ColumnConfig, where: str) -> tuple[str, ...]:
    """`formats` checked: a non-empty list of strptime formats, for a datetime column."""
    if col.kind != "datetime":
        raise ConfigError(f"{where}.formats only applies to datetime columns")
    formats = tuple(str(f) for f in col.formats or ())
    if not formats:
        raise ConfigError(f"{where}.formats is empty: list strptime formats, e.g. "
                          "[\"%d/%m/%Y %H:%M\"], or leave it out for ISO 8601")
    for fmt in formats:
        if "%" not in fmt:
            raise ConfigError(f"{where}.formats: {fmt!r} is not a strptime format (e.g. "
                              "\"%d/%m/%Y\")")
    return formats
