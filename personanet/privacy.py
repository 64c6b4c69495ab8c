"""Privacy accounting: the per-dataset budget ledger, epsilon, and per-example clipping.

Three things live here, each small:

- `Ledger`: every (epsilon, delta) a training run may spend on a dataset,
  stored at ``<artifact root>/<dataset>/budget.json``. A run *reserves* its
  requested budget before its first optimisation step and *settles* it at the
  accountant's final epsilon when it ends. A run that dies (SIGKILL, power cut,
  an exception after the first step) keeps its full reservation counted: the
  ledger never assumes that lost work leaked less than planned. A reservation
  is released (counted as zero) only when the run stopped before its first
  step. Runs compose by basic sequential composition: the epsilons add up, and
  so do the deltas.
- `compute_epsilon`: the privacy loss of DP-SGD with Poisson sampling from its
  three public parameters (noise multiplier, sample rate, steps), with Opacus'
  accountants. `train` records these parameters in ``privacy.json`` so anyone
  can recompute the figure.
- `BookkeepingClipper`: per-example gradient clipping for PersonaNet in one
  backward pass (ghost norms plus book-keeping), the fast path `train` uses with
  Opacus' optimizer, sampler and accountant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personanet.artifacts import utc_now
from personanet.errors import BudgetExhaustedError, IntegrityError, OutputError

if TYPE_CHECKING:
    import torch
    from rich.table import Table

    from personanet.artifacts import ArtifactStore
    from personanet.config import Config

logger = logging.getLogger("personanet")

LEDGER_FILE = "budget.json"
LEDGER_FORMAT = "personanet.budget/1"
ACCOUNTANTS = ("prv", "rdp")
# Sums of floats: a run that fits exactly must not be refused for a rounding error.
_SLACK = 1e-9


# --------------------------------------------------------------------- accountants


class AccountantError(RuntimeError):
    """An accountant could not compute epsilon (PRV's known numerical failures)."""


@contextlib.contextmanager
def _quiet_numpy() -> Iterator[None]:
    # PRV's discretisation emits overflow/invalid warnings on its way to an answer or a
    # failure; the result is checked below, so the noise only hides real messages.
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        # PRV sizes its domain with an RDP bound; the advice to widen RDP's orders concerns
        # that internal step (and, for "rdp" itself, a bound that is valid, if looser).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def epsilon_of_history(*, accountant: str, history: list[tuple[float, float, int]],
                       delta: float) -> float:
    """Epsilon at `delta` of a sequence of (noise_multiplier, sample_rate, steps) phases.

    Raises:
        AccountantError: the accountant failed or returned something that is not a
            finite, non-negative number.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
    phases = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not phases:
        return 0.0
    return _epsilon(accountant, phases, float(delta))


@functools.lru_cache(maxsize=256)
def _epsilon(accountant: str, history: tuple[tuple[float, float, int], ...],
             delta: float) -> float:
    # Cached: a run asks for the same figure when it plans, as it ends and in its report,
    # and PRV takes tens of milliseconds per answer.
    from opacus.accountants import create_accountant

    engine = create_accountant(mechanism=accountant)
    engine.history = list(history)
    try:
        with _quiet_numpy():
            epsilon = float(engine.get_epsilon(delta=delta, **_accountant_options(accountant)))
    except (ArithmeticError, RuntimeError, ValueError) as exc:
        raise AccountantError(f"{accountant} accountant failed: {exc}") from exc
    if not math.isfinite(epsilon) or epsilon < 0:
        raise AccountantError(f"{accountant} accountant returned epsilon = {epsilon}")
    return epsilon


def _accountant_options(accountant: str) -> dict[str, Any]:
    """RDP over more orders than Opacus' default (which stops at 63).

    At high noise and low sample rates the best order is above 63, and the default
    overstates epsilon 1.6-5x: still a valid bound, but it over-charges the budget.
    The minimum over more orders is still a valid bound, only tighter.
    """
    if accountant != "rdp":
        return {}
    from opacus.accountants import RDPAccountant

    return {"alphas": list(RDPAccountant.DEFAULT_ALPHAS) + [128, 256, 512, 1024]}


def compute_epsilon(*, accountant: str, noise_multiplier: float, sample_rate: float,
                    steps: int, delta: float) -> float:
    """Epsilon of `steps` DP-SGD steps with Poisson sampling, by an Opacus accountant.

    Args:
        accountant: "prv" (numerical composition of privacy random variables, tight;
            Opacus returns its upper bound) or "rdp" (Renyi DP, looser, robust).
        noise_multiplier: Gaussian noise standard deviation divided by the clipping
            norm; more noise, less privacy loss per step.
        sample_rate: the probability that one person's example is in a batch
            (Poisson sampling); smaller rates amplify privacy.
        steps: optimisation steps taken (each one a noisy gradient release).
        delta: the probability with which the epsilon bound may fail.
    """
    return epsilon_of_history(accountant=accountant,
                              history=[(noise_multiplier, sample_rate, steps)], delta=delta)


def noise_for_epsilon(*, accountant: str, target_epsilon: float, delta: float,
                      sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose epsilon is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet_numpy():
            return float(get_noise_multiplier(target_epsilon=target_epsilon,
                                              target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant,
                                              **_accountant_options(accountant)))
    except (ArithmeticError, RuntimeError) as exc:
        raise AccountantError(f"{accountant} accountant failed: {exc}") from exc


# --------------------------------------------------------------------- ledger


class Ledger:
    """The privacy budget spent on one dataset, in ``<root>/<dataset>/budget.json``.

    Every mutation reads the file, changes it and rewrites it atomically (temporary
    file, fsync, rename, fsync of the folder) while holding the artifact root's
    writer lock, so concurrent runs can never both take the last of the budget.
    """

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.path = store.dataset_dir / LEDGER_FILE

    # ---------------------------------------------------------------- reading

    def read(self) -> dict[str, Any]:
        """The ledger document; an empty one when no run has reserved anything yet.

        Raises:
            IntegrityError: the file exists but is not a ledger. It is never silently
                reset: the budget already spent would be forgotten.
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
        if (not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT
                or not isinstance(doc.get("entries"), list)):
            raise IntegrityError(
                f"budget ledger {self.path} is damaged; restore it from a backup (training is "
                "refused while the budget already spent is unknown)"
            )
        return doc

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.read()["entries"])

    def entry(self, run_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e.get("run_id") == run_id), None)

    def totals(self) -> dict[str, float]:
        """Settled and reserved (epsilon, delta); a reservation counts in full."""
        return _totals(self.entries)

    # ---------------------------------------------------------------- writing

    def reserve(self, *, epsilon: float, delta: float, budget_epsilon: float,
                budget_delta: float, run_id: str | None = None, **details: Any
                ) -> dict[str, Any]:
        """Reserve (epsilon, delta) for a run before its first step.

        Raises:
            BudgetExhaustedError: the reservation would take the dataset past its
                budget; nothing is written.
        """
        with self.store.lock():
            doc = self.read()
            check_budget(doc["entries"], dataset=self.store.dataset, epsilon=epsilon,
                         delta=delta, budget_epsilon=budget_epsilon, budget_delta=budget_delta)
            entry = {
                "run_id": run_id or _run_id(), "status": "reserved", "private": True,
                "epsilon": float(epsilon), "delta": float(delta),
                "epsilon_spent": None, "delta_spent": None,
                "reserved_at": utc_now(), "settled_at": None, "version": None,
                "pid": os.getpid(), **details,
            }
            doc["entries"].append(entry)
            self._write(doc)
            return entry

    def settle(self, run_id: str, *, epsilon: float, delta: float, **details: Any
               ) -> dict[str, Any]:
        """Close a reservation at what the accountant says the run spent (<= reserved)."""
        def change(entry: dict[str, Any]) -> None:
            if entry["status"] != "reserved":
                raise IntegrityError(f"ledger entry {run_id} is {entry['status']}, not reserved")
            # Never settle above the reservation without saying so: it would mean the
            # budget check was done against a smaller figure than was spent.
            if epsilon > entry["epsilon"] + _SLACK:
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
            entry = {"run_id": details.pop("run_id", None) or _run_id(), "status": "settled",
                     "private": False, "epsilon": None, "delta": None, "epsilon_spent": None,
                     "delta_spent": None, "reserved_at": utc_now(), "settled_at": utc_now(),
                     "note": "trained without differential privacy (--no-dp): no guarantee "
                             "covers this model", **details}
            doc["entries"].append(entry)
            self._write(doc)
            return entry

    def _update(self, run_id: str, change: Any) -> dict[str, Any]:
        with self.store.lock():
            doc = self.read()
            for entry in doc["entries"]:
                if entry.get("run_id") == run_id:
                    change(entry)
                    self._write(doc)
                    return dict(entry)
        raise IntegrityError(f"budget ledger {self.path} has no run {run_id!r}")

    def _write(self, doc: dict[str, Any]) -> None:
        doc = {**doc, "format": LEDGER_FORMAT, "dataset": self.store.dataset,
               "updated_at": utc_now()}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        tmp = self.path.with_name(f".{LEDGER_FILE}.tmp-{secrets.token_hex(4)}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with open(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write budget ledger {self.path}: {exc.strerror}") from None
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _run_id() -> str:
    from personanet.artifacts import new_version

    return new_version()


def _counted(entry: dict[str, Any]) -> tuple[float, float]:
    """What an entry counts against the budget: reserved in full until settled."""
    if not entry.get("private", True):
        return 0.0, 0.0
    if entry.get("status") == "reserved":
        return float(entry["epsilon"]), float(entry["delta"])
    if entry.get("status") == "settled":
        return float(entry.get("epsilon_spent") or 0.0), float(entry.get("delta_spent") or 0.0)
    return 0.0, 0.0


def _totals(entries: list[dict[str, Any]]) -> dict[str, float]:
    out = {"settled_epsilon": 0.0, "settled_delta": 0.0,
           "reserved_epsilon": 0.0, "reserved_delta": 0.0}
    for entry in entries:
        eps, delta = _counted(entry)
        kind = "reserved" if entry.get("status") == "reserved" else "settled"
        out[f"{kind}_epsilon"] += eps
        out[f"{kind}_delta"] += delta
    return out


def check_budget(entries: list[dict[str, Any]], *, dataset: str, epsilon: float, delta: float,
                 budget_epsilon: float, budget_delta: float) -> None:
    """BudgetExhaustedError (exit 69) when (epsilon, delta) does not fit what is left."""
    totals = _totals(entries)
    spent_eps = totals["settled_epsilon"] + totals["reserved_epsilon"]
    spent_delta = totals["settled_delta"] + totals["reserved_delta"]
    left_eps = budget_epsilon - spent_eps
    left_delta = budget_delta - spent_delta
    reserved = (f" (incl. {totals['reserved_epsilon']:.4g} reserved by unfinished runs)"
                if totals["reserved_epsilon"] else "")
    if epsilon > left_eps + _SLACK:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent epsilon "
            f"{spent_eps:.4g}{reserved}, requested {epsilon:.4g}, remaining "
            f"{max(left_eps, 0.0):.4g} of {budget_epsilon:.4g}; lower train.epsilon, reuse an "
            "existing model, or (if policy allows) raise budget.epsilon"
        )
    if delta > left_delta + _SLACK * budget_delta:
        raise BudgetExhaustedError(
            f"privacy budget of dataset {dataset!r} exhausted: spent delta {spent_delta:.3g}, "
            f"requested {delta:.3g}, remaining {max(left_delta, 0.0):.3g} of {budget_delta:.3g}; "
            "lower train.delta or (if policy allows) raise budget.delta"
        )


def budget_summary(config: Config, store: ArtifactStore) -> dict[str, Any]:
    """What `personanet budget show` prints: budget, spent, reserved, remaining, entries.

    `spent_*` are settled runs; `reserved_*` are runs that have not settled (running,
    or killed: those stay counted until resumed to the end); `remaining_*` is the
    budget minus both.
    """
    ledger = Ledger(store)
    entries = ledger.entries
    totals = _totals(entries)
    budget = config.budget
    counted_eps = totals["settled_epsilon"] + totals["reserved_epsilon"]
    counted_delta = totals["settled_delta"] + totals["reserved_delta"]
    return {
        "dataset": store.dataset,
        "ledger": str(ledger.path),
        "budget_epsilon": budget.epsilon,
        "budget_delta": budget.delta,
        "spent_epsilon": totals["settled_epsilon"],
        "spent_delta": totals["settled_delta"],
        "reserved_epsilon": totals["reserved_epsilon"],
        "reserved_delta": totals["reserved_delta"],
        "remaining_epsilon": max(budget.epsilon - counted_eps, 0.0),
        "remaining_delta": max(budget.delta - counted_delta, 0.0),
        "private_runs": sum(1 for e in entries if e.get("private", True)),
        "non_private_runs": sum(1 for e in entries if not e.get("private", True)),
        "entries": entries,
    }


def render_budget(summary: dict[str, Any]) -> Table:
    """The ledger as a rich table (one row per run, totals in the caption)."""
    from rich.table import Table

    table = Table(title=f"privacy budget: {summary['dataset']}", title_justify="left")
    for column in ("run", "status", "private", "epsilon", "delta", "accountant", "steps",
                   "model version"):
        table.add_column(column, justify="right" if column in ("epsilon", "delta", "steps")
                         else "left")
    for entry in summary["entries"]:
        private = entry.get("private", True)
        status = entry.get("status", "?")
        if not private:
            eps_text, delta_text = "none (not DP)", "-"
        elif status == "reserved":
            eps_text = f"{entry['epsilon']:.4g} reserved"
            delta_text = f"{entry['delta']:.2g}"
        else:
            eps_text = f"{entry.get('epsilon_spent') or 0.0:.4g}"
            delta_text = f"{entry.get('delta_spent') or 0.0:.2g}"
        if status == "reserved":
            status = "unfinished (counted; `train --resume`)"
        steps = entry.get("steps")
        planned = entry.get("steps_planned")
        steps_text = f"{steps or 0}/{planned}" if planned else str(steps or "-")
        table.add_row(str(entry.get("run_id", "?")), status, "yes" if private else "NO",
                      eps_text, delta_text, str(entry.get("accountant") or "-"), steps_text,
                      str(entry.get("version") or "-"))
    table.caption = (
        f"epsilon: spent {summary['spent_epsilon']:.4g} + reserved "
        f"{summary['reserved_epsilon']:.4g}, remaining {summary['remaining_epsilon']:.4g} of "
        f"{summary['budget_epsilon']:.4g}   delta: spent {summary['spent_delta']:.3g} + reserved "
        f"{summary['reserved_delta']:.3g}, remaining {summary['remaining_delta']:.3g} of "
        f"{summary['budget_delta']:.3g}"
    )
    if summary["non_private_runs"]:
        table.caption += (f"\n{summary['non_private_runs']} non-private (--no-dp) run(s): "
                          "those models carry no DP guarantee")
    table.caption_justify = "left"
    return table


# --------------------------------------------------------------------- clipping


class UnsupportedLayerError(ValueError):
    """The network has a layer the book-keeping clipper cannot clip exactly."""


class BookkeepingClipper:
    """Per-example gradient clipping in one backward pass, for PersonaNet's layers.

    DP-SGD needs ``sum_i min(1, C / ||g_i||) g_i`` where ``g_i`` is example i's
    gradient. Opacus' ghost clipping gets the norms ``||g_i||`` without
    materialising ``g_i`` (for a linear layer, ``||g_i||^2 = ||a_i||^2 ||b_i||^2``
    from the layer's input ``a_i`` and output gradient ``b_i``), then runs a
    *second* full backward pass on the reweighted loss to get the clipped sum.
    Book-keeping (Bu et al., "Differentially Private Optimization on Large Model at
    Small Cost", ICML 2023) keeps ``a`` and ``b`` from the single backward pass and
    forms the clipped sum directly, ``W.grad = (c * B)^T A``: the same numbers, one
    backward pass fewer. The output is exactly what Opacus' clipping computes (the
    tests compare both against per-example gradients from Opacus' hooks).

    It needs every trainable layer to be `nn.Linear`, `nn.Embedding` (one index per
    example), `nn.LayerNorm` over the last dimension or `nn.GroupNorm`, used once per
    forward, with ``(batch, features)`` shapes, and no interaction between examples
    (no BatchNorm). `supports()` says whether a network qualifies; anything else goes to
    Opacus' own two-pass ghost clipping.

    Usage: `backward(per_example_losses)` sets ``p.grad`` to the clipped sum, for
    Opacus' `DPOptimizerFastGradientClipping` to noise, scale and account.
    """

    def __init__(self, model: torch.nn.Module, *, max_grad_norm: float) -> None:
        if not self.supports(model):
            raise UnsupportedLayerError("the network has layers book-keeping cannot clip")
        self.max_grad_norm = float(max_grad_norm)
        self._records: list[tuple[Any, Any, Any]] = []
        self._layers = [m for m in model.modules() if _own_parameters(m)]
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        from torch import nn

        for module in model.modules():
            params = _own_parameters(module)
            if not params:
                continue
            if type(module) is nn.Linear:
                continue
            if type(module) is nn.Embedding and module.max_norm is None and not module.sparse:
                continue
            if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
                continue
            if type(module) is nn.GroupNorm:
                continue
            return False
        return True

    def _capture(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        import torch

        if module.training and torch.is_grad_enabled():
            self._records.append((module, inputs[0].detach(), output))

    def discard(self) -> None:
        """Forget captured activations (after a forward pass that is not trained on)."""
        self._records = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records = []

    def backward(self, losses: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad`` of every parameter to the sum of clipped per-example gradients.

        Args:
            losses: one loss per example, shape ``(batch,)``, from the last forward pass.

        Returns:
            The per-example gradient norms before clipping (for diagnostics only: they
            are not private).
        """
        import torch
        from torch import nn

        records, self._records = self._records, []
        seen = set()
        for module, _, _ in records:
            if id(module) in seen:
                raise UnsupportedLayerError(f"{type(module).__name__} is used twice in one "
                                            "forward pass (tied weights): cannot clip exactly")
            seen.add(id(module))
        batch = losses.shape[0]
        outputs = [out for _, _, out in records]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        squared = torch.zeros(batch, dtype=losses.dtype, device=losses.device)
        prepared = []
        for index, ((module, activation, _), grad) in enumerate(zip(records, grads,
                                                                  strict=True)):
            if grad is None:  # a layer whose output did not reach the loss
                grad = torch.zeros_like(outputs[index])
            if grad.dim() != 2 or grad.shape[0] != batch:
                raise UnsupportedLayerError(
                    f"{type(module).__name__} output has shape {tuple(grad.shape)}; "
                    "book-keeping needs (batch, features)")
            out_sq = grad.square().sum(1)
            if type(module) is nn.Linear:
                squared += out_sq * activation.square().sum(1)
                if module.bias is not None:
                    squared += out_sq
                extra = activation
            elif type(module) is nn.Embedding:
                if activation.dim() != 1:
                    raise UnsupportedLayerError("book-keeping needs one embedding index per "
                                                "example")
                if module.padding_idx is not None:
                    grad = grad * (activation != module.padding_idx).unsqueeze(1)
                    out_sq = grad.square().sum(1)
                squared += out_sq
                extra = activation
            else:  # LayerNorm over the last dimension, or GroupNorm over (batch, channels)
                if type(module) is nn.LayerNorm:
                    normed = torch.nn.functional.layer_norm(
                        activation, module.normalized_shape, eps=module.eps)
                else:
                    normed = torch.nn.functional.group_norm(activation, module.num_groups,
                                                            eps=module.eps)
                if module.weight is not None:
                    squared += (grad * normed).square().sum(1)
                if module.bias is not None:
                    squared += out_sq
                extra = normed
            prepared.append((module, extra, grad))
        norms = squared.sqrt()
        # The coefficient of Opacus' ghost clipping, so both paths give the same numbers.
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
        for module, extra, grad in prepared:
            weighted = grad * coef
            if type(module) is nn.Linear:
                module.weight.grad = weighted.t() @ extra
                if module.bias is not None:
                    module.bias.grad = weighted.sum(0)
            elif type(module) is nn.Embedding:
                module.weight.grad = torch.zeros_like(module.weight).index_add_(
                    0, extra, weighted.to(module.weight.dtype))
            else:
                if module.weight is not None:
                    module.weight.grad = (weighted * extra).sum(0)
                if module.bias is not None:
                    module.bias.grad = weighted.sum(0)
        return norms.detach()


def _own_parameters(module: Any) -> list[Any]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def ledger_path(store: ArtifactStore) -> Path:
    return store.dataset_dir / LEDGER_FILE
