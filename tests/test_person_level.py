"""Person-level DP-SGD: people are sampled and clipped, whatever their number of rows."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from personanet.models.tabular import PersonaLoss, PersonaNet
from personanet.privacy.clipping import BookkeepingClipper
from personanet.privacy.units import group_privacy, sum_grad_samples_by_unit
from personanet.training.units import UNIT_INDEX, UNIT_WEIGHT, PersonRows
from tests.conftest import sample_lines, write_config

# ---------------------------------------------------------------- clipping per person


def _net(**kwargs) -> PersonaNet:
    torch.manual_seed(0)
    spec = dict(cardinalities=[5, 3, 7], n_numeric=6, n_outputs=1, task="binary",
                hidden_sizes=[16, 8], activation="tanh")
    spec.update(kwargs)
    net = PersonaNet(**spec)
    with torch.no_grad():  # larger weights, so that some people exceed the clipping norm
        for p in net.parameters():
            p.mul_(2.0)
    return net


def _people(sizes: list[int]) -> dict[str, torch.Tensor]:
    """Rows of people with `sizes` rows each, in shuffled order (the layout must not care)."""
    g = torch.Generator().manual_seed(1)
    n = sum(sizes)
    units = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = torch.randperm(n, generator=g)
    categorical = torch.stack([torch.randint(0, c, (n,), generator=g) for c in (5, 3, 7)], 1)
    return {"categorical": categorical, "numeric": torch.rand(n, 6, generator=g),
            "target": torch.randint(0, 2, (n,), generator=g), UNIT_INDEX: units[order],
            UNIT_WEIGHT: 1.0 / torch.tensor(sizes, dtype=torch.float32)[units[order]]}


def _reference(net: PersonaNet, batch: dict[str, torch.Tensor]
               ) -> tuple[list[torch.Tensor], float]:
    """The slow, obvious way: every row's gradient by its own backward pass, each
    person's mean, clipped, summed over people. The clipping norm is the median person's
    gradient norm, so half the people are clipped."""
    loss = PersonaLoss("binary", reduction="none")
    params = list(net.parameters())
    # The network has no interaction between rows, so row i's gradient is that of its
    # own loss: one backward pass per row.
    losses = loss(net(batch["categorical"], batch["numeric"]), batch["target"])
    per_row = [torch.autograd.grad(losses[i], params, retain_graph=True)
               for i in range(losses.shape[0])]
    rows = {j: torch.stack([g[j] for g in per_row]) for j in range(len(params))}
    params = rows  # one entry per parameter, in order
    units = batch[UNIT_INDEX]
    count = int(units.max()) + 1
    summed = []
    for name in params:
        weighted = rows[name] * batch[UNIT_WEIGHT].view(-1, *[1] * (rows[name].dim() - 1))
        person = torch.zeros(count, *rows[name].shape[1:]).index_add_(0, units, weighted)
        summed.append(person)
    norms = torch.stack([g.reshape(count, -1).norm(dim=1) for g in summed]).norm(dim=0)
    clip = float(norms.median())
    assert 0 < int((norms > clip).sum()) < count, "the test needs clipped and unclipped people"
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("u,u...->...", coef, g) for g in summed], clip


def _bookkeeping(net: PersonaNet, batch: dict[str, torch.Tensor], clip: float
                 ) -> list[torch.Tensor]:
    clipper = BookkeepingClipper(net, max_grad_norm=clip)
    losses = PersonaLoss("binary", reduction="none")(
        net(batch["categorical"], batch["numeric"]), batch["target"])
    clipper.backward(losses * batch[UNIT_WEIGHT], units=batch[UNIT_INDEX])
    clipper.close()
    return [p.grad.clone() for p in net.parameters()]


def _hooks(net: PersonaNet, batch: dict[str, torch.Tensor], clip: float
           ) -> list[torch.Tensor]:
    """Opacus' per-row gradients (mean reduction, as the loop uses them), summed per
    person, clipped by Opacus' own optimizer with no noise."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(net, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=1, loss_reduction="sum")
    losses = PersonaLoss("binary", reduction="none")(
        model(batch["categorical"], batch["numeric"]), batch["target"])
    (losses * batch[UNIT_WEIGHT]).mean().backward()
    sum_grad_samples_by_unit(model.parameters(), batch[UNIT_INDEX])
    optimizer.pre_step()
    return [p.grad.clone() for p in model.parameters()]


VARIANTS = [
    {},  # small Linear layers: each person's gradient materialised is the cheaper
    {"hidden_sizes": [64, 64]},  # its 64x64 layer takes the ghost pair form instead
    {"categorical_encoding": "embedding", "embedding_dim": 4, "norm": "layernorm"},
    {"norm": "groupnorm", "activation": "relu", "hidden_sizes": [32, 16]},
]


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus: inputs need no gradient
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("path", [_bookkeeping, _hooks], ids=["bookkeeping", "hooks"])
def test_per_person_clipping_equals_the_slow_reference(variant: dict, path) -> None:
    batch = _people([1, 20, 3, 7, 1, 12, 2, 5, 9, 4, 1, 16])
    net = _net(**variant)
    expected, clip = _reference(net, batch)
    got = path(copy.deepcopy(net), batch, clip)
    for ours, reference in zip(got, expected, strict=True):
        assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5)


def _summed_clipped(net: PersonaNet, batch: dict[str, torch.Tensor], clip: float, *,
                    by_person: bool) -> torch.Tensor:
    clipper = BookkeepingClipper(net, max_grad_norm=clip)
    net.zero_grad(set_to_none=True)
    losses = PersonaLoss("binary", reduction="none")(
        net(batch["categorical"], batch["numeric"]), batch["target"])
    if by_person:  # unweighted: the bound must hold whatever each row's weight
        clipper.backward(losses, units=batch[UNIT_INDEX])
    else:
        clipper.backward(losses)
    clipper.close()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_a_person_with_20_rows_moves_the_clipped_sum_by_at_most_max_grad_norm() -> None:
    clip = 0.5
    batch = _people([20, 3, 1, 7, 2, 1, 5])
    heavy = batch[UNIT_INDEX] == 0
    without = {name: t[~heavy] for name, t in batch.items()}
    without[UNIT_INDEX] = without[UNIT_INDEX] - 1  # people 1..6 -> 0..5
    net = _net()
    moved = (_summed_clipped(net, batch, clip, by_person=True)
             - _summed_clipped(net, without, clip, by_person=True)).norm()
    assert moved <= clip * (1 + 1e-5)
    assert moved > 0.5 * clip  # the person does count
    # Clipping rows instead lets the same person move it by far more than C: the reason
    # person-level training exists.
    row_moved = (_summed_clipped(net, batch, clip, by_person=False)
                 - _summed_clipped(net, without, clip, by_person=False)).norm()
    assert row_moved > 3 * clip


# ---------------------------------------------------------------- sampling people


class _Steps:
    """What BatchMemoryManager asks of the DP optimizer: which physical batch ends a step."""

    def __init__(self) -> None:
        self.skips: list[bool] = []

    def signal_skip_step(self, do_skip: bool = True) -> None:
        self.skips.append(do_skip)


def test_the_sampler_samples_people_with_all_their_rows_never_split() -> None:
    from opacus.data_loader import DPDataLoader
    from opacus.utils.batch_memory_manager import wrap_data_loader
    from torch.utils.data import DataLoader

    sizes = [1 + (7 * p) % 20 for p in range(60)]  # 1 to 20 rows a person
    units = torch.repeat_interleave(torch.arange(60), torch.tensor(sizes))
    shuffled = torch.randperm(len(units), generator=torch.Generator().manual_seed(3))
    rows = {"row": shuffled, "person": units[shuffled]}  # a row knows its person
    people = PersonRows(rows, rows["person"].numpy())
    assert len(people) == 60 and people.rows == sum(sizes)
    loader = DPDataLoader.from_data_loader(
        DataLoader(people, batch_size=12, collate_fn=lambda b: b),
        generator=torch.Generator().manual_seed(4))
    assert loader.sample_rate == pytest.approx(12 / 60)
    steps = _Steps()
    physical = wrap_data_loader(data_loader=loader, max_batch_size=3, optimizer=steps)
    seen_people = 0
    for batch in physical:
        people_here = batch["person"].unique()
        assert len(people_here) <= 3  # the physical cap counts people
        assert batch[UNIT_INDEX].unique().numel() == len(people_here)
        for person in people_here:
            mine = batch["person"] == person
            assert int(mine.sum()) == sizes[int(person)]  # every row of a sampled person
            assert batch[UNIT_INDEX][mine].unique().numel() == 1  # one index a person
            assert torch.allclose(batch[UNIT_WEIGHT][mine], torch.tensor(1 / sizes[int(person)]))
        seen_people += len(people_here)
    assert seen_people > 0
    assert steps.skips.count(False) == len(loader)  # one optimizer step per logical batch


def test_a_person_is_in_exactly_one_physical_batch_of_a_logical_one() -> None:
    from opacus.utils.batch_memory_manager import wrap_data_loader
    from torch.utils.data import DataLoader

    sizes = [4, 1, 9, 2, 6, 3, 8]
    units = torch.repeat_interleave(torch.arange(7), torch.tensor(sizes))
    people = PersonRows({"person": units}, units.numpy())
    loader = DataLoader(people, batch_size=7, collate_fn=lambda b: b)  # everyone, in order
    loader.sample_rate = 1.0  # what wrap_data_loader reads of a Poisson loader
    batches = list(wrap_data_loader(data_loader=loader, max_batch_size=2, optimizer=_Steps()))
    owners = [set(b["person"].tolist()) for b in batches]
    assert sum(len(o) for o in owners) == 7 and set().union(*owners) == set(range(7))


# ---------------------------------------------------------------- end to end


def panel_csv(path: Path, *, people: int = 160, test_people: int = 40) -> Path:
    """Real records of the bundled sample, person p observed 1 + (p % 6) times: each
    observation a year later (collected_at), a year older, hours drifting."""
    lines = sample_lines(people, split="train").splitlines()
    header, records = lines[0], lines[1:]
    records += sample_lines(test_people, split="test").splitlines()[1:]
    names = header.split(",")
    age, hours, at = (names.index(c) for c in ("age", "hours_per_week", "collected_at"))
    out = [header]
    for p, line in enumerate(records):
        fields = line.split(",")
        for year in range(1 + p % 6):
            row = list(fields)
            row[age] = str(min(90, int(row[age]) + year))
            row[hours] = str(max(1, min(99, int(row[hours]) + (year * 3) % 7 - 3)))
            row[at] = f"{2020 + year}-06-01T00:00:00Z"
            out.append(",".join(row))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _panel_config(tmp_path: Path, *, level: str = "person", k: int = 6, extra: str = "",
                  tables: str = "") -> Path:
    source = panel_csv(tmp_path / "panel.csv")
    return write_config(tmp_path / "panel.toml", source, overrides=(
        f"[clean]\nmax_rows_per_unit = {k}\ndedupe_key = [\"email\", \"collected_at\"]\n"
        f"[train]\nepochs = 2\nbatch_size = 16\nprivacy_unit_level = \"{level}\"\n{extra}"
        f"{tables}"))


def _train(cli, config: Path, root: Path) -> dict:
    for stage in ("collect", "clean"):
        done = cli("--config", config, "--artifacts", root, "--json", stage)
        assert done.code == 0, done.stderr
    trained = cli("--config", config, "--artifacts", root, "--json", "train")
    assert trained.code == 0, trained.stderr
    return trained.json()


def _privacy(result: dict) -> dict:
    return json.loads((Path(result["path"]) / "privacy.json").read_text())


def test_person_level_trains_end_to_end_at_the_accountants_epsilon_over_people(
        cli, key_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from personanet.privacy.accounting import compute_epsilon

    backward = BookkeepingClipper.backward
    grouped: list[bool] = []

    def recording(self, losses, *, units=None):
        grouped.append(units is not None and int(units.max()) + 1 < losses.shape[0])
        return backward(self, losses, units=units)

    monkeypatch.setattr(BookkeepingClipper, "backward", recording)
    result = _train(cli, _panel_config(tmp_path), tmp_path / "root")
    # every step of the loop clipped people, each with their rows
    assert grouped and all(grouped)
    privacy = _privacy(result)
    level = privacy["unit_level"]
    assert level["level"] == "person" and level["rows_per_unit"] == 6
    # 160 training people with 1 + (p % 6) rows each
    assert level["people"] == 160
    assert level["rows"] == sum(1 + p % 6 for p in range(160)) == result["train_rows"]
    # Poisson over people: rate 1 / ceil(160 / 16), 10 steps an epoch, 16 people expected
    assert privacy["sample_rate"] == pytest.approx(1 / math.ceil(160 / 16))
    assert privacy["steps"] == 2 * 10
    assert level["expected_people_per_batch"] == pytest.approx(16)
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(
        accountant=privacy["accountant"], noise_multiplier=privacy["noise_multiplier"],
        sample_rate=privacy["sample_rate"], steps=privacy["steps"], delta=privacy["delta"]),
        rel=1e-9)
    assert privacy["epsilon"] <= 1.0
    assert privacy["grad_sample_mode"] == "ghost-bookkeeping"
    assert result["unit_level"] == level


def test_person_level_with_opacus_hooks_trains_too(cli, key_env, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from personanet.privacy import units as privacy_units

    calls: list[int] = []

    def recording(params, index):
        calls.append(int(index.shape[0]))
        return sum_grad_samples_by_unit(params, index)

    monkeypatch.setattr(privacy_units, "sum_grad_samples_by_unit", recording)
    result = _train(cli, _panel_config(tmp_path, extra="grad_sample_mode = \"hooks\"\n"),
                    tmp_path / "root")
    assert calls and sum(calls) > 0  # per-row gradients were summed per person
    privacy = _privacy(result)
    assert privacy["grad_sample_mode"] == "hooks" and privacy["unit_level"]["level"] == "person"


def test_row_level_with_several_rows_a_person_states_the_group_privacy_bound(
        cli, key_env, tmp_path: Path) -> None:
    # the ledger is charged the per-person bound (about 15 here): a budget that holds it
    config = _panel_config(tmp_path, level="row", tables="[evaluate]\nmin_accuracy = 0.0\n"
                           "[budget]\nepsilon = 20.0\n")
    result = _train(cli, config, tmp_path / "root")
    privacy = _privacy(result)
    level = privacy["unit_level"]
    assert level["level"] == "row" and level["rows_per_unit"] == 6
    # Rows are sampled: rate over the rows, not the people.
    assert privacy["sample_rate"] == pytest.approx(1 / math.ceil(level["rows"] / 16))
    bound = group_privacy(history=[tuple(p) for p in privacy["accountant_history"]], rows=6,
                          delta=privacy["delta"])
    assert level["person_epsilon"] == pytest.approx(bound.epsilon)
    assert level["person_delta"] == privacy["delta"]
    # Far above the row epsilon, and at least k times it (group privacy cannot do better).
    assert level["person_epsilon"] >= 6 * privacy["epsilon"]
    assert "Lemma 2.2" in level["group_privacy"]["method"]
    # evaluate's report says so, and its audit holds the model to the per-person figure
    done = cli("--config", config, "--artifacts", tmp_path / "root", "--json", "evaluate")
    assert done.code == 0, done.stderr
    folder = Path(done.json()["path"])
    report = (folder / "report.md").read_text()
    assert "**per row**, not per person" in report
    assert f"(ε = {level['person_epsilon']:.3g}, δ = " in report
    audit = json.loads((folder / "metrics.json").read_text())["audit"]
    assert audit["epsilon_claimed"] == pytest.approx(level["person_epsilon"])


def test_one_row_a_person_writes_no_unit_level_and_keeps_its_hash(tmp_path: Path) -> None:
    from personanet.config import load_config

    path = write_config(tmp_path / "c.toml", tmp_path / "x.csv")
    config = load_config(path)
    assert "privacy_unit_level" not in config.section("train")  # k = 1: hashes unchanged
    several = write_config(tmp_path / "k.toml", tmp_path / "x.csv",
                           overrides="[clean]\nmax_rows_per_unit = 3\n")
    assert load_config(several).section("train")["privacy_unit_level"] == "person"


def test_more_rows_a_person_than_a_physical_batch_is_refused_with_78(
        cli, key_env, tmp_path: Path) -> None:
    config = _panel_config(tmp_path, extra="max_physical_batch_size = 4\n")
    done = cli("--config", config, "--artifacts", tmp_path / "root", "collect")
    assert done.code == 78
    assert "max_physical_batch_size" in done.stderr


# ---------------------------------------------------------------- the audit


def test_per_person_scores_are_mean_losses_and_majority_strata() -> None:
    from personanet.privacy.audit import per_person

    means, strata = per_person([1.0, 3.0, 0.5, 2.0, 4.0], units=["b", "a", "a", "b", "b"],
                               strata=[1, 0, 0, 1, 0])
    assert means.tolist() == pytest.approx([1.75, 7 / 3])  # "a": rows 1, 2; "b": 0, 3, 4
    assert strata.tolist() == [0, 1]  # "a": 0, 0; "b": 1, 1, 0


def test_the_audit_counts_people_not_rows(cli, key_env, tmp_path: Path) -> None:
    config = _panel_config(tmp_path, tables="[evaluate]\nmin_accuracy = 0.0\n")
    root = tmp_path / "root"
    _train(cli, config, root)
    done = cli("--config", config, "--artifacts", root, "--json", "evaluate")
    assert done.code == 0, done.stderr
    metrics = json.loads((Path(done.json()["path"]) / "metrics.json").read_text())
    audit = metrics["audit"]
    assert audit["unit"] == "person" and audit["rows_per_unit"] == 6
    # 160 training people (560 rows) and 40 test people: one score each
    assert audit["n_members"] == 160 and audit["n_nonmembers"] == 40
    assert audit["epsilon_claimed"] == pytest.approx(metrics["model"]["epsilon"])
