"""Privacy units of a clean table: which person each row belongs to.

`clean` writes the privacy unit's column (an identifier) as its keyed pseudonym, so rows
of one person share a value; with ``privacy_unit = "@row"`` there is no such column and
every row is its own person. Train samples people by it (`personanet.training.units`)
and evaluate's membership audit scores people by it (`personanet.privacy.audit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from personanet.config import Config


def unit_ids(frame: pl.DataFrame, config: Config) -> np.ndarray:
    """Each row's person as an integer, 0 .. people-1 (equal for rows of one person)."""
    import numpy as np

    column = config.dataset.privacy_unit
    if column not in frame.columns:  # "@row": each row a person
        return np.arange(frame.height, dtype=np.int64)
    return frame[column].rank("dense").to_numpy().astype(np.int64) - 1
