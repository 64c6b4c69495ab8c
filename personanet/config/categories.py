"""Categorical spellings: how a source value is matched to a category, and `aliases`,
the other spellings a config declares for its categories.

A value matches a category when both fold alike (`fold_text`: trimmed, Unicode NFC,
then the column's `case`); an alias is one more spelling that folds to its category,
checked here so that no spelling can mean two categories.
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
