"""Behaviour of privacy accounting: epsilon, the budget ledger, per-example clipping."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from personanet.config import BudgetConfig, Config, DatasetConfig
from personanet.errors import BudgetExhaustedError, IntegrityError
from personanet.models.tabular import PersonaLoss, PersonaNet
from personanet.privacy.accounting import compute_epsilon
from personanet.privacy.clipping import BookkeepingClipper, UnsupportedLayerError
from personanet.privacy.ledger import Ledger, budget_summary
from personanet.reporting.budget import render_budget
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey
from tests.conftest import ROOT, ledger_config

# Opacus' reference paths warn that the first layer's input needs no gradient (true and
# harmless) and that torchcsprng is not in use (these tests compare arithmetic only).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG")

# ----------------------------------------------------------------------- epsilon


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_compute_epsilon_is_opacus_accountant_arithmetic(accountant: str) -> None:
    from opacus.accountants import create_accountant

    reference = create_accountant(mechanism=accountant)
    for _ in range(200):
        reference.step(noise_multiplier=1.3, sample_rate=0.02)
    expected = reference.get_epsilon(delta=1e-5)
    assert compute_epsilon(accountant=accountant, noise_multiplier=1.3, sample_rate=0.02,
                           steps=200, delta=1e-5) == pytest.approx(expected, rel=1e-12)


def test_more_noise_fewer_steps_or_smaller_rate_spend_less() -> None:
    def eps(**kw):
        base = dict(accountant="prv", noise_multiplier=1.0, sample_rate=0.05, steps=100,
                    delta=1e-5)
        return compute_epsilon(**{**base, **kw})

    assert eps(noise_multiplier=2.0) < eps()
    assert eps(steps=50) < eps()
    assert eps(sample_rate=0.01) < eps()
    assert eps(steps=0) == 0.0


# ----------------------------------------------------------------------- ledger


def _config(tmp_path: Path, *, epsilon: float = 3.0, delta: float = 1e-4) -> Config:
    return ledger_config(tmp_path, epsilon=epsilon, delta=delta)


#: the master key that seals the ledgers of these tests (a mutation needs one)
KEY = MasterKey.generate()


def _store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", "people")


def _reserve(ledger: Ledger, epsilon: float = 1.0, delta: float = 1e-5,
             budget: tuple[float, float] = (3.0, 1e-4)) -> dict:
    return ledger.reserve(epsilon=epsilon, delta=delta, budget_epsilon=budget[0],
                          budget_delta=budget[1], accountant="prv")


def test_reservation_counts_in_full_until_settled_at_what_was_spent(tmp_path: Path) -> None:
    config, store = _config(tmp_path), _store(tmp_path)
    ledger = Ledger(store, KEY)
    entry = _reserve(ledger)
    summary = budget_summary(config, store)
    assert summary["reserved_epsilon"] == 1.0 and summary["spent_epsilon"] == 0.0
    assert summary["remaining_epsilon"] == pytest.approx(2.0)
    ledger.settle(entry["run_id"], epsilon=0.97, delta=1e-5, version="v1")
    summary = budget_summary(config, store)
    assert summary["reserved_epsilon"] == 0.0 and summary["spent_epsilon"] == 0.97
    assert summary["remaining_epsilon"] == pytest.approx(2.03)
    assert summary["entries"][0]["version"] == "v1"


def test_refusal_names_spent_requested_and_remaining(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ledger = Ledger(store, KEY)
    ledger.settle(_reserve(ledger)["run_id"], epsilon=0.99, delta=1e-5)
    _reserve(ledger)  # a killed run: still reserved
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExhaustedError) as refused:
        _reserve(ledger, epsilon=1.5)
    message = str(refused.value)
    assert refused.value.exit_code == 69
    assert "spent epsilon 1.99 (incl. 1 reserved by unfinished runs)" in message
    assert "requested 1.5" in message and "remaining 1.01 of 3" in message
    assert ledger.path.read_bytes() == before
    _reserve(ledger, epsilon=1.01)  # exactly what is left still fits


def test_delta_is_budgeted_too(tmp_path: Path) -> None:
    ledger = Ledger(_store(tmp_path), KEY)
    _reserve(ledger, delta=6e-5)
    with pytest.raises(BudgetExhaustedError, match="delta"):
        _reserve(ledger, delta=6e-5)


def test_release_and_non_private_runs_are_not_charged(tmp_path: Path) -> None:
    config, store = _config(tmp_path), _store(tmp_path)
    ledger = Ledger(store, KEY)
    ledger.release(_reserve(ledger)["run_id"], reason="stopped before its first step")
    ledger.record_non_private(version="v2")
    summary = budget_summary(config, store)
    assert summary["spent_epsilon"] == summary["reserved_epsilon"] == 0.0
    assert summary["non_private_runs"] == 1 and summary["private_runs"] == 1
    assert [e["status"] for e in summary["entries"]] == ["released", "settled"]


def test_ledger_is_written_atomically_as_json(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ledger = Ledger(store, KEY)
    _reserve(ledger)
    assert ledger.path == store.dataset_dir / "budget.json"
    doc = json.loads(ledger.path.read_text())
    assert doc["format"] == "personanet.budget/2" and len(doc["entries"]) == 1
    assert doc["seal"]["key_id"] == KEY.key_id
    assert [p.name for p in ledger.path.parent.iterdir()] == ["budget.json"]


def test_damaged_ledger_is_never_reset(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ledger = Ledger(store, KEY)
    _reserve(ledger)
    ledger.path.write_text("{ truncated")
    with pytest.raises(IntegrityError, match="damaged"):
        _reserve(ledger)
    assert ledger.path.read_text() == "{ truncated"


CONCURRENT = r"""
import sys
from personanet.store.artifacts import ArtifactStore
from personanet.errors import BudgetExhaustedError
from personanet.privacy.ledger import Ledger
from personanet.store.keys import MasterKey
ledger = Ledger(ArtifactStore(sys.argv[1], "people"), MasterKey.from_base64(sys.argv[2]))
try:
    ledger.reserve(epsilon=1.0, delta=1e-6, budget_epsilon=2.5, budget_delta=1e-3)
    print("reserved")
except BudgetExhaustedError:
    print("refused")
"""


def test_concurrent_runs_never_take_more_than_the_budget(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(root),
                                  KEY.to_base64()], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True, env=dict(os.environ))
                for _ in range(5)]
    outcomes = sorted(child.communicate(timeout=120)[0].strip() for child in children)
    assert outcomes == ["refused"] * 3 + ["reserved"] * 2
    assert len(Ledger(ArtifactStore(root, "people")).entries) == 2


def test_budget_show_table_lists_runs_and_totals(tmp_path: Path) -> None:
    config, store = _config(tmp_path), _store(tmp_path)
    ledger = Ledger(store, KEY)
    ledger.settle(_reserve(ledger)["run_id"], epsilon=0.99, delta=1e-5, version="v1")
    killed = _reserve(ledger)
    ledger.record_non_private(version="v3")
    console = Console(record=True, width=200)
    console.print(render_budget(budget_summary(config, store)))
    text = console.export_text()
    assert killed["run_id"] in text and "unfinished" in text
    assert "remaining 1.01 of 3" in text and "non-private" in text


def test_budget_config_defaults_are_what_the_docs_say() -> None:
    assert BudgetConfig().epsilon == 10.0 and BudgetConfig().delta == 1e-4
    assert DatasetConfig(name="x", target="y", privacy_unit="id").source == []


# ----------------------------------------------------------------------- clipping


def _net(task: str = "binary", **kwargs) -> PersonaNet:
    torch.manual_seed(0)
    n_outputs = {"binary": 1, "multiclass": 4, "regression": 1}[task]
    spec = dict(cardinalities=[5, 3, 7], n_numeric=6, n_outputs=n_outputs, task=task,
                hidden_sizes=[16, 8], activation="tanh")
    spec.update(kwargs)
    net = PersonaNet(**spec)
    with torch.no_grad():  # larger weights, so that some examples exceed the clipping norm
        for p in net.parameters():
            p.mul_(2.0)
    return net


def _batch(task: str, n: int = 48) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    categorical = torch.stack([torch.randint(0, c, (n,), generator=g) for c in (5, 3, 7)], 1)
    numeric = torch.rand(n, 6, generator=g)
    if task == "binary":
        target = torch.randint(0, 2, (n,), generator=g)
    elif task == "multiclass":
        target = torch.randint(0, 4, (n,), generator=g)
    else:
        target = torch.rand(n, generator=g)
    return categorical, numeric, target


def _clipped_by_opacus_hooks(net: PersonaNet, batch, task: str
                             ) -> tuple[list[torch.Tensor], float]:
    """Reference: Opacus materialises every per-example gradient; clip each, then sum.

    The clipping norm is the median gradient norm, so half the examples are clipped.
    """
    from opacus import GradSampleModule

    model = GradSampleModule(copy.deepcopy(net), loss_reduction="sum")
    categorical, numeric, target = batch
    PersonaLoss(task, reduction="sum")(model(categorical, numeric), target).backward()
    per_example = [p.grad_sample for p in model.parameters()]
    n = categorical.shape[0]
    norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in per_example]).norm(dim=0)
    clip = float(norms.median())
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert 0 < (coef < 1).sum() < n, "the test needs clipped and unclipped examples"
    return [torch.einsum("i,i...->...", coef, g) for g in per_example], clip


@pytest.mark.parametrize("task, variant", [
    ("binary", {}),
    ("multiclass", {"activation": "tempered_sigmoid"}),
    ("regression", {"activation": "relu"}),
    ("binary", {"categorical_encoding": "embedding", "embedding_dim": 4, "norm": "layernorm"}),
    ("binary", {"norm": "groupnorm"}),
])
def test_bookkeeping_clips_exactly_like_per_example_gradients(task: str, variant: dict) -> None:
    net = _net(task, **variant)
    batch = _batch(task)
    expected, clip = _clipped_by_opacus_hooks(net, batch, task)
    clipper = BookkeepingClipper(net, max_grad_norm=clip)
    categorical, numeric, target = batch
    clipper.backward(PersonaLoss(task, reduction="none")(net(categorical, numeric), target))
    for param, reference in zip(net.parameters(), expected, strict=True):
        assert torch.allclose(param.grad, reference, rtol=1e-4, atol=1e-5)


def test_bookkeeping_matches_opacus_ghost_clipping() -> None:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    net = _net()
    batch = _batch("binary")
    _, clip = _clipped_by_opacus_hooks(net, batch, "binary")
    reference_net = copy.deepcopy(net)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(*batch), batch_size=48)
    model, optimizer, criterion, _ = engine.make_private(
        module=reference_net, optimizer=torch.optim.SGD(reference_net.parameters(), lr=0.1),
        criterion=PersonaLoss("binary"), data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=clip, grad_sample_mode="ghost", poisson_sampling=False)
    categorical, numeric, target = batch
    criterion(model(categorical, numeric), target).backward()
    clipper = BookkeepingClipper(net, max_grad_norm=clip)
    clipper.backward(PersonaLoss("binary", reduction="none")(net(categorical, numeric), target))
    for ours, theirs in zip(net.parameters(), reference_net.parameters(), strict=True):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_bookkeeping_refuses_what_it_cannot_clip_exactly() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3))
    assert not BookkeepingClipper.supports(conv)
    with pytest.raises(UnsupportedLayerError):
        BookkeepingClipper(conv, max_grad_norm=1.0)

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(x))

    tied = Tied()
    clipper = BookkeepingClipper(tied, max_grad_norm=1.0)
    with pytest.raises(UnsupportedLayerError, match="twice"):
        clipper.backward(tied(torch.rand(4, 3)).sum(1))


def test_empty_poisson_batch_gives_zero_gradient() -> None:
    net = _net()
    clipper = BookkeepingClipper(net, max_grad_norm=1.0)
    categorical, numeric, target = (t[:0] for t in _batch("binary"))
    clipper.backward(PersonaLoss("binary", reduction="none")(net(categorical, numeric), target))
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_a_new_layer_type_is_one_registered_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    from personanet.privacy import clipping
    from personanet.privacy.clipping_layers import LinearClipping

    class Scaled(torch.nn.Linear):  # a subclass may change the forward: not matched
        pass

    net = torch.nn.Sequential(Scaled(3, 2))
    assert not BookkeepingClipper.supports(net)
    clipping.handler_for(net[0])  # the built-in handlers are registered by now
    monkeypatch.setitem(clipping._HANDLERS, Scaled, LinearClipping())
    assert BookkeepingClipper.supports(net)
    clipper = BookkeepingClipper(net, max_grad_norm=1.0)
    clipper.backward(net(torch.rand(4, 3)).sum(1))
    assert net[0].weight.grad is not None and net[0].bias.grad is not None


# ----------------------------------------------------------------------- privacy record

RECORD_FIXTURE = next((ROOT / "tests" / "data" / "root_v1").rglob("privacy.json"))


def test_privacy_record_writes_back_the_file_it_read_byte_for_byte() -> None:
    from personanet.privacy.record import PrivacyRecord

    raw = RECORD_FIXTURE.read_text("utf-8")
    record = PrivacyRecord.read(RECORD_FIXTURE)
    assert record.private and record.accountant == "prv" and record.steps == 4
    assert json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n" == raw


def test_non_private_record_has_a_note_and_no_epsilon() -> None:
    from personanet.privacy.record import NON_PRIVATE_NOTE, PrivacyRecord

    doc = PrivacyRecord(
        private=False, accountant=None, epsilon=None, delta=None, target_epsilon=None,
        noise_multiplier=None, sample_rate=0.25, steps=4, epochs=1, max_grad_norm=None,
        batch_size=64, auto_settings={}, expected_batch_size=60.0, poisson_sampling=True,
        grad_sample_mode=None, run_id="r", note=NON_PRIVATE_NOTE).to_json()
    assert doc["note"] == NON_PRIVATE_NOTE and doc["epsilon"] is None
    assert not {"secure_rng", "privacy_unit", "accountant_history"} & doc.keys()
    assert PrivacyRecord.from_json(doc).to_json() == doc


@pytest.mark.parametrize("doc", [{"format": "personanet.privacy/2", "private": True}, [],
                                 {"private": True}])
def test_privacy_record_of_another_format_is_refused(doc: object) -> None:
    from personanet.errors import BadInputError
    from personanet.privacy.record import PrivacyRecord

    with pytest.raises(BadInputError) as refused:
        PrivacyRecord.from_json(doc)
    assert refused.value.exit_code == 65
