"""evaluate: utility, fairness per group, and an empirical privacy audit.

Reads: a train artifact (model + encoder + privacy.json) and the clean
artifact it was trained on. Scores the held-out test people, computes the
metrics with bootstrap intervals, the same per value of every sensitive
column, and a membership-inference audit (the model's training people vs the
held-out people). Writes metrics.json, report.md and PNG plots; any gate
missed exits 69 *after* the report is written, so a scheduler stops a bad
model from being promoted and a person can read why.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np

from personanet.config import Config
from personanet.errors import GateFailedError
from personanet.stages.base import (
    StagePlan,
    StageResult,
    check_plain_files,
    fingerprint,
    run_stage,
)
from personanet.stages.files import METRICS, PRIVACY, REPORT, TEST_TABLE, TRAIN_TABLE
from personanet.stages.lineage import chain_input
from personanet.store import tables
from personanet.store.artifacts import Artifact, ArtifactStore, ArtifactWriter
from personanet.store.keys import MasterKey

log = logging.getLogger("personanet")


def evaluate(config: Config, store: ArtifactStore, key: MasterKey, *,
             model_version: str | None = None, input_version: str | None = None,
             force: bool = False) -> StageResult:
    """Evaluate a model on its clean artifact's test split; exit 69 when a gate fails.

    `input_version` pins another clean artifact for the utility metrics; the
    audit always uses the model's own training data as members, since only
    those rows were trained on.
    """
    result = run_stage(store, key, lambda: _plan(config, store, key, model_version=model_version,
                                                 input_version=input_version), force=force)
    _raise_on_failed_gates(result)
    return result


def _plan(config: Config, store: ArtifactStore, key: MasterKey, *, model_version: str | None,
          input_version: str | None) -> StagePlan:
    """What evaluate would write: identified by the model, the data and the settings."""
    # Without --model: the model the current config's chain made (what `run` would score),
    # never the newest, which may be another config's. Its plaintext files (weights,
    # encoder, privacy claim) are checked against the sealed manifest before any is used.
    model_artifact = (store.get("train", model_version) if model_version
                      else chain_input(config, store, "train", reader="evaluate")[0])
    check_plain_files(model_artifact)
    trained_on = _trained_on(model_artifact)
    clean_artifact = store.get("clean", input_version or trained_on)
    member_artifact = store.get("clean", trained_on)
    sensitive = [c.name for c in config.columns.values() if c.sensitive]
    fp = fingerprint("evaluate", model=model_artifact.version, input=clean_artifact.version,
                     config=config.section_hash("evaluate"), sensitive=sensitive,
                     groups=_group_definitions(config, sensitive))
    return StagePlan(
        "evaluate", fp, inputs=[model_artifact.as_input(), clean_artifact.as_input()],
        config={"evaluate": config.section("evaluate"), "sensitive": sensitive},
        config_hash=config.section_hash("evaluate"), seed=config.evaluate.seed,
        write=partial(_write, config, key, model_artifact, clean_artifact, member_artifact,
                      sensitive))


def _write(config: Config, key: MasterKey, model_artifact: Artifact, clean_artifact: Artifact,
           member_artifact: Artifact, sensitive: list[str], writer: ArtifactWriter) -> None:
    """Score, audit, and write the metrics, the report and its plots."""
    from personanet.reporting import report
    from personanet.reporting.plots import write_plots

    metrics, curves = compute_metrics(config, key, model_artifact, clean_artifact,
                                      member_artifact, sensitive=sensitive)
    plots = write_plots(writer.tmp, task=metrics["task"], **curves)
    for name in plots:
        writer.add(name)
    writer.write_json(METRICS, metrics)
    writer.write_bytes(REPORT, report.render_markdown(metrics, figures=plots).encode())
    writer.figures = _figures(metrics)


def _trained_on(model_artifact: Artifact) -> str:
    for entry in model_artifact.manifest.get("inputs", []):
        if entry.get("stage") == "clean":
            return str(entry["version"])
    from personanet.errors import BadInputError

    raise BadInputError(f"train artifact {model_artifact.version} names no clean input")


def compute_metrics(config: Config, key: MasterKey, model_artifact: Artifact,
                    clean_artifact: Artifact, member_artifact: Artifact, *,
                    sensitive: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json's content, and the curves the plots are drawn from."""
    from personanet.models import load_model, predict_frame
    from personanet.privacy.audit import (
        attack_roc_curve,
        membership_inference_audit,
        per_person,
    )
    from personanet.privacy.record import PrivacyRecord
    from personanet.reporting import groups as fairness
    from personanet.reporting import report
    from personanet.reporting.metrics import (
        bootstrap_cis,
        calibration_curve,
        classification_metrics,
        group_metrics,
        group_regression_metrics,
        regression_metrics,
        roc_curve,
    )

    model, encoder = load_model(model_artifact.path)
    privacy = PrivacyRecord.read(model_artifact.file(PRIVACY))
    ev = config.evaluate
    test = tables.read_artifact_table(clean_artifact, TEST_TABLE, key)
    members = _trained_on_rows(model_artifact,
                               tables.read_artifact_table(member_artifact, TRAIN_TABLE, key))
    if clean_artifact.version == member_artifact.version:
        nonmembers = test
    else:
        nonmembers = tables.read_artifact_table(member_artifact, TEST_TABLE, key)

    batch = config.predict.batch_size
    target = encoder.transform(test).target
    scored = predict_frame(model, encoder, test, batch_size=batch)
    labelled = target >= 0 if encoder.task != "regression" else ~np.isnan(target)
    y, out = target[labelled], scored[labelled]
    if len(y) == 0:
        from personanet.errors import BadInputError

        raise BadInputError(
            f"clean artifact {clean_artifact.version} has no labelled test rows to evaluate on: "
            "check clean.split_column / clean.test_fraction (the test split is empty)")
    test_labelled = test.filter(labelled.tolist()) if not labelled.all() else test
    absent = [n for n in sensitive if n not in test_labelled.columns]
    if absent:
        # clean keeps identifiers, features and the target only: an "ignore" column is gone
        log.warning("evaluate: sensitive column(s) %s are not in the clean artifact (role = "
                    "\"ignore\"?): no groups are reported for them", ", ".join(absent))
    groupings = fairness.groupings(config, [n for n in sensitive if n not in absent])
    groups_input = {name: g.assign(test_labelled[name]) for name, g in groupings.items()}
    group_order = {name: g.labels for name, g in groupings.items()}
    min_group_size = ev.min_group_size
    curves: dict[str, Any] = {}
    per_class: dict[str, Any] | None = None
    if encoder.task == "regression":
        y_units = encoder.unscale_target(y)
        overall = regression_metrics(y_units, out)
        intervals = bootstrap_cis(regression_metrics, y_units, out,
                                  n_resamples=ev.bootstrap, seed=ev.seed)
        groups = group_regression_metrics(groups_input, y_units, out, order=group_order,
                                          min_group_size=min_group_size)
        task = "regression"
    else:
        classes = encoder.target_classes
        y = y.astype(np.int64)
        overall = classification_metrics(y, out, classes=classes)
        intervals = bootstrap_cis(lambda a, b: classification_metrics(a, b, classes=classes),
                                  y, out, n_resamples=ev.bootstrap, seed=ev.seed)
        groups = group_metrics(groups_input, y, out, classes, order=group_order,
                               min_group_size=min_group_size)
        if len(classes) == 2:
            curves["roc"] = roc_curve(y == 1, out[:, 1])[:2]
        curves["calibration"] = calibration_curve(y, out)
        if len(classes) > 2:  # per-class accuracy and the confusion matrix (reporting/classes)
            from personanet.reporting.classes import class_metrics

            per_class = class_metrics(y, out, classes, min_group_size=min_group_size)
            curves["confusion"] = per_class["confusion_matrix"]
        task = "classification"
    for name, g in groupings.items():
        groups[name]["grouping"] = g.to_json()
    curves["groups"] = groups or None

    audit_json = None
    if ev.audit:
        member_loss, member_class = _per_example_loss(model, encoder, members, batch)
        nonmember_loss, nonmember_class = _per_example_loss(model, encoder, nonmembers, batch)
        # Calibrating each loss by its class's typical non-member loss (fitted on the
        # threshold half only) removes "this class is just harder", which a global
        # threshold mistakes for membership.
        claimed = privacy.epsilon if privacy.private else None
        rows_per_unit = config.clean.max_rows_per_unit
        if rows_per_unit > 1:  # a member is a person, all their rows (privacy/audit.py)
            member_loss, member_class = per_person(
                member_loss, _labelled_units(config, encoder, members), member_class)
            nonmember_loss, nonmember_class = per_person(
                nonmember_loss, _labelled_units(config, encoder, nonmembers), nonmember_class)
            level = privacy.unit_level or {}
            if privacy.private and level.get("level") == "row":  # the per-person claim
                claimed = level.get("person_epsilon")
        strata = ({"member_strata": member_class, "nonmember_strata": nonmember_class}
                  if encoder.task != "regression" else {})
        result = membership_inference_audit(
            member_loss, nonmember_loss, delta=float(privacy.delta or config.train.delta),
            epsilon_claimed=claimed, seed=ev.seed, **strata)
        audit_json = result.to_json()
        if rows_per_unit > 1:
            audit_json.update(unit="person", rows_per_unit=rows_per_unit)
        curves["attack_roc"] = attack_roc_curve(member_loss, nonmember_loss)

    gates = report.build_gates(overall=overall, groups=groups, audit=audit_json,
                               min_accuracy=ev.min_accuracy, max_group_gap=ev.max_group_gap,
                               max_attack_auc=ev.max_attack_auc, task=task)
    metrics = {
        "schema": report.SCHEMA_VERSION,
        "task": task,
        "model": {"version": model_artifact.version, "private": privacy.private,
                  "epsilon": privacy.epsilon if privacy.private else None,
                  "delta": privacy.delta if privacy.private else None,
                  "privacy_unit": config.dataset.privacy_unit,
                  "max_rows_per_unit": config.clean.max_rows_per_unit,
                  "target": encoder.target_name,
                  "noise_multiplier": privacy.noise_multiplier,
                  "sample_rate": privacy.sample_rate, "steps": privacy.steps,
                  "accountant": privacy.accountant,
                  # k > 1 only: who the epsilon is for (privacy.json's unit_level)
                  **({"unit_level": privacy.unit_level} if privacy.unit_level else {})},
        "data": {"test_version": clean_artifact.version, "n_test": int(len(y)),
                 "n_test_unlabelled": int((~labelled).sum()),
                 "n_members": int(members.height), "n_nonmembers": int(nonmembers.height)},
        "overall": overall,
        "ci": {"level": 0.95, "n_resamples": ev.bootstrap, "seed": ev.seed,
               "intervals": {k: list(v) for k, v in intervals.items()}},
        "groups": groups,
        "audit": audit_json,
        "gates": gates,
    }
    if per_class is not None:
        metrics["per_class"] = per_class
    return metrics, curves


def _group_definitions(config: Config, sensitive: list[str]) -> dict[str, Any]:
    """How each sensitive column is grouped (its bins' edges): other edges, another evaluation."""
    from personanet.reporting.groups import groupings

    return {name: g.to_json() for name, g in groupings(config, sensitive).items()}


def _trained_on_rows(model_artifact: Artifact, members: Any) -> Any:
    """The training split less the people train held out for validation (never trained
    on: not members), by the same split (stages/validation.py)."""
    from personanet.stages.validation import split_validation

    held = (model_artifact.figures.get("validation") or {}).get("fraction") or 0.0
    if not held:
        return members
    seed = int(model_artifact.manifest.get("seed", 0))
    return split_validation(members, seed=seed, fraction=float(held))[0]


def _labelled_units(config: Config, encoder: Any, frame: Any) -> np.ndarray:
    """The person of each labelled row, in `_per_example_loss`'s order."""
    from personanet.stages.units import unit_ids

    return unit_ids(frame, config)[encoder.transform(frame).labelled]


def _per_example_loss(model: Any, encoder: Any, frame: Any, batch_size: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The attack's score: each labelled person's loss under the final model, and their
    target (class index, or value) for calibration.

    Computed from the logits in float64, not from rounded probabilities: a
    memorised member's probability rounds to exactly 1.0 in float32, and ties at
    zero loss would hide precisely the people the audit is looking for.
    """
    import torch

    from personanet.models import family_of

    family = family_of(model)
    criterion = family.loss(encoder.task, reduction="none")
    device = next(model.parameters()).device
    losses, targets = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, frame.height, batch_size):
            batch = encoder.transform(frame.slice(start, batch_size))
            keep = batch.labelled
            if not keep.any():
                continue
            tensors = batch.select(keep).tensors(device)
            logits = model(**family.inputs(tensors)).double()
            losses.append(criterion(logits, tensors["target"]).cpu().numpy())
            targets.append(tensors["target"].cpu().numpy())
    if not losses:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(losses), np.concatenate(targets)


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers for the manifest, --json and the summary table."""
    from personanet.reporting.report import failed_gates

    overall = metrics["overall"]
    audit = metrics.get("audit") or {}
    figures: dict[str, Any] = {
        "task": metrics["task"],
        "private": metrics["model"]["private"],
        "epsilon_claimed": metrics["model"]["epsilon"],
        "n_test": metrics["data"]["n_test"],
    }
    for name in ("accuracy", "balanced_accuracy", "f1", "roc_auc", "log_loss", "ece", "mae",
                 "rmse", "r2"):
        if name in overall:
            figures[name] = overall[name]
    figures["largest_group_gap"] = max(
        (g["gaps"][k]["gap"] for g in metrics["groups"].values() for k in g.get("gaps", {})
         if k in ("accuracy", "mae") and g["gaps"][k]), default=None)
    if audit:
        figures.update(attack_auc=audit.get("attack_auc"),
                       epsilon_lower_bound=audit.get("epsilon_lower_bound"),
                       tpr_at_1pct_fpr=audit.get("tpr_at_1pct_fpr"),
                       tpr_at_01pct_fpr=audit.get("tpr_at_01pct_fpr"))
    figures["gates_failed"] = [g["name"] for g in failed_gates(metrics)]
    return figures


def _raise_on_failed_gates(result: StageResult) -> None:
    failed = result.figures.get("gates_failed") or []
    if failed:
        raise GateFailedError(f"gate(s) failed: {', '.join(failed)}; the model must not be "
                              f"promoted (report: {result.path}/{REPORT})",
                              payload=result.to_json())
