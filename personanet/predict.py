"""predict: score new records with a trained model, in streamed batches.

Each batch of raw records goes through clean's per-row rules (types, bounds,
imputation, pseudonymization) and the model's own saved encoder, then the
model. Output rows carry the pseudonym, never the raw identifier. Rows that
cannot be scored go to a reject file with the reason: rows in = scored +
rejected, always. Outputs are encrypted; a plaintext copy is written only
when the user asks for one explicitly (`--output PATH --plaintext-output`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet import crypto, tables
from personanet.artifacts import Artifact, ArtifactStore, sha256_file
from personanet.config import Config
from personanet.errors import BadInputError, InternalError, OutputError
from personanet.stage import StageResult, find_reusable, fingerprint
from personanet.ui import progress

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("personanet")

PREDICTIONS = "predictions.csv.enc"
REJECTS = "rejects.csv.enc"


@dataclass
class PredictReport:
    """predict's figures: manifest, --json and the summary show this same object."""

    rows_in: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    model_version: str = ""
    model_private: bool = True
    input: str = ""
    device: str = "cpu"
    batches: int = 0


def predict(config: Config, store: ArtifactStore, key: crypto.MasterKey, *,
            source: str | None = None, clean_version: str | None = None,
            model_version: str | None = None, output: Path | None = None,
            plaintext_output: bool = False, device: str | None = None,
            force: bool = False) -> StageResult:
    """Score a file (`source`, default `predict.source`) or a clean artifact's test split.

    `output` also writes the predictions there: encrypted (the same format as
    the artifact) unless `plaintext_output`, since predictions are about people.
    """
    # One writer per artifact root for the whole stage: a second identical command waits
    # (then reuses the first one's artifact) instead of redoing the work, which for
    # train would charge the privacy budget twice.
    with store.lock():
        return _predict_locked(config, store, key, source=source, clean_version=clean_version,
                                model_version=model_version, output=output,
                                plaintext_output=plaintext_output, device=device, force=force)


def _predict_locked(config: Config, store: ArtifactStore, key: crypto.MasterKey, *,
                    source: str | None = None, clean_version: str | None = None,
                    model_version: str | None = None, output: Path | None = None,
                    plaintext_output: bool = False, device: str | None = None,
                    force: bool = False) -> StageResult:
    """The stage itself, under the root's lock."""
    if plaintext_output and output is None:
        from personanet.errors import UsageError

        raise UsageError("--plaintext-output needs --output PATH")
    model_artifact = store.get("train", model_version)
    privacy = json.loads(model_artifact.file("privacy.json").read_text("utf-8"))
    warnings = []
    if not privacy.get("private"):
        warnings.append(f"model {model_artifact.version} was trained without differential "
                        "privacy (--no-dp): its predictions carry no privacy guarantee")
        log.warning(warnings[-1])

    clean_artifact = store.get("clean", clean_version) if clean_version else None
    source_path = None if clean_artifact else _source_path(config, source)
    identity = ({"clean": clean_artifact.version} if clean_artifact
                else {"sha256": sha256_file(source_path), "bytes": source_path.stat().st_size})
    fp = fingerprint("predict", model=model_artifact.version, input=identity,
                     config=config.section_hash("columns", "clean"))
    reusable = find_reusable(store, "predict", fp, force=force)
    if reusable:
        log.info("predict: reusing %s", reusable.version)
        if output is not None:
            _export(reusable.path / PREDICTIONS, output, key, plaintext=plaintext_output)
        return dataclasses.replace(reusable, warnings=warnings)

    from personanet.model import load_model
    from personanet.pseudonym import pseudonym_key
    from personanet.train import resolve_device

    model, encoder = load_model(model_artifact.path)
    torch_device = resolve_device(device or config.train.device)
    model.to(torch_device)
    report = PredictReport(model_version=model_artifact.version,
                           model_private=bool(privacy.get("private")), device=str(torch_device),
                           input=f"clean:{clean_artifact.version}" if clean_artifact
                           else str(source_path))
    inputs: list[dict[str, Any]] = [model_artifact.as_input()]
    inputs.append(clean_artifact.as_input() if clean_artifact
                  else {"source": [{"path": str(source_path), **identity}]})
    with store.lock(), store.create(
        "predict", fingerprint=fp, inputs=inputs,
        config={"columns": config.section("columns"), "predict": config.section("predict")},
        config_hash=config.section_hash("columns", "clean"),
    ) as writer:
        batches = (_clean_batches(clean_artifact, key, config.predict.batch_size) if clean_artifact
                   else _file_batches(source_path, config, key, config.predict.batch_size))
        with open(writer.path(PREDICTIONS), "wb") as pred_fh, \
                open(writer.path(REJECTS), "wb") as rej_fh, \
                crypto.EncryptingWriter(pred_fh, key) as pred_out, \
                crypto.EncryptingWriter(rej_fh, key) as rej_out:
            _score(batches, model, encoder, config, report, pred_out, rej_out,
                   pseudonym_key=pseudonym_key(key))
        writer.add(PREDICTIONS, rows=report.rows_scored, encrypted=True, key_id=key.key_id)
        writer.add(REJECTS, rows=report.rows_rejected, encrypted=True, key_id=key.key_id)
        writer.figures = asdict(report)
        if not report.model_private:
            writer.figures["warning"] = warnings[0]
        artifact = writer.commit()
    log.info("predict: %d scored, %d rejected -> %s", report.rows_scored, report.rows_rejected,
             artifact.version)
    if output is not None:
        _export(artifact.path / PREDICTIONS, output, key, plaintext=plaintext_output)
    return StageResult.of(artifact, reused=False, warnings=warnings)


# ----------------------------------------------------------------------- inputs


@dataclass
class _Batch:
    """Records to score; `prepared` says whether clean's rules were already applied."""

    frame: Any
    offset: int
    prepared: bool


def _source_path(config: Config, source: str | None) -> Path:
    if source is not None:
        paths = tables.resolve_sources([source], base=Path.cwd())
    elif config.predict.source:
        paths = tables.resolve_sources([config.predict.source], base=config.base_dir)
    else:
        from personanet.errors import InputMissingError

        raise InputMissingError("nothing to score: pass --input FILE or --clean VERSION, or set "
                                "predict.source in the config")
    if len(paths) != 1:
        raise BadInputError(f"predict scores one file at a time; {source!r} matches {len(paths)}")
    return paths[0]


def _file_batches(path: Path, config: Config, key: crypto.MasterKey, batch_size: int
                  ) -> Iterator[_Batch]:
    """Stream a CSV/Parquet/NDJSON file in batches of text columns (flat memory)."""
    import polars as pl

    fmt = tables.source_format(path)
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the file is empty")
    if fmt == "csv":
        lazy = pl.scan_csv(path, infer_schema=False)
    elif fmt == "parquet":
        lazy = pl.scan_parquet(path)
    else:
        lazy = pl.scan_ndjson(path, infer_schema_length=None)
    offset = 0
    try:
        for frame in lazy.collect_batches(chunk_size=batch_size):
            yield _Batch(frame.with_columns(pl.all().cast(pl.String)), offset, prepared=False)
            offset += frame.height
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BadInputError(f"{path}: cannot read as {fmt}: {first}") from exc
    if offset == 0:
        raise BadInputError(f"{path}: no records to score (only a header?)")


def _clean_batches(artifact: Artifact, key: crypto.MasterKey, batch_size: int
                   ) -> Iterator[_Batch]:
    """A clean artifact's test split is already clean: no rules are applied twice."""
    frame = tables.read_artifact_table(artifact, "test.parquet.enc", key)
    for offset in range(0, frame.height, batch_size):
        yield _Batch(frame.slice(offset, batch_size), offset, prepared=True)


# ----------------------------------------------------------------------- scoring


def _score(batches: Iterator[_Batch], model: Any, encoder: Any, config: Config,
           report: PredictReport, pred_out: crypto.EncryptingWriter,
           rej_out: crypto.EncryptingWriter, *, pseudonym_key: bytes) -> None:
    """Score every batch, writing predictions and rejects as they come (flat memory)."""
    import polars as pl

    from personanet.clean import prepare_rows
    from personanet.model import predict_frame

    identifiers = [c.name for c in config.identifiers()]
    classes = encoder.target_classes if encoder.task != "regression" else []
    reasons: Counter[str] = Counter()
    first = True
    with progress("scoring", None) as advance:
        for batch in batches:
            report.batches += 1
            report.rows_in += batch.frame.height
            if batch.prepared:
                frame = batch.frame
                rows = pl.Series("row", range(batch.offset, batch.offset + frame.height),
                                 dtype=pl.UInt64)
                rejects = pl.DataFrame(schema={"row": pl.UInt64, "column": pl.String,
                                               "reason": pl.String})
            else:
                prepared = prepare_rows(batch.frame, config, pseudonym_key, require_target=False)
                frame, rows = prepared.frame, prepared.rows + batch.offset
                rejects = prepared.quarantine.with_columns(pl.col("row") + batch.offset)
            scored = predict_frame(model, encoder, frame, batch_size=len(frame) or 1)
            out = frame.select([c for c in identifiers if c in frame.columns])
            out = out.insert_column(0, rows.alias("row"))
            if encoder.task == "regression":
                out = out.with_columns(pl.Series("prediction", scored))
            else:
                labels = [classes[i] for i in scored.argmax(axis=1)] if len(scored) else []
                out = out.with_columns(pl.Series("prediction", labels, dtype=pl.String),
                                       *[pl.Series(f"proba_{c}", scored[:, i])
                                         for i, c in enumerate(classes)])
            out = out.with_columns(pl.lit(report.model_version).alias("model_version"))
            pred_out.write(out.write_csv(include_header=first).encode())
            rej_out.write(rejects.write_csv(include_header=first).encode())
            first = False
            report.rows_scored += out.height
            report.rows_rejected += rejects.height
            reasons.update(rejects["reason"].to_list())
            advance(batch.frame.height)
    report.rejected_by_reason = dict(sorted(reasons.items()))
    if report.rows_in != report.rows_scored + report.rows_rejected:
        raise InternalError(f"predict lost rows: {report.rows_in} in, {report.rows_scored} "
                            f"scored, {report.rows_rejected} rejected")


# ----------------------------------------------------------------------- export


def _export(encrypted: Path, output: Path, key: crypto.MasterKey, *, plaintext: bool) -> None:
    """Copy the predictions to `output`: ciphertext, or plaintext CSV only when asked."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if plaintext:
            crypto.decrypt_file_to(encrypted, output, key)
        else:
            tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
            shutil.copyfile(encrypted, tmp)
            os.replace(tmp, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror}") from exc
    log.info("predict: wrote %s copy to %s", "plaintext" if plaintext else "encrypted", output)


def read_predictions(artifact: Artifact, key: crypto.MasterKey, name: str = PREDICTIONS
                     ) -> pl.DataFrame:
    """A predict artifact's predictions (or rejects) decrypted in memory."""
    import io

    import polars as pl

    return pl.read_csv(io.BytesIO(crypto.read_encrypted_file(artifact.file(name), key)))
