"""Typed errors, one per exit code of the command line (sysexits; README.md, "Exit codes").

Library code raises these; only the CLI turns them into an exit status and a
one-line message. Messages say what is wrong and how to fix it, in one line.
"""

from __future__ import annotations

from typing import Any


class PersonaNetError(Exception):
    """Base class: an error the user can act on. Never shown with a traceback.

    `payload` carries what the command did produce before failing (an evaluate
    report whose gate failed, the stages `run` finished); `--json` prints it
    with the error.
    """

    exit_code: int = 70

    def __init__(self, message: str, *, payload: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.payload = payload or {}


class UsageError(PersonaNetError):
    """The command line itself is wrong (exit 2)."""

    exit_code = 2


class BadInputError(PersonaNetError):
    """Input data is malformed, tampered with or inconsistent (exit 65)."""

    exit_code = 65


class IntegrityError(BadInputError):
    """An encrypted file or an artifact failed authentication or its checksum (exit 65)."""


class InputMissingError(PersonaNetError):
    """An input file or artifact does not exist (exit 66)."""

    exit_code = 66


class BudgetExhaustedError(PersonaNetError):
    """The privacy budget would be exceeded (exit 69)."""

    exit_code = 69


class GateFailedError(PersonaNetError):
    """A quality or privacy gate from the config was missed (exit 69)."""

    exit_code = 69


class InternalError(PersonaNetError):
    """A bug or an unfinished feature (exit 70)."""

    exit_code = 70


class OutputError(PersonaNetError):
    """An output cannot be created (exit 73)."""

    exit_code = 73


class LockBusyError(PersonaNetError):
    """Another writer holds the artifact root; retry later (exit 75)."""

    exit_code = 75


class KeyAccessError(PersonaNetError):
    """Key material is missing, malformed, wrong, or unreadable (exit 77)."""

    exit_code = 77


class ConfigError(PersonaNetError):
    """The configuration is invalid (exit 78)."""

    exit_code = 78
