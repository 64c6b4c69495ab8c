"""Crash safety (README: Artifacts): `personanet run` SIGKILLed anywhere, then rerun.

A harness starts `python -m personanet run` as a real child process (key from
PERSONANET_KEY, real encryption, real DP training on a few hundred rows) and kills it
with SIGKILL at pseudo-random moments spread over every stage. The moments come from a
fixed seed and one uninterrupted run's timings (each artifact's version id says when its
temporary folder was made, its `created_at` when it was committed; the ledger says when
training reserved its budget). A kill aimed at a span of stage S runs `run --force S`,
waits for the sign that the span has begun, then sleeps a seeded fraction of the span's
measured length. The signs: the child's log line saying the stage before S was reused
(S computes), S's temporary folder appearing (S writes its artifact), the training run's
checkpoint folder appearing (DP-SGD steps, right after the reservation), the log line of
epoch 1 (epoch 2 and the checkpoints). Where each kill really landed is read afterwards
from what the killed run left on disk, never assumed.

After every kill the store must hold no incomplete artifact (every version folder without
a leading dot has a valid manifest and every listed file matches its sha256), `artifacts
verify` must pass, the budget ledger must count every training run that had started, and
the next run must complete with exit 0.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from personanet.config import Config, load_config
from personanet.privacy import Ledger, budget_summary
from personanet.store.artifacts import MANIFEST, STAGES, TMP_PREFIX, ArtifactStore, verify_checksums
from personanet.store.keys import MasterKey
from tests.conftest import ROOT, run_subprocess, write_config

PREDICT_INPUT = ROOT / "data" / "persona_new.csv"
SEED = 20261125
KILLS_REQUIRED = 20
KILLS_AFTER_RESERVATION_REQUIRED = 2
# 21 aims: every stage while it computes and (except train, whose DP-SGD steps are aimed
# at instead) while it writes its artifact; top-ups aim at whatever has no landing yet.
PLANNED_AIMS = [
    "collect", "clean", "train", "train-steps", "evaluate", "train-epoch-2", "predict",
    "collect-write", "clean-write", "train", "train-steps", "evaluate-write", "train-epoch-2",
    "predict-write",
    "collect", "clean-write", "train", "train-steps", "evaluate", "train-epoch-2",
    "predict-write",
]
MAX_ATTEMPTS = 30

#: tiny, fast and never gated: 2 epochs, a budget for many training runs, no accuracy gate
TINY_RUN = f"""
[train]
epochs = 2
batch_size = 64
[budget]
epsilon = 1000.0
delta = 0.5
[evaluate]
min_accuracy = 0.0
bootstrap = 20
[predict]
source = {json.dumps(str(PREDICT_INPUT))}
"""


# ----------------------------------------------------------------------- checks shared
# with tests/test_concurrency.py


def assert_no_incomplete_artifact_visible(store: ArtifactStore) -> dict[str, set[str]]:
    """Every version folder without a leading dot is a complete artifact; returns them."""
    seen: dict[str, set[str]] = {}
    for stage in STAGES:
        folder = store.stage_dir(stage)
        visible = ({p.name for p in folder.iterdir() if not p.name.startswith(".")}
                   if folder.is_dir() else set())
        complete = {a.version: a for a in store.versions(stage)}
        assert visible == set(complete), (
            f"{stage}: folder(s) that look like versions but have no valid manifest: "
            f"{sorted(visible - set(complete))}")
        for artifact in complete.values():
            verify_checksums(artifact)  # IntegrityError names the file
            listed = {out["name"] for out in artifact.manifest["outputs"]}
            present = {p.name for p in artifact.path.iterdir()} - {MANIFEST}
            assert present == listed, f"{artifact.path}: files {present} but manifest {listed}"
        seen[stage] = set(complete)
    return seen


def assert_ledger_consistent(store: ArtifactStore, config: Config) -> list[dict]:
    """budget.json is a valid ledger whose totals are the sum of its runs, and every
    committed model is in it. Returns its entries."""
    raw = json.loads((store.dataset_dir / "budget.json").read_text("utf-8"))
    entries = Ledger(store).read()["entries"]  # IntegrityError if damaged
    assert raw["entries"] == entries
    run_ids = [e["run_id"] for e in entries]
    assert len(run_ids) == len(set(run_ids)), f"duplicate run ids in the ledger: {run_ids}"
    statuses = Counter(e["status"] for e in entries)
    assert set(statuses) <= {"reserved", "settled"}, (
        f"no run in these tests stops gracefully before its first step, so nothing may be "
        f"released: {statuses}")

    settled = [e for e in entries if e["status"] == "settled" and e.get("private", True)]
    reserved = [e for e in entries if e["status"] == "reserved"]
    summary = budget_summary(config, store)
    assert summary["spent_epsilon"] == pytest.approx(sum(e["epsilon_spent"] for e in settled))
    assert summary["spent_delta"] == pytest.approx(sum(e["delta_spent"] for e in settled))
    assert summary["reserved_epsilon"] == pytest.approx(sum(e["epsilon"] for e in reserved))
    assert summary["reserved_delta"] == pytest.approx(sum(e["delta"] for e in reserved))
    counted = summary["spent_epsilon"] + summary["reserved_epsilon"]
    # Runs compose tightly (never above their sum); what is left is the budget minus that.
    assert summary["composed_epsilon"] <= counted + 1e-9
    assert summary["remaining_epsilon"] == pytest.approx(
        max(config.budget.epsilon - summary["composed_epsilon"], 0))
    assert summary["private_runs"] == len(entries)

    by_run = {e["run_id"]: e for e in entries}
    models = store.versions("train")
    for model in models:
        entry = by_run.get(model.figures["run_id"])
        assert entry is not None, f"model {model.version} was trained but is not in the ledger"
        if entry["status"] == "settled":
            assert entry["version"] == model.version
            assert entry["epsilon_spent"] == pytest.approx(model.figures["epsilon"])
            assert entry["epsilon_spent"] <= entry["epsilon"] + 1e-9
    model_versions = {m.version for m in models}
    for entry in settled:
        assert entry["version"] in model_versions, (
            f"ledger run {entry['run_id']} settled for a model that was never committed")
    return entries


def verify_cli(config_path: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return run_subprocess(["--config", str(config_path), "--artifacts", str(root),
                           "artifacts", "verify"])


# ----------------------------------------------------------------------- the harness


@dataclass
class KillPoint:
    attempt: int
    aim: str
    delay: float
    killed: bool = False
    returncode: int | None = None
    landed: str = ""
    detail: str = ""
    reserved: bool = False  # the killed run had reserved budget: a training run had started
    checkpointed: bool = False  # ... and saved at least one epoch
    seconds: float = 0.0  # kill, checks and rerun


class Child:
    """`python -m personanet ... run`, its stderr log lines read as they come.

    `trigger` marks the moment the aimed-at span begins: a log line containing the
    text, or a new entry appearing in a folder (polled every millisecond).
    """

    def __init__(self, args: list[str], *, trigger: str | Path | None) -> None:
        self.lines: list[str] = []
        self.triggered = threading.Event()
        self._trigger = trigger
        self._existing = (set(os.listdir(trigger)) if isinstance(trigger, Path)
                          and trigger.is_dir() else set())
        self.proc = subprocess.Popen([sys.executable, "-m", "personanet", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        if trigger is None:
            self.triggered.set()
        elif isinstance(trigger, Path):
            threading.Thread(target=self._watch, args=(trigger,), daemon=True).start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if isinstance(self._trigger, str) and self._trigger in line:
                self.triggered.set()
        self.triggered.set()  # end of output: nothing more to wait for

    def _watch(self, folder: Path) -> None:
        while not self.triggered.is_set():
            try:
                if set(os.listdir(folder)) - self._existing:
                    self.triggered.set()
            except FileNotFoundError:
                pass
            time.sleep(0.001)

    def kill_after_trigger(self, delay: float) -> bool:
        """SIGKILL `delay` s after the trigger; False if the child ended first."""
        self.triggered.wait(timeout=120)
        time.sleep(delay)
        if self.proc.poll() is not None:
            self.proc.wait()
            self._reader.join(timeout=10)
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return self.proc.returncode == -signal.SIGKILL


#: stages aimed at while they write their artifact (train's writing follows its steps)
WRITTEN = ("collect", "clean", "evaluate", "predict")


def aims(store: ArtifactStore) -> dict[str, tuple[str, str | Path | None]]:
    """Per aim: the stage `run --force` recomputes from, and the sign that the span began:
    the log line saying the stage before was reused; the stage's temporary folder (made
    when it starts writing its artifact); or the training run's checkpoint folder, which
    `train` opens right after reserving the budget."""
    plan: dict[str, tuple[str, str | Path | None]] = {
        "collect": ("collect", None),  # the moment the process starts
        "clean": ("clean", "collect: reusing"),
        "train": ("train", "clean: reusing"),
        "train-steps": ("train", store.dataset_dir / "checkpoints"),
        "train-epoch-2": ("train", '"epoch": 1,'),
        "evaluate": ("evaluate", "reusing train artifact"),
        "predict": ("predict", "evaluate: reusing"),
    }
    for stage in WRITTEN:
        plan[f"{stage}-write"] = (stage, store.stage_dir(stage))
    return plan


def _seconds(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def span_durations(store: ArtifactStore, started: float) -> dict[str, float]:
    """Each aimed-at span's wall time in one uninterrupted run, from the artifacts'
    created_at and the ledger's reserved_at (the start of the DP-SGD steps)."""
    done = {stage: _seconds(store.versions(stage)[-1].created_at) for stage in STAGES}
    reserved = _seconds(Ledger(store).entries[-1]["reserved_at"])
    spans = {
        "collect": done["collect"] - started,
        "clean": done["clean"] - done["collect"],
        "train": reserved - done["clean"],
        "evaluate": done["evaluate"] - done["train"],
        "predict": done["predict"] - done["evaluate"],
    }
    for stage in WRITTEN:  # a version id starts with the time its temporary folder was made
        artifact = store.versions(stage)[-1]
        begun = dt.datetime.strptime(artifact.version.split("Z-")[0], "%Y%m%dT%H%M%S.%f")
        spans[f"{stage}-write"] = done[stage] - begun.replace(tzinfo=dt.UTC).timestamp()
    spans.update(steps_spans(Ledger(store).entries))
    return {aim: max(span, 0.002) for aim, span in spans.items()}


def steps_spans(entries: list[dict]) -> dict[str, float]:
    """The DP-SGD steps take a fraction of a second: the shortest reservation-to-settlement
    seen so far (every completed training run adds one), so that kills stay inside."""
    steps = min(_seconds(e["settled_at"]) - _seconds(e["reserved_at"])
                for e in entries if e["status"] == "settled")
    # from the end of epoch 1 of 2 (its checkpoint being written) to the settlement
    return {"train-steps": steps, "train-epoch-2": steps / 2}


def snapshot(store: ArtifactStore) -> dict[str, set[str]]:
    folders = {stage: store.stage_dir(stage) for stage in STAGES}
    folders["checkpoints"] = store.dataset_dir / "checkpoints"
    return {name: set(os.listdir(folder)) if folder.is_dir() else set()
            for name, folder in folders.items()}


def landing(store: ArtifactStore, forced: str, before: dict[str, set[str]],
            after: dict[str, set[str]], mine: list[dict], lines: list[str]) -> tuple[str, str]:
    """The stage the killed run was in: the first, from the forced one on, that it had not
    committed (the stages before were reused, in a blink)."""
    for stage in STAGES[STAGES.index(forced):]:
        new = after[stage] - before[stage]
        if any(not name.startswith(".") for name in new):
            continue
        detail = ("its temporary folder left behind"
                  if any(n.startswith(TMP_PREFIX) for n in new) else "nothing written yet")
        if stage == "train":
            if not mine:
                detail = "set-up, before the budget reservation"
            else:
                run_dir = store.dataset_dir / "checkpoints" / mine[0]["run_id"]
                epochs = sum(1 for line in lines if '"epoch": ' in line)
                saved = sorted(p.name for p in run_dir.glob("epoch-*"))
                detail = (f"DP-SGD steps, after reserving epsilon {mine[0]['epsilon']:g}; "
                          f"{epochs} epoch(s) logged, checkpoints {saved or 'none'}")
        return stage, detail
    return "exit", "every stage had committed; killed while exiting"


@pytest.mark.slow
def test_run_killed_at_any_moment_leaves_no_partial_artifact_and_an_honest_ledger(
        tmp_path: Path, small_csv: Path, key_env: MasterKey) -> None:
    config_path = write_config(tmp_path / "persona.toml", small_csv, overrides=TINY_RUN)
    config = load_config(config_path)
    root = tmp_path / "artifacts"
    store = ArtifactStore(root, config.dataset.name)
    base = ["--config", str(config_path), "--artifacts", str(root), "--log-format", "json"]

    # One uninterrupted run: the timings the kill moments are fractions of.
    started = time.time()
    first = run_subprocess([*base, "run"])
    assert first.returncode == 0, first.stderr
    durations = span_durations(store, started)
    first_spans = ", ".join(f"{aim} {seconds:.3f}s" for aim, seconds in durations.items())
    plan = aims(store)

    rng = random.Random(SEED)
    points: list[KillPoint] = []
    started_runs: dict[str, str] = {}  # killed runs that had reserved budget: their status
    for attempt in range(MAX_ATTEMPTS):
        killed = [p for p in points if p.killed]
        missing = [s for s in STAGES if s not in {p.landed for p in killed}]
        if sum(p.reserved for p in killed) < KILLS_AFTER_RESERVATION_REQUIRED:
            missing.append("train-steps")
        if attempt >= len(PLANNED_AIMS):
            if len(killed) >= KILLS_REQUIRED and not missing:
                break
            aim = (missing or PLANNED_AIMS)[attempt % len(missing or PLANNED_AIMS)]
        else:
            aim = PLANNED_AIMS[attempt]
        forced, trigger = plan[aim]
        durations.update(steps_spans(Ledger(store).entries))
        point = KillPoint(attempt, aim, rng.uniform(0.05, 0.9) * durations[aim])
        cycle = time.monotonic()

        before = snapshot(store)
        child = Child([*base, "run", "--force", forced], trigger=trigger)
        point.killed = child.kill_after_trigger(point.delay)
        point.returncode = child.proc.returncode
        if not point.killed:
            assert point.returncode == 0, "\n".join(child.lines)
        after = snapshot(store)

        # 1. Nothing incomplete is visible; every committed file matches its manifest.
        assert_no_incomplete_artifact_visible(store)
        # 2. The ledger counts every training run that had started.
        entries = assert_ledger_consistent(store, config)
        by_run = {e["run_id"]: e for e in entries}
        for run_id in after["checkpoints"] - before["checkpoints"]:
            assert run_id in by_run, (
                f"training run {run_id} opened its checkpoint folder (so it had reserved and "
                "was about to take steps) but the ledger does not count it")
        mine = [e for e in entries if e.get("pid") == child.proc.pid]
        if any('"epoch": ' in line for line in child.lines):
            assert mine, "a run that finished an epoch of DP-SGD is missing from the ledger"
        for entry in mine:
            started_runs[entry["run_id"]] = entry["status"]
        for run_id, status in started_runs.items():
            assert by_run[run_id]["status"] == status, (
                f"the killed training run {run_id} went from {status} to {by_run[run_id]}")
        floor = sum(by_run[r]["epsilon"] if by_run[r]["status"] == "reserved"
                    else by_run[r]["epsilon_spent"] for r in started_runs)
        summary = budget_summary(config, store)
        assert summary["spent_epsilon"] + summary["reserved_epsilon"] >= floor - 1e-9
        # 3. `artifacts verify` re-hashes and authenticates everything that is visible.
        verified = verify_cli(config_path, root)
        assert verified.returncode == 0, verified.stderr

        if point.killed:
            point.landed, point.detail = landing(store, forced, before, after, mine,
                                                 child.lines)
            point.reserved = any(e["status"] == "reserved" for e in mine)
            point.checkpointed = point.reserved and any(
                any((store.dataset_dir / "checkpoints" / e["run_id"]).glob("epoch-*"))
                for e in mine)
        points.append(point)

        # 4. The next run completes; after a training run killed with epochs on disk, the
        # next one trains to the end beside its leftovers (reservation, checkpoints).
        again = ["run", "--force", "train"] if point.checkpointed else ["run"]
        rerun = run_subprocess([*base, *again])
        assert rerun.returncode == 0, (
            f"rerun after a kill in {point.landed} ({point.detail}) failed: {rerun.stderr}")
        assert_no_incomplete_artifact_visible(store)
        entries = assert_ledger_consistent(store, config)
        by_run = {e["run_id"]: e for e in entries}
        for run_id, status in started_runs.items():
            assert by_run[run_id]["status"] == status, (
                f"the rerun changed killed training run {run_id} from {status} to "
                f"{by_run[run_id]}: a killed run must stay counted in full")
        still_open = {e["run_id"] for e in entries if e["status"] == "reserved"}
        assert still_open <= set(started_runs), (
            f"reservations of runs that were not killed are still open: "
            f"{still_open - set(started_runs)}")
        for stage in STAGES:
            store.get(stage)  # the newest of every stage is complete and readable
        point.seconds = time.monotonic() - cycle

    killed = [p for p in points if p.killed]
    report = "\n".join(
        f"  kill {p.attempt:2d} ({p.seconds:4.1f}s): aimed at {p.aim:14s} +{p.delay:6.3f}s -> "
        + (f"landed in {p.landed:8s} ({p.detail})" if p.killed
           else f"missed: the run had already exited {p.returncode}")
        for p in points)
    print(f"\ncrash harness: {len(killed)} kills survived, by stage "
          f"{dict(Counter(p.landed for p in killed))}\nspans of the uninterrupted run: "
          f"{first_spans}\n{report}")
    assert len(killed) >= KILLS_REQUIRED, report
    assert {p.landed for p in killed} >= set(STAGES), report
    assert sum(p.reserved for p in killed) >= KILLS_AFTER_RESERVATION_REQUIRED, report

    final = verify_cli(config_path, root)
    assert final.returncode == 0, final.stderr
    entries = assert_ledger_consistent(store, config)
    assert {e["run_id"]: e["status"] for e in entries if e["run_id"] in started_runs} == (
        started_runs)
