"""Behaviour of evaluate's outputs: metrics.json structure, report.md, plots, gates, summary."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from personanet.privacy.audit import attack_roc_curve, membership_inference_audit
from personanet.reporting.metrics import (
    bootstrap_cis,
    calibration_curve,
    classification_metrics,
    group_metrics,
    roc_curve,
)
from personanet.reporting.plots import write_plots
from personanet.reporting.report import (
    build_gates,
    failed_gates,
    privacy_sentence,
    render_markdown,
    render_summary,
)

CLASSES = ["<=50K", ">50K"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluation() -> dict[str, Any]:
    """A small but real evaluation: labels, probabilities, groups, losses and the metrics dict."""
    rng = np.random.default_rng(0)
    n = 600
    sex = rng.choice(["Female", "Male"], n)
    race = rng.choice(["White", "Black", "Other"], n, p=[0.7, 0.27, 0.03])
    y = rng.integers(0, 2, n)
    # the model is better for men than for women
    noise = np.where(sex == "Male", 0.8, 1.6)
    p = 1 / (1 + np.exp(-(2 * y - 1) * 1.5 - rng.normal(0, noise)))
    proba = np.c_[1 - p, p]
    members = rng.exponential(0.4, 800)
    nonmembers = rng.exponential(0.5, 600)
    overall = classification_metrics(y, proba, classes=CLASSES)
    groups = group_metrics({"sex": sex, "race": race}, y, proba, CLASSES, min_group_size=30)
    audit = membership_inference_audit(members, nonmembers, delta=1e-5, epsilon_claimed=1.0,
                                       seed=0).to_json()
    intervals = bootstrap_cis(lambda a, b: classification_metrics(a, b, classes=CLASSES), y,
                              proba, n_resamples=30, seed=0)
    metrics = {
        "schema": 1,
        "task": "classification",
        "model": {"version": "20260101T000000Z-abc123", "private": True, "epsilon": 1.0,
                  "delta": 1e-5, "privacy_unit": "email", "target": "income",
                  "classes": CLASSES},
        "overall": overall,
        "ci": {"level": 0.95, "n_resamples": 30, "seed": 0,
               "intervals": {k: list(v) for k, v in intervals.items()}},
        "groups": groups,
        "audit": audit,
    }
    metrics["gates"] = build_gates(overall=overall, groups=groups, audit=audit,
                                   min_accuracy=0.99, max_group_gap=0.5, max_attack_auc=0.9)
    return {"metrics": metrics, "y": y, "proba": proba, "members": members,
            "nonmembers": nonmembers}


def plots_of(evaluation: dict[str, Any], out: Path) -> list[str]:
    fpr, tpr, _ = roc_curve(evaluation["y"] == 1, evaluation["proba"][:, 1])
    return write_plots(out, roc=(fpr, tpr),
                       calibration=calibration_curve(evaluation["y"], evaluation["proba"]),
                       groups=evaluation["metrics"]["groups"],
                       attack_roc=attack_roc_curve(evaluation["members"],
                                                   evaluation["nonmembers"]))


# --- metrics.json -----------------------------------------------------------------------------


def test_metrics_document_is_strict_json(evaluation: dict[str, Any]) -> None:
    metrics = evaluation["metrics"]
    assert json.loads(json.dumps(metrics, allow_nan=False)) == json.loads(json.dumps(metrics))
    assert {"model", "overall", "ci", "groups", "audit", "gates"} <= set(metrics)


# --- plots ------------------------------------------------------------------------------------


def test_plots_are_valid_pngs(evaluation: dict[str, Any], tmp_path: Path) -> None:
    written = plots_of(evaluation, tmp_path)
    assert written == ["roc.png", "calibration.png", "groups.png", "attack_roc.png"]
    for name in written:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name


def test_plots_are_byte_identical_across_runs(evaluation: dict[str, Any], tmp_path: Path) -> None:
    plots_of(evaluation, tmp_path / "a")
    plots_of(evaluation, tmp_path / "b")
    for name in ("roc.png", "attack_roc.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_figures_without_input_are_skipped(tmp_path: Path) -> None:
    written = write_plots(tmp_path, attack_roc=(np.array([0.0, 0.0, 1.0]),
                                                np.array([0.0, 1.0, 1.0])))
    assert written == ["attack_roc.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack_roc.png"]


def test_regression_groups_plot_their_error(tmp_path: Path) -> None:
    groups = {"sex": {"groups": {"F": {"n": 10, "mae": 1.5}, "M": {"n": 12, "mae": 1.0}},
                      "gaps": {}}}
    assert write_plots(tmp_path, groups=groups, task="regression") == ["groups.png"]


# --- report.md --------------------------------------------------------------------------------


def test_report_states_the_privacy_guarantee_and_every_section(evaluation: dict[str, Any]
                                                                ) -> None:
    text = render_markdown(evaluation["metrics"], figures=["roc.png", "attack_roc.png"])
    assert "(ε = 1.00, δ = 1e-05)-differential privacy per person" in text
    assert "`email`" in text
    for heading in ("## Privacy", "## Metrics", "## Groups", "### `sex`",
                    "## Membership-inference audit", "## Gates", "## Figures"):
        assert heading in text, heading
    assert "![attack_roc](attack_roc.png)" in text


def test_report_shows_metrics_with_intervals(evaluation: dict[str, Any]) -> None:
    metrics = evaluation["metrics"]
    text = render_markdown(metrics)
    low, high = metrics["ci"]["intervals"]["accuracy"]
    assert (f"| Accuracy | {metrics['overall']['accuracy']:.3f} | [{low:.3f}, {high:.3f}] |"
            in text)


def test_report_tables_groups_with_sizes_gaps_and_suppression(evaluation: dict[str, Any]
                                                               ) -> None:
    metrics = evaluation["metrics"]
    text = render_markdown(metrics)
    female = metrics["groups"]["sex"]["groups"]["Female"]
    assert f"| Female | {female['n']} | {female['accuracy']:.3f} |" in text
    gap = metrics["groups"]["sex"]["gaps"]["accuracy"]
    assert f"- Accuracy: {gap['gap']:.3f} (Male" in text
    assert "| Other |" in text and "suppressed" in text


def test_report_puts_the_claimed_epsilon_next_to_the_empirical_bound(evaluation: dict[str, Any]
                                                                     ) -> None:
    audit = evaluation["metrics"]["audit"]
    text = render_markdown(evaluation["metrics"])
    assert (f"| 1.00 | {audit['epsilon_lower_bound']:.2f} | {audit['attack_auc']:.3f} |"
            in text)
    assert "does not certify" in text


def test_report_says_when_the_audit_refutes_the_claim(evaluation: dict[str, Any]) -> None:
    metrics = dict(evaluation["metrics"])
    metrics["audit"] = {**metrics["audit"], "epsilon_lower_bound": 3.5}
    assert "**The audit refutes the claim:**" in render_markdown(metrics)


def test_non_private_model_gets_a_loud_warning() -> None:
    metrics = {"model": {"version": "v1", "private": False, "epsilon": None, "delta": None},
               "overall": {"accuracy": 0.9, "n": 10}, "groups": {},
               "audit": {"epsilon_claimed": None, "epsilon_lower_bound": 2.0,
                         "attack_auc": 0.7}, "gates": []}
    text = render_markdown(metrics)
    assert "**WARNING: this model was trained WITHOUT differential privacy.**" in text
    assert "No privacy claim to test" in text
    assert "No sensitive columns" in text and "No gates" in text


def test_a_private_model_without_epsilon_is_a_bug() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        privacy_sentence({"private": True, "epsilon": None, "delta": 1e-5})


def test_report_lists_each_gate_with_threshold_value_and_result(evaluation: dict[str, Any]
                                                                 ) -> None:
    text = render_markdown(evaluation["metrics"])
    accuracy = evaluation["metrics"]["overall"]["accuracy"]
    assert f"| min_accuracy | value >= threshold | 0.990 | {accuracy:.3f} | **FAIL** |" in text
    assert "| max_group_gap | value <= threshold | 0.500 |" in text


def test_group_values_cannot_break_the_table() -> None:
    metrics = {"model": {"private": False},
               "groups": {"c": {"groups": {"a|b": {"n": 5, "accuracy": 1.0}}, "gaps": {}}}}
    assert "| a\\|b | 5 |" in render_markdown(metrics)


# --- gates ------------------------------------------------------------------------------------


def test_gates_pass_and_fail_against_their_thresholds() -> None:
    overall = {"accuracy": 0.84}
    gates = build_gates(overall=overall, min_accuracy=0.8)
    assert gates == [{"name": "min_accuracy", "rule": ">=", "threshold": 0.8, "value": 0.84,
                      "passed": True, "detail": "test accuracy"}]
    assert build_gates(overall=overall, min_accuracy=0.85)[0]["passed"] is False


def test_group_gap_gate_reads_the_largest_gap_of_any_column() -> None:
    groups = {
        "sex": {"gaps": {"accuracy": {"gap": 0.05, "max_group": "M", "max": 0.9,
                                      "min_group": "F", "min": 0.85}}},
        "race": {"gaps": {"accuracy": {"gap": 0.12, "max_group": "A", "max": 0.92,
                                       "min_group": "B", "min": 0.80}}},
    }
    [gate] = build_gates(overall={}, groups=groups, max_group_gap=0.1)
    assert gate["value"] == 0.12 and gate["passed"] is False
    assert "race" in gate["detail"]


def test_audit_gate_fails_when_the_bound_exceeds_the_claim() -> None:
    audit = {"epsilon_claimed": 1.0, "epsilon_lower_bound": 1.7, "attack_auc": 0.6}
    gates = build_gates(overall={}, audit=audit, max_attack_auc=0.65)
    assert [(g["name"], g["passed"]) for g in gates] == [("max_attack_auc", True),
                                                         ("audit_epsilon", False)]
    assert [g["name"] for g in failed_gates({"gates": gates})] == ["audit_epsilon"]


def test_gates_that_cannot_be_checked_say_so_instead_of_passing() -> None:
    audit = {"epsilon_claimed": None, "epsilon_lower_bound": 0.4, "attack_auc": 0.55}
    gates = build_gates(overall={"mae": 1.0}, groups={}, audit=audit, min_accuracy=0.8,
                        max_group_gap=0.1, max_attack_auc=None)
    assert [(g["name"], g["passed"]) for g in gates] == [
        ("min_accuracy", None), ("max_group_gap", None), ("audit_epsilon", None)]
    assert failed_gates({"gates": gates}) == []


# --- summary ----------------------------------------------------------------------------------


def test_summary_table_shows_privacy_metrics_audit_and_gates(evaluation: dict[str, Any]
                                                              ) -> None:
    from rich.console import Console

    table = render_summary(evaluation["metrics"])
    buffer = io.StringIO()
    Console(file=buffer, width=120, no_color=True).print(table)
    text = buffer.getvalue()
    for expected in ("ε=1.00", "Accuracy", "accuracy gap: sex", "audit ε lower bound",
                     "gate min_accuracy", "FAIL"):
        assert expected in text, expected
