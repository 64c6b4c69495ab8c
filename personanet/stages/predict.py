"""predict: score new records with a trained model, in streamed batches.

Each batch of raw records goes through clean's per-row rules (types, bounds,
imputation, pseudonymization) and the model's own saved encoder, then the
model. Output rows carry the pseudonym, never the raw identifier. Rows that
cannot be scored go to a reject file with the reason: rows in = scored +
rejected, always. Outputs are encrypted; a plaintext copy is written only
when the user asks for one explicitly (`--output PATH --plaintext-output`).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.config import Config, SourceConfig
from personanet.errors import BadInputError, InternalError, OutputError, UsageError
from personanet.privacy.record import PrivacyRecord
from personanet.sources import Source, open_sources
from personanet.sources.images import is_status_column
from personanet.stages.base import (
    StagePlan,
    StageResult,
    check_plain_files,
    fingerprint,
    run_stage,
)
from personanet.stages.files import PREDICTIONS, PRIVACY, REJECTS, TEST_TABLE
from personanet.stages.lineage import chain_input
from personanet.store import crypto, tables
from personanet.store.artifacts import Artifact, ArtifactStore, ArtifactWriter
from personanet.store.fsutil import atomic_write
from personanet.store.keys import MasterKey
from personanet.ui import progress

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("personanet")

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
    #: columns of the input file that the config does not name: not read, not scored
    columns_dropped: list[str] = field(default_factory=list)


def predict(config: Config, store: ArtifactStore, key: MasterKey, *,
            source: str | None = None, clean_version: str | None = None,
            model_version: str | None = None, output: Path | None = None,
            plaintext_output: bool = False, device: str | None = None,
            force: bool = False) -> StageResult:
    """Score a file (`source`, default `predict.source`) or a clean artifact's test split.

    `output` also writes the predictions there: encrypted (the same format as
    the artifact) unless `plaintext_output`, since predictions are about people.
    An encrypted copy under a plaintext-looking name (`preds.csv`) is refused
    (UsageError, exit 2) before any work: nothing could read it as a CSV.
    """
    check_output_name(output, plaintext_output=plaintext_output)
    # The copy to `output` is part of the stage: it is made under the same lock.
    with store.lock():
        result = run_stage(store, key, lambda: _plan(
            config, store, source=source, clean_version=clean_version,
            model_version=model_version, output=output, plaintext_output=plaintext_output,
            key=key, device=device), force=force)
        if output is not None:
            _export(result.path / PREDICTIONS, output, key, plaintext=plaintext_output)
    return result


def _plan(config: Config, store: ArtifactStore, *, source: str | None,
          clean_version: str | None, model_version: str | None, output: Path | None,
          plaintext_output: bool, key: MasterKey, device: str | None) -> StagePlan:
    """What predict would write: identified by the model, the input's bytes and the rules."""
    if plaintext_output and output is None:
        raise UsageError("--plaintext-output needs --output PATH")
    # Without --model: the current config's chain's model, never merely the newest; its
    # plaintext files are checked against the sealed manifest before any is used.
    model_artifact, warnings = ((store.get("train", model_version), []) if model_version
                                else chain_input(config, store, "train", reader="predict"))
    check_plain_files(model_artifact)
    privacy = PrivacyRecord.read(model_artifact.file(PRIVACY))
    if not privacy.private:
        warnings.append(f"model {model_artifact.version} was trained without differential "
                        "privacy (--no-dp): its predictions carry no privacy guarantee")
        log.warning(warnings[-1])

    clean_artifact = store.get("clean", clean_version) if clean_version else None
    source_file = None if clean_artifact else _input_source(config, source)
    # Where the file lies is not part of what it holds: a moved file is the same input.
    identity = ({"clean": clean_artifact.version} if clean_artifact
                else {k: v for k, v in source_file.describe().items() if k != "path"})
    # How the input is read ([source]) is part of the identity; the default adds nothing.
    read = {} if config.source == SourceConfig() else {"read": config.section("source")}
    fp = fingerprint("predict", model=model_artifact.version, input=identity,
                     config=config.section_hash("columns", "clean"), **read)
    inputs: list[dict[str, Any]] = [model_artifact.as_input()]
    inputs.append(clean_artifact.as_input() if clean_artifact
                  else {"source": [source_file.describe()]})
    return StagePlan(
        "predict", fp, inputs=inputs,
        config={"columns": config.section("columns"), "predict": config.section("predict")},
        config_hash=config.section_hash("columns", "clean"), warnings=warnings,
        write=partial(_write, config, key, model_artifact=model_artifact,
                      clean_artifact=clean_artifact, source_file=source_file,
                      private=privacy.private, device=device, warnings=warnings))


def _write(config: Config, key: MasterKey, writer: ArtifactWriter, *,
           model_artifact: Artifact, clean_artifact: Artifact | None,
           source_file: Source | None, private: bool, device: str | None,
           warnings: list[str]) -> None:
    """Score every batch into the encrypted predictions and rejects."""
    from personanet.models import load_model
    from personanet.privacy.pseudonym import pseudonym_key
    from personanet.training.devices import resolve_device

    model, encoder = load_model(model_artifact.path)
    torch_device = resolve_device(device or config.train.device)
    model.to(torch_device)
    report = PredictReport(model_version=model_artifact.version,
                           model_private=private, device=str(torch_device),
                           input=f"clean:{clean_artifact.version}" if clean_artifact
                           else source_file.name)
    batches = (_clean_batches(clean_artifact, key, config.predict.batch_size) if clean_artifact
               else _source_batches(source_file, config.predict.batch_size))
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
    log.info("predict: %d scored, %d rejected -> %s", report.rows_scored, report.rows_rejected,
             writer.version)


# ----------------------------------------------------------------------- inputs


@dataclass
class _Batch:
    """Records to score; `prepared` says whether clean's rules were already applied."""

    frame: Any
    offset: int
    prepared: bool


def _input_source(config: Config, source: str | None) -> Source:
    """The one source to score: `--input`, else `predict.source`, read with `[source]`."""
    if source is not None:
        sources = open_sources([source], config.source, base=Path.cwd(),
                               columns=config.columns)
    elif config.predict.source:
        sources = open_sources([config.predict.source], config.source, base=config.base_dir,
                               columns=config.columns)
    else:
        from personanet.errors import InputMissingError

        raise InputMissingError("nothing to score: pass --input FILE or --clean VERSION, or set "
                                "predict.source in the config")
    if len(sources) != 1:
        raise BadInputError(f"predict scores one file at a time; {source!r} matches "
                            f"{len(sources)}")
    return sources[0]


def _source_batches(source: Source, batch_size: int) -> Iterator[_Batch]:
    """Stream a source in batches of text columns, read with the config's [source] options
    exactly as collect reads its sources."""
    offset = 0
    for frame in source.batches(batch_size):
        yield _Batch(frame, offset, prepared=False)
        offset += frame.height
    if offset == 0:
        raise BadInputError(f"{source.name}: no records to score (only a header?)")


def _clean_batches(artifact: Artifact, key: MasterKey, batch_size: int
                   ) -> Iterator[_Batch]:
    """A clean artifact's test split is already clean: no rules are applied twice."""
    frame = tables.read_artifact_table(artifact, TEST_TABLE, key)
    for offset in range(0, frame.height, batch_size):
        yield _Batch(frame.slice(offset, batch_size), offset, prepared=True)


# ----------------------------------------------------------------------- scoring


def _score(batches: Iterator[_Batch], model: Any, encoder: Any, config: Config,
           report: PredictReport, pred_out: crypto.EncryptingWriter,
           rej_out: crypto.EncryptingWriter, *, pseudonym_key: bytes) -> None:
    """Score every batch, writing predictions and rejects as they come (flat memory)."""
    import polars as pl

    from personanet.cleaning.rows import prepare_rows
    from personanet.models import predict_frame

    identifiers = [c.name for c in config.identifiers()]
    classes = encoder.target_classes if encoder.task != "regression" else []
    reasons: Counter[str] = Counter()
    first = True
    with progress("scoring", None) as advance:
        for batch in batches:
            report.batches += 1
            report.rows_in += batch.frame.height
            if batch.offset == 0 and not batch.prepared:
                _note_dropped_columns(batch.frame.columns, config, report)
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
            # Built from the row numbers: with no identifier (privacy_unit = "@row") an
            # empty selection would have no rows to add columns to.
            out = pl.DataFrame([rows.alias("row")]).hstack(
                frame.select([c for c in identifiers if c in frame.columns]))
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


def _note_dropped_columns(columns: list[str], config: Config, report: PredictReport) -> None:
    """Say once which input columns the config does not name (they are never read)."""
    report.columns_dropped = [c for c in columns if c not in config.columns
                              and not is_status_column(c)]  # an image's status: read
    if report.columns_dropped:
        log.info("predict: %d input column(s) not in the config, not read: %s",
                 len(report.columns_dropped), ", ".join(report.columns_dropped))


# ----------------------------------------------------------------------- export

#: file name endings that promise plaintext: an encrypted copy must not wear one
PLAINTEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson", ".parquet", ".pq",
                      ".gz", ".zip", ".xls", ".xlsx")


def check_output_name(output: Path | None, *, plaintext_output: bool) -> None:
    """Refuse `--output preds.csv` without `--plaintext-output` (UsageError, exit 2).

    The copy would be ciphertext under a name every tool opens as a table; silently
    appending `.enc` would leave a script looking for a file that is not there.
    """
    if output is None or plaintext_output:
        return
    name = Path(output).name.lower()
    suffix = next((s for s in PLAINTEXT_SUFFIXES if name.endswith(s)), None)
    if suffix is not None:
        raise UsageError(
            f"--output {output} ends in {suffix} but would hold encrypted bytes: add "
            "--plaintext-output for a plaintext table, or name it "
            f"{Path(output).name}.enc for an encrypted copy (`personanet artifacts export "
            f"VERSION {PREDICTIONS}` decrypts the artifact's own later)"
        )


def _export(encrypted: Path, output: Path, key: MasterKey, *, plaintext: bool) -> None:
    """Copy the predictions to `output`: ciphertext, or plaintext only when asked (Parquet
    for a .parquet/.pq name, else CSV)."""
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if plaintext and output.suffix.lower() in (".parquet", ".pq"):
            _write_plaintext_parquet(crypto.read_encrypted_file(encrypted, key), output)
        elif plaintext:
            crypto.decrypt_file_to(encrypted, output, key)
        else:
            with open(encrypted, "rb") as src, atomic_write(output, mode=0o644) as dst:
                shutil.copyfileobj(src, dst)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror}") from exc
    log.info("predict: wrote %s copy to %s", "plaintext" if plaintext else "encrypted", output)


def _write_plaintext_parquet(csv_bytes: bytes, output: Path) -> None:
    """The predictions as Parquet under the name that promises it: 0600, all or nothing."""
    from personanet.stages.export import read_table_bytes

    frame = read_table_bytes(csv_bytes, PREDICTIONS)
    with atomic_write(output, mode=0o600) as fh:
        frame.write_parquet(fh)


def read_predictions(artifact: Artifact, key: MasterKey, name: str = PREDICTIONS
                     ) -> pl.DataFrame:
    """A predict artifact's predictions (or rejects) decrypted in memory."""
    import io

    import polars as pl

    return pl.read_csv(io.BytesIO(crypto.read_encrypted_file(artifact.file(name), key)))
