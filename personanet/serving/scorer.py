"""The scorer: one loaded model that scores JSON records exactly as `predict` does.

A `Scorer` holds a model, its encoder, the config and the pseudonym key; `score`
turns records (dicts of column -> scalar) into the rows of predict's output:
clean's per-row rules (`personanet.cleaning.rows.prepare_rows`), identifiers as
pseudonyms, the family's forward (`personanet.models.predict_frame`). Which model
to serve is `select_model`'s business: the config chain's model that passed
evaluate's gates, or a named version; a non-private one only when allowed.

An image column's value in a record is the image file itself (PNG, JPEG or NPY) as
base64 text (RFC 4648; a `data:` URL prefix is allowed), whatever the column's
`image_source`: the server never opens a path a request names. The bytes are decoded
by clean's image rules (`personanet.cleaning.images`: shape, resize policy, 8-bit,
mode, constant image, the decompression-bomb bound), so text that is not base64 is
`undecodable_image` and a 27x28 digit `wrong_size`, named by column, never echoed.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Any

from personanet.config import Config
from personanet.errors import GateFailedError, InputMissingError
from personanet.privacy.record import PrivacyRecord
from personanet.sources.images import UNDECODABLE_IMAGE, status_column
from personanet.stages.base import check_plain_files, require_key
from personanet.stages.files import METRICS, PRIVACY
from personanet.stages.lineage import resolve_chain
from personanet.store.artifacts import Artifact, ArtifactStore
from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")

#: JSON scalars a record's value may be; anything nested is a validation error
SCALARS = (str, int, float, bool, type(None))


class NotPrivateError(GateFailedError):
    """A model trained with --no-dp, refused without --allow-no-dp: exit 69, like a failed
    gate, since it is the same verdict (this model must not be promoted to serve people)."""


class RecordError(ValueError):
    """A request's records break a rule; `problems` name row, column and rule, no value."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"row {p['row']}: {p['column']}: {p['rule']}"
                                   for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class ModelInfo:
    """What `GET /v1/model` shows: the served model and the evaluation that let it serve."""

    version: str
    private: bool
    epsilon: float | None
    delta: float | None
    evaluation: str | None
    gates_passed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "private": self.private, "epsilon": self.epsilon,
                "delta": self.delta, "evaluation": self.evaluation,
                "gates_passed": self.gates_passed}


def passing_evaluation(store: ArtifactStore, model: Artifact) -> Artifact | None:
    """The newest evaluate artifact of `model` whose gates all passed, else None."""
    for artifact in reversed(store.versions("evaluate")):
        named = any(i.get("stage") == "train" and i.get("version") == model.version
                    for i in artifact.manifest.get("inputs", []))
        if named and not artifact.figures.get("gates_failed"):
            return store.checked(artifact)
    return None


def select_model(config: Config, store: ArtifactStore, key: MasterKey, *,
                 version: str | None = None, allow_no_dp: bool = False
                 ) -> tuple[Artifact, ModelInfo]:
    """The model to serve and what `GET /v1/model` says of it.

    Without `version`: the config chain's model (`resolve_chain`), and only once an
    evaluation of it passed every gate (else GateFailedError, 69). With `version`:
    that model, gated or not (its evaluation, if any, is reported). A model trained
    without privacy is refused (NotPrivateError, 69) unless `allow_no_dp`.
    """
    require_key(store, key)
    if version:
        model = store.get("train", version)
        evaluation = passing_evaluation(store, model)
    else:
        model = resolve_chain(config, store)["train"]
        if model is None:
            raise InputMissingError("serve: the current config's chain has no model yet: run "
                                    "`personanet run`, or pick one with --model VERSION")
        evaluation = passing_evaluation(store, model)
        if evaluation is None:
            raise GateFailedError(f"serve: model {model.version} has no evaluation that passed "
                                  "every gate: run `personanet evaluate`, or pick a model with "
                                  "--model VERSION")
    check_plain_files(model)
    privacy = PrivacyRecord.read(model.file(PRIVACY))
    if not privacy.private and not allow_no_dp:
        raise NotPrivateError(f"serve: model {model.version} was trained without differential "
                              "privacy (--no-dp); its scores carry no privacy guarantee: serve "
                              "a private model, or pass --allow-no-dp")
    return model, ModelInfo(version=model.version, private=privacy.private,
                            epsilon=privacy.epsilon, delta=privacy.delta,
                            evaluation=evaluation.version if evaluation else None,
                            gates_passed=_gates_passed(evaluation))


def _gates_passed(evaluation: Artifact | None) -> list[str]:
    import json

    if evaluation is None:
        return []
    check_plain_files(evaluation)
    metrics = json.loads(evaluation.file(METRICS).read_text(encoding="utf-8"))
    return [g["name"] for g in metrics.get("gates", []) if g.get("passed") is True]


class Scorer:
    """A loaded model scoring records with predict's per-row rules; safe to share between
    threads (scoring only reads the model)."""

    def __init__(self, config: Config, model_artifact: Artifact, info: ModelInfo,
                 key: MasterKey) -> None:
        from personanet.models import load_model
        from personanet.privacy.pseudonym import pseudonym_key

        self.config = config
        self.info = info
        self.model, self.encoder = load_model(model_artifact.path)
        self.model.eval()
        self._pseudonym_key = pseudonym_key(key)
        self._identifiers = [c.name for c in config.identifiers()]
        self._images = [name for name, c in config.columns.items() if c.kind == "image"]

    def score(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """predict's output rows for `records` (row, pseudonymous identifiers, prediction,
        probabilities, model_version), in input order. Raises RecordError (422) when a
        record breaks a rule: every row is scored, or none."""
        import polars as pl

        from personanet.cleaning.rows import prepare_rows
        from personanet.errors import BadInputError
        from personanet.models import predict_frame

        texts = self._text_columns(records)
        schema = {name: pl.Binary if name in self._images else pl.String
                  for name in self.config.columns}
        images: dict[str, list[bytes | None]] = {}
        for name in self._images:
            # As collect reads a manifest: the bytes, and beside them why there are none.
            images[name], texts[status_column(name)] = _image_bytes(texts.pop(name))
            schema[status_column(name)] = pl.String
        frame = pl.DataFrame({**texts, **images}, schema=schema)
        try:
            prepared = prepare_rows(frame, self.config, self._pseudonym_key,
                                    require_target=False)
        except BadInputError as exc:
            raise RecordError([{"row": None, "column": None, "rule": str(exc)}]) from None
        if prepared.quarantine.height:
            raise RecordError([{"row": r["row"], "column": r["column"], "rule": r["reason"]}
                               for r in prepared.quarantine.iter_rows(named=True)])
        scored = predict_frame(self.model, self.encoder, prepared.frame,
                               batch_size=prepared.frame.height or 1)
        idents = prepared.frame.select([c for c in self._identifiers
                                        if c in prepared.frame.columns]).to_dicts()
        classes = self.encoder.target_classes if self.encoder.task != "regression" else []
        out = []
        for i, row in enumerate(prepared.rows.to_list()):
            item: dict[str, Any] = {"row": row, **idents[i]}
            if classes:
                item["prediction"] = classes[int(scored[i].argmax())]
                item.update({f"proba_{c}": float(scored[i][j]) for j, c in enumerate(classes)})
            else:
                item["prediction"] = float(scored[i])
            item["model_version"] = self.info.version
            out.append(item)
        return out

    def _text_columns(self, records: list[dict[str, Any]]) -> dict[str, list[str | None]]:
        """The records as text columns, as predict reads a file: every configured column
        (absent means missing), other keys dropped unread, JSON scalars as their text."""
        problems = []
        columns: dict[str, list[str | None]] = {name: [] for name in self.config.columns}
        for row, record in enumerate(records):
            if not isinstance(record, dict):
                problems.append({"row": row, "column": None, "rule": "a record is a JSON object"})
                continue
            for name, values in columns.items():
                value = record.get(name)
                if not isinstance(value, SCALARS):
                    problems.append({"row": row, "column": name,
                                     "rule": "a value is a JSON string, number, boolean or null"})
                    value = None
                values.append(_as_text(value))
        if problems:
            raise RecordError(problems)
        return columns


def _as_text(value: str | int | float | bool | None) -> str | None:
    """A JSON scalar as the text a CSV cell would hold (42 -> "42", true -> "true")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _image_bytes(texts: list[str | None]) -> tuple[list[bytes | None], list[str | None]]:
    """Each image's file bytes from its base64 text, and `undecodable_image` where the text
    is not base64 (null, empty: a missing image, which clean's rules name as such)."""
    data: list[bytes | None] = []
    status: list[str | None] = []
    for text in texts:
        text = (text or "").strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data.append(base64.b64decode(text, validate=True) if text else None)
            status.append(None)
        except (binascii.Error, ValueError):
            data.append(None)
            status.append(UNDECODABLE_IMAGE)
    return data, status
