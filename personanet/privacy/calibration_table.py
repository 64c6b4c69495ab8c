"""Calibration table: the noise found for past plans, kept on disk so that a new process
can skip the search (`personanet.privacy.accounting.calibrate_noise`).

A plan is public numbers only (accountant, target epsilon, delta, sample rate, steps)
and its answer is a noise multiplier, the accountant that certified it and the notes
the search logged: nothing about any person. The table is a small JSON file, by default
``<artifact root>/.cache/calibration.json`` (`train` turns it on for its root), written
whole and atomically (`personanet.store.fsutil.atomic_write_bytes`), so a crash or two
writers leave the old table or the new one, never half of either.

It is never trusted for more than speed: `calibrate_noise` re-checks a remembered noise
with one accountant evaluation (epsilon at most the target, and within the search's own
tolerance of it, so a noise larger than needed is not taken either), which costs one
evaluation where the search costs a dozen. Anything unreadable, edited or from another
Opacus version is a miss, and the search runs as if there were no table.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("personanet")

#: the file under an artifact root
TABLE_NAME = ".cache/calibration.json"
#: the format of the file; another one is ignored (and replaced on the next write)
FORMAT = 1
#: entries kept (the most recent), so the file stays a few kilobytes
KEPT = 256

Plan = tuple[str, float, float, float, int]
Answer = tuple[float, str, tuple[str, ...]]


@dataclass(frozen=True)
class _Table:
    path: Path
    writable: bool


_ACTIVE: contextvars.ContextVar[_Table | None] = contextvars.ContextVar(
    "personanet_calibration_table", default=None)


@contextlib.contextmanager
def calibration_table(path: Path | None, *, writable: bool = True) -> Iterator[None]:
    """Use the table at `path` (None: none) for the calibrations inside the block.

    `writable` False reads it without ever writing (the non-writing ranks of a run in
    several processes).
    """
    token = _ACTIVE.set(None if path is None else _Table(Path(path), writable))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def plan_key(plan: Plan) -> str:
    """The plan as text, floats by ``repr`` (which reads back to the same float), with
    the Opacus version whose accountants answered it."""
    from opacus import __version__ as opacus_version

    accountant, epsilon, delta, sample_rate, steps = plan
    return (f"opacus {opacus_version}|{accountant}|{float(epsilon)!r}|{float(delta)!r}|"
            f"{float(sample_rate)!r}|{int(steps)}")


def recall(plan: Plan) -> Answer | None:
    """The remembered answer for `plan`, unchecked (the caller checks), or None."""
    table = _ACTIVE.get()
    if table is None:
        return None
    entry = _read(table.path).get(plan_key(plan))
    try:
        sigma, used, notes = float(entry["sigma"]), str(entry["accountant"]), entry["notes"]
    except (TypeError, KeyError, ValueError):
        return None
    if not isinstance(notes, list):
        return None
    return sigma, used, tuple(str(note) for note in notes)


def remember(plan: Plan, answer: Answer) -> None:
    """Add `plan`'s answer to the table; a table that cannot be written is skipped (it
    only ever saves time)."""
    from personanet.errors import OutputError
    from personanet.store.fsutil import atomic_write_bytes

    table = _ACTIVE.get()
    if table is None or not table.writable:
        return
    entries = _read(table.path)
    key = plan_key(plan)
    entries.pop(key, None)
    sigma, used, notes = answer
    entries[key] = {"sigma": sigma, "accountant": used, "notes": list(notes)}
    kept = dict(list(entries.items())[-KEPT:])
    data = json.dumps({"format": FORMAT, "calibrations": kept}, indent=1).encode()
    try:
        table.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(table.path, data)
    except (OSError, OutputError) as exc:
        logger.debug("calibration table %s not written: %s", table.path, exc)


def _read(path: Path) -> dict[str, dict]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        return {}
    entries = content.get("calibrations")
    return {k: v for k, v in entries.items() if isinstance(v, dict)} \
        if isinstance(entries, dict) else {}
