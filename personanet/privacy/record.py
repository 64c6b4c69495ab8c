"""The privacy record: a trained model's privacy claim, ``privacy.json`` in its artifact.

`train` writes one per model; `evaluate` and `predict` read it back. It holds the public
parameters of the run's DP-SGD (noise multiplier, sample rate, steps, and every phase the
accountant composed), so anyone can recompute the epsilon it states with
`personanet.privacy.accounting.compute_epsilon`. A ``--no-dp`` model's record says
``private: false`` with no epsilon, and a note that no guarantee covers it.

The file is plain JSON (sorted keys, 2-space indent), authenticated by the artifact's
sealed manifest. Format ``personanet.privacy/1``; its keys are exactly the fields below,
except that the last five are written only for the kind of run they describe
(``unit_level`` only when a person may have more than one row: a reader that does not
know it reads the rest unchanged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personanet.errors import BadInputError

PRIVACY_FORMAT = "personanet.privacy/1"

#: what a ``--no-dp`` model's record says instead of an epsilon
NON_PRIVATE_NOTE = "trained without differential privacy (--no-dp): no privacy guarantee"


@dataclass(frozen=True)
class PrivacyRecord:
    """One model's privacy claim and the public parameters that back it.

    Attributes:
        private: trained with DP-SGD; False for a ``--no-dp`` comparison model.
        accountant: "prv" or "rdp", the accountant that certified `epsilon`.
        epsilon, delta: the guarantee: (epsilon, delta)-DP for one privacy unit.
        target_epsilon: the epsilon the config asked for (`epsilon` is at most this).
        noise_multiplier: Gaussian noise standard deviation over the clipping norm.
        sample_rate: the probability that one unit's examples are in a batch (Poisson).
        steps: optimisation steps taken, each a noisy gradient release.
        max_grad_norm: the per-example clipping norm C.
        batch_size: the configured batch size (None in records older than the key).
        auto_settings: what the "auto" settings resolved to (empty when none was auto,
            and in records older than the key).
        grad_sample_mode: how per-example gradients were clipped ("ghost-bookkeeping", ...).
        secure_rng: whether the noise came from a cryptographically secure generator
            (private runs only).
        privacy_unit: the column naming the person the guarantee protects (private only).
        accountant_history: the (noise multiplier, sample rate, steps) phases composed
            (private only); `epsilon` is the accountant's answer for them.
        note: why a non-private model carries no guarantee (non-private only).
        unit_level: private runs with k = ``clean.max_rows_per_unit`` > 1 only: ``level``
            "person" (epsilon is per person; ``rows_per_unit``, ``people``,
            ``expected_people_per_batch``) or "row" (epsilon is per row;
            ``person_epsilon`` and ``person_delta`` are the person's, by group privacy).
    """

    private: bool
    accountant: str | None
    epsilon: float | None
    delta: float | None
    target_epsilon: float | None
    noise_multiplier: float | None
    sample_rate: float
    steps: int
    epochs: int
    max_grad_norm: float | None
    batch_size: int | None
    auto_settings: dict[str, Any]
    expected_batch_size: float
    poisson_sampling: bool
    grad_sample_mode: str | None
    run_id: str
    secure_rng: bool | None = None
    privacy_unit: str | None = None
    accountant_history: list[tuple[float, float, int]] | None = None
    note: str | None = None
    unit_level: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The document ``privacy.json`` holds (the file is it, dumped with sorted keys)."""
        doc: dict[str, Any] = {
            "format": PRIVACY_FORMAT, "private": self.private, "accountant": self.accountant,
            "epsilon": self.epsilon, "delta": self.delta, "target_epsilon": self.target_epsilon,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "steps": self.steps, "epochs": self.epochs, "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size, "auto_settings": self.auto_settings,
            "expected_batch_size": self.expected_batch_size,
            "poisson_sampling": self.poisson_sampling,
            "grad_sample_mode": self.grad_sample_mode, "run_id": self.run_id,
        }
        if self.private:
            doc.update(secure_rng=self.secure_rng, privacy_unit=self.privacy_unit,
                       accountant_history=[list(phase)
                                           for phase in self.accountant_history or []])
        else:
            doc["note"] = self.note
        if self.unit_level is not None:
            doc["unit_level"] = self.unit_level
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> PrivacyRecord:
        """The record in a parsed ``privacy.json``.

        Raises:
            BadInputError: (65) not a privacy record of a format this version reads.
        """
        if not isinstance(doc, dict) or doc.get("format") != PRIVACY_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise BadInputError(f"not a privacy record of format {PRIVACY_FORMAT} (found "
                                f"{found!r}): written by another personanet version?")
        history = doc.get("accountant_history")
        try:
            return cls(
                private=bool(doc["private"]), accountant=doc.get("accountant"),
                epsilon=doc.get("epsilon"), delta=doc.get("delta"),
                target_epsilon=doc.get("target_epsilon"),
                noise_multiplier=doc.get("noise_multiplier"), sample_rate=doc["sample_rate"],
                steps=doc["steps"], epochs=doc["epochs"],
                max_grad_norm=doc.get("max_grad_norm"), batch_size=doc.get("batch_size"),
                auto_settings=dict(doc.get("auto_settings") or {}),
                expected_batch_size=doc["expected_batch_size"],
                poisson_sampling=bool(doc.get("poisson_sampling", True)),
                grad_sample_mode=doc.get("grad_sample_mode"), run_id=doc["run_id"],
                secure_rng=doc.get("secure_rng"), privacy_unit=doc.get("privacy_unit"),
                accountant_history=([tuple(phase) for phase in history]
                                    if history is not None else None),
                note=doc.get("note"), unit_level=doc.get("unit_level"))
        except KeyError as missing:
            raise BadInputError(f"privacy record lacks {missing}: damaged or edited") from None

    @classmethod
    def read(cls, path: Path) -> PrivacyRecord:
        """The record in the ``privacy.json`` at `path`.

        Raises:
            BadInputError: (65) the file is not JSON or not a privacy record.
        """
        try:
            doc = json.loads(Path(path).read_text("utf-8"))
        except ValueError:
            raise BadInputError(f"{path} is not a privacy record (not JSON)") from None
        try:
            return cls.from_json(doc)
        except BadInputError as exc:
            raise BadInputError(f"{path}: {exc}") from None
