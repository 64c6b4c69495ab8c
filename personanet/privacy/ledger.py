"""The ledger: every (epsilon, delta) a dataset's training runs may spend and did spend.

Stored at ``<artifact root>/<dataset>/budget.json``. A run *reserves* its plan before its
first step and *settles* at the accountant's final figure when it ends; one that dies
(SIGKILL, power cut, an exception after the first step) stays counted in full, and only
one that stopped before its first step is released. How entries compose (tightly, for
DP-SGD runs) is `personanet.privacy.composition`. The budget is pinned at the first charge
and changed only by `Ledger.set_budget`; the file is sealed with an HMAC under the master key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any

from personanet.errors import IntegrityError, KeyAccessError, OutputError, UsageError
from personanet.privacy import composition
from personanet.privacy.composition import SLACK, check_budget, dpsgd_phase, effective_budget
from personanet.store.artifacts import new_version, utc_now
from personanet.store.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from personanet.config import Config
    from personanet.store.artifacts import ArtifactStore
    from personanet.store.keys import MasterKey

logger = logging.getLogger("personanet")

LEDGER_FILE = "budget.json"
#: /2: a pinned budget, its history of changes, and a seal (HMAC); an earlier personanet
#: refuses it rather than ignore the pin. /1 ledgers are read, and upgraded at their next change.
LEDGER_FORMAT = "personanet.budget/2"
LEDGER_FORMATS_READ = ("personanet.budget/1", LEDGER_FORMAT)


class Ledger:
    """The privacy budget of one dataset and what was spent of it, in
    ``<root>/<dataset>/budget.json``.

    Every mutation reads the file, changes it and rewrites it atomically (temporary
    file, fsync, rename, fsync of the folder) while holding the artifact root's
    writer lock, so concurrent runs can never both take the last of the budget.

    The budget is *pinned* in the ledger at the first charge (from the config then in
    use). A config asking for more than the pin is refused (exit 69) until a key holder
    raises the pin with `set_budget` (``personanet budget set``), which is logged with
    its reason, time and key id; a config asking for less is honoured for its run.

    With a `key`, the ledger is sealed: an HMAC-SHA256 over its canonical JSON, under a
    key derived from the master key for this purpose only. An edited ledger (spent
    lowered, pin raised) is refused (exit 65). Without a key the ledger can be read
    (unauthenticated, for `budget show` without a key) but not changed.
    """

    def __init__(self, store: ArtifactStore, key: MasterKey | None = None) -> None:
        self.store = store
        self.key = key
        self.path = store.dataset_dir / LEDGER_FILE

    # ---------------------------------------------------------------- reading

    def read(self) -> dict[str, Any]:
        """The ledger document; an empty one when no run has reserved anything yet.

        Raises:
            IntegrityError: (65) the file exists but is not a ledger, or its seal does
                not match (edited outside personanet). It is never silently reset: the
                budget already spent would be forgotten.
            KeyAccessError: (77) it is sealed under another master key.
        """
        try:
            raw = self.path.read_text("utf-8")
        except FileNotFoundError:
            return {"format": LEDGER_FORMAT, "dataset": self.store.dataset, "entries": []}
        except OSError as exc:
            raise IntegrityError(f"cannot read budget ledger {self.path}: {exc.strerror}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if (not isinstance(doc, dict) or doc.get("format") not in LEDGER_FORMATS_READ
                or not isinstance(doc.get("entries"), list)):
            raise IntegrityError(
                f"budget ledger {self.path} is damaged; restore it from a backup (training is "
                "refused while the budget already spent is unknown)"
            )
        if self.key is not None:
            self._verify(doc, self.key)
        return doc

    @property
    def authenticated(self) -> bool:
        """Whether reads are checked against the seal (a key was given)."""
        return self.key is not None

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.read()["entries"])

    def entry(self, run_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e.get("run_id") == run_id), None)

    def totals(self) -> dict[str, float]:
        """Settled and reserved (epsilon, delta) summed; a reservation counts in full."""
        return composition.totals(self.entries)

    def check(self, *, epsilon: float, delta: float, budget_epsilon: float,
              budget_delta: float, **parameters: Any) -> None:
        """Would a run of (epsilon, delta) be allowed now? (`reserve` checks again.) With
        its `parameters` (noise_multiplier, sample_rate, steps_planned) it is composed as
        `reserve` would; without, only whether any budget is left (`check_budget`).

        Raises:
            BudgetExhaustedError: (69) it would not fit, or the config's budget is above
                the pinned one.
        """
        doc = self.read()
        self._check_covers_models(doc)
        limit = effective_budget(doc, dataset=self.store.dataset,
                                 budget_epsilon=budget_epsilon, budget_delta=budget_delta)
        run = {"status": "reserved", "epsilon": float(epsilon), "delta": float(delta),
               **parameters}
        check_budget(doc["entries"], dataset=self.store.dataset, planned=run,
                     budget_epsilon=limit[0], budget_delta=limit[1],
                     room_only=dpsgd_phase(run) is None)

    def verify(self) -> None:
        """Check the ledger (seal, and that it records every private model of the store):
        part of ``artifacts verify``. Raises as `read` and `check` do."""
        self._check_covers_models(self.read())

    def _check_covers_models(self, doc: dict[str, Any]) -> None:
        """IntegrityError (65) when a private model of the store is missing from the ledger.

        The seal stops edits, not an older genuine ledger put back (less spent). Every
        private train artifact names its run in its (sealed) manifest, and a run is in the
        ledger before its model exists, so a ledger that lacks one is older than the store.
        """
        known = {entry.get("run_id") for entry in doc["entries"]}
        for artifact in self.store.versions("train"):
            run_id = artifact.figures.get("run_id")
            if artifact.figures.get("private") and run_id and run_id not in known:
                raise IntegrityError(
                    f"budget ledger {self.path} does not record run {run_id} of private model "
                    f"{artifact.version}: an older copy was put back (the budget it spent is "
                    "missing); restore the latest ledger")

    # ---------------------------------------------------------------- writing

    def reserve(self, *, epsilon: float, delta: float, budget_epsilon: float,
                budget_delta: float, run_id: str | None = None, **details: Any
                ) -> dict[str, Any]:
        """Reserve (epsilon, delta) for a run before its first step. Its `details` carry
        its DP-SGD plan (noise_multiplier, sample_rate, steps_planned): the run is then
        composed, with its full plan, with every run before it. `budget_epsilon` and
        `budget_delta` are the config's; the pin wins where lower, and the config's pins it.

        Raises:
            BudgetExhaustedError: the reservation would take the dataset past its
                budget, or the config asks for more than the pinned budget; nothing is
                written.
        """
        with self.store.lock():
            doc = self.read()
            self._check_covers_models(doc)
            limit = effective_budget(doc, dataset=self.store.dataset,
                                     budget_epsilon=budget_epsilon, budget_delta=budget_delta,
                                     log=True)
            entry = {
                "run_id": run_id or new_version(), "status": "reserved", "private": True,
                "epsilon": float(epsilon), "delta": float(delta), "epsilon_spent": None,
                "delta_spent": None, "reserved_at": utc_now(), "settled_at": None,
                "version": None, "pid": os.getpid(), **details,
            }
            # The reservation is the composition including this run's full plan.
            check_budget(doc["entries"], dataset=self.store.dataset, planned=entry,
                         budget_epsilon=limit[0], budget_delta=limit[1])
            if not doc.get("budget"):
                legacy = bool(doc["entries"])
                _pin(doc, epsilon=budget_epsilon, delta=budget_delta, action="pinned",
                     source="config", key_id=self._key_id(),
                     reason=("ledger written before budgets were pinned: pinned at its next "
                             "charge from the config then in use") if legacy
                     else "first charge: pinned from the config")
                logger.info("budget of dataset %r pinned in the ledger at epsilon %g, delta %g "
                            "(from the config%s); only `personanet budget set` changes it",
                            self.store.dataset, budget_epsilon, budget_delta,
                            ", the ledger predates pinning" if legacy else "")
            doc["entries"].append(entry)
            self._write(doc)
            return entry

    def set_budget(self, *, epsilon: float, delta: float | None = None,
                   reason: str | None = None, config_epsilon: float,
                   config_delta: float) -> dict[str, Any]:
        """Change the pinned budget: what ``personanet budget set`` does.

        Lowering is always allowed (the reason is optional, recorded when given);
        raising needs a `reason`. Either way the change is appended to the ledger's
        history with its time and the id of the master key that made it (the ledger's
        seal means only a key holder can change it). Without a pin yet, the change is
        measured against the config's budget, which the next charge would have pinned.

        Args:
            epsilon: the new total epsilon the dataset may spend across all runs.
            delta: the new total delta (default: unchanged).
            reason: why; required to raise.
            config_epsilon, config_delta: the config's budget.

        Returns:
            The history record appended (``action`` "raised", "lowered" or
            "unchanged"; nothing is written when unchanged).

        Raises:
            UsageError: (2) raising without a reason, or a figure out of range.
        """
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise UsageError(f"--epsilon must be a number above 0, got {epsilon:g}")
        if delta is not None and not (math.isfinite(delta) and 0 < delta < 1):
            raise UsageError(f"--delta must be in (0, 1), got {delta:g}")
        reason = (reason or "").strip() or None
        with self.store.lock():
            doc = self.read()
            pinned = doc.get("budget") or {}
            old_eps = float(pinned.get("epsilon", config_epsilon))
            old_delta = float(pinned.get("delta", config_delta))
            new_delta = old_delta if delta is None else float(delta)
            raised = epsilon > old_eps + SLACK or new_delta > old_delta * (1 + SLACK)
            lowered = epsilon < old_eps - SLACK or new_delta < old_delta * (1 - SLACK)
            action = "raised" if raised else "lowered" if lowered else "unchanged"
            record = {"action": action, "epsilon": float(epsilon), "delta": new_delta,
                      "previous_epsilon": old_eps, "previous_delta": old_delta,
                      "source": "budget set", "reason": reason, "key_id": self._key_id(),
                      "at": utc_now()}
            if action == "unchanged":
                return record
            if raised and reason is None:
                raise UsageError(
                    f"raising the budget of dataset {self.store.dataset!r} (epsilon "
                    f"{old_eps:g} -> {epsilon:g}, delta {old_delta:g} -> {new_delta:g}) needs "
                    "--reason TEXT: the change is logged in the ledger with it")
            _pin(doc, **{k: record[k] for k in ("epsilon", "delta", "action", "source",
                                                 "reason", "key_id")})
            self._write(doc)
            counted = composition.compose(doc["entries"], delta=new_delta).epsilon
            if counted > epsilon + SLACK:
                logger.warning("dataset %r has already spent epsilon %.4g, more than the new "
                               "budget %g: no private run is allowed until it is raised",
                               self.store.dataset, counted, epsilon)
            logger.info("budget of dataset %r %s: epsilon %g -> %g, delta %g -> %g (key %s)",
                        self.store.dataset, action, old_eps, epsilon, old_delta, new_delta,
                        self._key_id())
            return doc["budget_history"][-1]

    def settle(self, run_id: str, *, epsilon: float, delta: float, **details: Any
               ) -> dict[str, Any]:
        """Close a reservation at what the accountant says the run spent (<= reserved)."""
        def change(entry: dict[str, Any]) -> None:
            if entry["status"] != "reserved":
                raise IntegrityError(f"ledger entry {run_id} is {entry['status']}, not reserved")
            # Never settle above the reservation without saying so: it would mean the
            # budget check was done against a smaller figure than was spent.
            if epsilon > entry["epsilon"] + SLACK:
                logger.warning("run %s spent epsilon %.4f, more than the %.4f reserved",
                               run_id, epsilon, entry["epsilon"])
            entry.update(status="settled", epsilon_spent=float(epsilon),
                         delta_spent=float(delta), settled_at=utc_now(), **details)
        return self._update(run_id, change)

    def release(self, run_id: str, *, reason: str) -> dict[str, Any]:
        """Give a reservation back: only for a run that stopped before its first step."""
        def change(entry: dict[str, Any]) -> None:
            if entry["status"] != "reserved":
                return
            entry.update(status="released", epsilon_spent=0.0, delta_spent=0.0,
                         settled_at=utc_now(), note=reason)
        return self._update(run_id, change)

    def update(self, run_id: str, **details: Any) -> dict[str, Any]:
        """Record details of a run (its progress, the artifact it wrote)."""
        return self._update(run_id, lambda entry: entry.update(details))

    def record_non_private(self, **details: Any) -> dict[str, Any]:
        """A `--no-dp` run: no epsilon is charged, but the ledger keeps an audit line."""
        with self.store.lock():
            doc = self.read()
            entry = {"run_id": details.pop("run_id", None) or new_version(), "status": "settled",
                     "private": False, "epsilon": None, "delta": None, "epsilon_spent": None,
                     "delta_spent": None, "reserved_at": utc_now(), "settled_at": utc_now(),
                     "note": "trained without differential privacy (--no-dp): no guarantee "
                             "covers this model", **details}
            doc["entries"].append(entry)
            self._write(doc)
            return entry

    def reseal(self, new_key: MasterKey) -> None:
        """Seal the ledger under `new_key` (after checking it under this ledger's key):
        part of ``keys rotate``. A ledger already under `new_key` is left as it is, so an
        interrupted rotation can run again."""
        with self.store.lock():
            if not self.path.exists():
                return
            try:
                raw = json.loads(self.path.read_text("utf-8"))
            except (OSError, ValueError):
                raw = None
            if isinstance(raw, dict) and (raw.get("seal") or {}).get("key_id") == new_key.key_id:
                Ledger(self.store, new_key).read()
                return
            doc = self.read()
            Ledger(self.store, new_key)._write(doc)

    def _update(self, run_id: str, change: Any) -> dict[str, Any]:
        with self.store.lock():
            doc = self.read()
            for entry in doc["entries"]:
                if entry.get("run_id") == run_id:
                    change(entry)
                    self._write(doc)
                    return dict(entry)
        raise IntegrityError(f"budget ledger {self.path} has no run {run_id!r}")

    def _key_id(self) -> str | None:
        return self.key.key_id if self.key is not None else None

    def _verify(self, doc: dict[str, Any], key: MasterKey) -> None:
        seal = doc.get("seal")
        if seal is None:
            # Only a /1 ledger (written before seals) may lack one, and such a ledger
            # never had a pin or a history of changes.
            if doc.get("format") == LEDGER_FORMAT or "budget" in doc or "budget_history" in doc:
                raise IntegrityError(f"budget ledger {self.path} has lost its seal (edited "
                                     "outside personanet); restore it from a backup")
            if not getattr(self, "_warned_unsealed", False):
                self._warned_unsealed = True
                logger.warning("budget ledger %s has no seal (written by an earlier "
                               "personanet): it is accepted as it is and sealed at its next "
                               "change", self.path)
            return
        if not isinstance(seal, dict) or seal.get("key_id") != key.key_id:
            other = seal.get("key_id") if isinstance(seal, dict) else None
            raise KeyAccessError(f"budget ledger {self.path} is sealed under key id {other}, "
                                 f"not the loaded key {key.key_id}: load that key, or finish "
                                 "`personanet keys rotate`")
        expected = _ledger_mac(doc, key)
        if not hmac.compare_digest(str(seal.get("hmac_sha256", "")), expected):
            raise IntegrityError(
                f"budget ledger {self.path} was changed outside personanet (its seal does "
                "not match); restore it from a backup: training is refused while the budget "
                "spent is in doubt")

    def _write(self, doc: dict[str, Any]) -> None:
        if self.key is None:
            raise KeyAccessError("changing the budget ledger needs the master key (set "
                                 "PERSONANET_KEY_FILE): the ledger is sealed with it")
        doc = {k: v for k, v in doc.items() if k != "seal"}
        doc.update(format=LEDGER_FORMAT, dataset=self.store.dataset, updated_at=utc_now())
        doc["seal"] = {"key_id": self.key.key_id, "algorithm": "HMAC-SHA256",
                       "hmac_sha256": _ledger_mac(doc, self.key)}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write budget ledger {self.path}: {exc.strerror}") from None
        atomic_write_bytes(self.path, data)


#: HKDF purpose of the ledger's seal key: unrelated to the keys of data, pseudonyms and
#: manifests derived from the same master key.
LEDGER_SEAL_PURPOSE = "budget-ledger-seal"


def _ledger_mac(doc: dict[str, Any], key: MasterKey) -> str:
    body = {k: v for k, v in doc.items() if k != "seal"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key.derive(LEDGER_SEAL_PURPOSE), canonical.encode("utf-8"),
                    hashlib.sha256).hexdigest()


def _pin(doc: dict[str, Any], *, epsilon: float, delta: float, action: str, source: str,
         reason: str | None, key_id: str | None) -> None:
    """Set the pinned budget and append the change to the ledger's history."""
    now = utc_now()
    previous = doc.get("budget") or {}
    doc["budget"] = {"epsilon": float(epsilon), "delta": float(delta), "set_at": now}
    doc.setdefault("budget_history", []).append({
        "action": action, "epsilon": float(epsilon), "delta": float(delta),
        "previous_epsilon": previous.get("epsilon"), "previous_delta": previous.get("delta"),
        "source": source, "reason": reason, "key_id": key_id, "at": now})


def budget_summary(config: Config, store: ArtifactStore, key: MasterKey | None = None
                   ) -> dict[str, Any]:
    """What `personanet budget show` prints (and ``--json``).

    `budget_*`: the budget in force (the pinned one, or the config's where lower).
    `composed_epsilon`: what every counted run spends together at `budget_delta`, by
    `composition_method` (`personanet.privacy.composition`); `remaining_epsilon` is the
    budget minus it. `spent_*` (settled) and `reserved_*` (unfinished, killed included)
    are the runs' own figures summed; `added_epsilon`, their total, is what addition
    would charge. `next_run`: what one more run like the last one would add (the
    config's own plan is known only once train has read the rows). With `key` the
    ledger's seal is checked (``authenticated: true``).
    """
    ledger = Ledger(store, key)
    doc = ledger.read()
    entries = list(doc["entries"])
    spent = composition.totals(entries)
    pinned = doc.get("budget") or None
    config_eps, config_delta = config.budget.epsilon, config.budget.delta
    if pinned:
        budget_eps = min(config_eps, float(pinned["epsilon"]))
        budget_delta = min(config_delta, float(pinned["delta"]))
    else:
        budget_eps, budget_delta = config_eps, config_delta
    composed = composition.compose(entries, delta=budget_delta)
    return {
        "dataset": store.dataset, "ledger": str(ledger.path),
        "authenticated": ledger.authenticated,
        "budget_epsilon": budget_eps,
        "budget_delta": budget_delta,
        "pinned": bool(pinned),
        "pinned_epsilon": float(pinned["epsilon"]) if pinned else None,
        "pinned_delta": float(pinned["delta"]) if pinned else None,
        "config_epsilon": config_eps,
        "config_delta": config_delta,
        "config_above_pin": bool(pinned) and (config_eps > float(pinned["epsilon"])
                                              or config_delta > float(pinned["delta"])),
        "budget_history": list(doc.get("budget_history") or []),
        "composed_epsilon": composed.epsilon,
        "composition_method": composed.method,
        "added_epsilon": composed.added_epsilon,
        "spent_epsilon": spent["settled_epsilon"],
        "spent_delta": spent["settled_delta"],
        "reserved_epsilon": spent["reserved_epsilon"],
        "reserved_delta": spent["reserved_delta"],
        "remaining_epsilon": max(budget_eps - composed.epsilon, 0.0),
        "remaining_delta": max(budget_delta - composed.other_delta, 0.0),
        "next_run": composition.next_run_cost(entries, delta=budget_delta,
                                              train_epsilon=config.train.epsilon),
        "private_runs": sum(1 for e in entries if e.get("private", True)),
        "non_private_runs": sum(1 for e in entries if not e.get("private", True)),
        "entries": entries,
    }

