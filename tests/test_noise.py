"""The noise the train stage adds is the noise its privacy figures claim, per clipping path.

The accounting tests check that the recorded epsilon follows from the recorded noise
multiplier, sample rate and steps; this file checks that the run *added* that noise.
A wiring bug (the optimizer's clipping norm differing from the clipper's, noise added
twice or not at all, a wrong batch size in the scaling, noise replayable from the
config's seed) leaves every recorded figure plausible while the true epsilon is far
above the claim; here it fails a test.

How: the real `train()` stage on a tiny real clean artifact, arranged so the update is
known but for its noise:

- the logical batch is every training row (batch_size >= rows makes the Poisson rate
  exactly 1: Opacus' sampler keeps a row when ``rand() < q``, always true at q = 1), and
  one epoch, so the run takes exactly one step, on a batch we know;
- plain SGD, learning rate 1, no momentum: ``w1 = w0 - (S + noise) / B``, with ``w0`` the
  public initial weights (seeded from ``train.seed``), ``B`` the expected batch size and
  ``S`` the sum of the per-example gradients clipped at ``C``;
- ``S`` is recomputed here from scratch (one backward pass per example on the initial
  network), independently of Opacus and of personanet's clipper; ``C`` is set well below
  every example's gradient norm, so every example is clipped. (With the noise switched
  off, this S and the stage's update agree to 1e-9: the recomputation is exact.)

Then ``z = ((w0 - w1) * B / lr - S) / (sigma * C)``, with sigma, C and B read from the
run's ``privacy.json``, is one independent N(0, 1) draw per parameter (84,481 of them) if
and only if the noise added is the noise claimed. Each test checks three statistics,
each at a false-failure probability of 1e-6 / 3, so at most 1e-6 per test (union
bound); the noise comes from an OS-seeded generator by design, so the bounds, not a
seed, make the outcome deterministic:

- the sum of squares of z, between the chi-square(d) quantiles: the realised standard
  deviation of the update's noise is sigma * C / B to within +-1.24%;
- the mean of z (its projection on a fixed unit vector, times sqrt(d): exactly N(0, 1));
- z along the clipped signal's own direction (exactly N(0, 1) too): the update's signal
  S / B, of norm about 0.0093 against a noise of 0.00038 along that direction, is
  measured to within 5 noise standard deviations, about 20% of itself.

Seen to fail (each mutation patched into personanet/train.py by hand, then removed):
the optimizer's ``max_grad_norm`` set to half the clipper's after ``make_private``
(realised std 0.50 of the claim); the noise added twice (1.42); no noise (0.00); the
optimizer's ``expected_batch_size`` doubled after it was recorded (0.50, and the signal
at -12 sd); book-keeping's clipper at 2C (signal at +24 sd); the noise generator seeded
from ``train.seed`` (the freshness test: correlation 290 sd).

A new clipping path (a distributed one, say) is one more line in `CLIPPING_PATHS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from scipy import stats

from personanet.config import Config, load_config
from personanet.models import load_model
from personanet.models.tabular import PersonaLoss, PersonaNet
from personanet.stages.train import train
from personanet.store import tables
from personanet.store.artifacts import ArtifactStore
from personanet.store.keys import MasterKey
from tests.conftest import SAMPLE, write_config
from tests.test_train import make_clean_artifact, sample_frames

#: a false failure in one test is at most this likely (three checks share it)
FALSE_FAILURE = 1e-6
ALPHA = FALSE_FAILURE / 3
#: two-sided normal bound for one N(0, 1) statistic at ALPHA (about 5.10)
NORMAL_BOUND = float(stats.norm.isf(ALPHA / 2))

TRAIN_ROWS = 200
#: far below every example's gradient norm at initialisation (asserted), so all are clipped
MAX_GRAD_NORM = 0.02


@dataclass(frozen=True)
class ClippingPath:
    """A way the train stage clips per-example gradients, as the config selects it."""

    name: str  # what privacy.json records as grad_sample_mode
    grad_sample_mode: str
    bookkeeping: bool


CLIPPING_PATHS = [
    ClippingPath("ghost-bookkeeping", grad_sample_mode="ghost", bookkeeping=True),
    ClippingPath("ghost", grad_sample_mode="ghost", bookkeeping=False),
    ClippingPath("hooks", grad_sample_mode="hooks", bookkeeping=False),
]

#: the whole batch in one physical pass, or split in four (Opacus accumulates the clipped
#: sums of the parts and must noise the logical batch once)
PHYSICAL_BATCHES = {"one-pass": 4096, "four-parts": 50}


@dataclass
class OneStepData:
    """A store holding one clean artifact, and a config that trains one known step on it."""

    config: Config
    store: ArtifactStore
    key: MasterKey
    clean_version: str


@dataclass
class OneStepRun:
    privacy: dict
    figures: dict
    initial: torch.Tensor  # every parameter, flattened, before the step (float64)
    trained: torch.Tensor  # after it
    clipped_sum: torch.Tensor  # S, recomputed here
    per_example_norms: torch.Tensor  # before clipping

    @property
    def noise(self) -> torch.Tensor:
        """z: the released sum minus S, in units of the claimed sigma * C (N(0, 1) each)."""
        sigma = float(self.privacy["noise_multiplier"])
        clip = float(self.privacy["max_grad_norm"])
        batch = float(self.privacy["expected_batch_size"])
        released_sum = (self.initial - self.trained) * batch / float(self.figures["learning_rate"])
        return (released_sum - self.clipped_sum) / (sigma * clip)


def _one_step_data(tmp_path: Path, path: ClippingPath, physical_batch: int) -> OneStepData:
    overrides = (
        "[train]\nepochs = 1\nbatch_size = 4096\noptimizer = \"sgd\"\nlearning_rate = 1.0\n"
        f"momentum = 0.0\nmax_grad_norm = {MAX_GRAD_NORM}\nhidden_sizes = [256, 128]\n"
        f"grad_sample_mode = \"{path.grad_sample_mode}\"\n"
        f"bookkeeping = {'true' if path.bookkeeping else 'false'}\n"
        f"max_physical_batch_size = {physical_batch}\ndevice = \"cpu\"\nseed = 7\n")
    config = load_config(write_config(tmp_path / "persona.toml", SAMPLE, overrides=overrides))
    store = ArtifactStore(tmp_path / "artifacts", config.dataset.name)
    key = MasterKey.generate()
    train_frame, test_frame = sample_frames(config, train_rows=TRAIN_ROWS, test_rows=20)
    clean_version = make_clean_artifact(store, key, train_frame, test_frame)
    return OneStepData(config, store, key, clean_version)


def _train_one_step(data: OneStepData, *, force: bool = False) -> OneStepRun:
    result = train(data.config, data.store, data.key, input_version=data.clean_version,
                   force=force)
    assert not result.reused
    privacy = json.loads((result.path / "privacy.json").read_text())

    # The initial weights are public: the stage seeds them from train.seed, as here.
    trained_model, encoder = load_model(result.path)
    torch.manual_seed(data.config.train.seed)
    initial_model = PersonaNet.from_spec(trained_model.spec)

    frame = tables.read_artifact_table(data.store.get("clean", data.clean_version),
                                       "train.parquet.enc", data.key)
    encoded = encoder.transform(frame)
    batch = encoded.select(encoded.labelled).tensors(torch.device("cpu"))
    categorical, numeric, target = batch["categorical"], batch["numeric"], batch["target"]
    loss_fn = PersonaLoss(encoder.task, reduction="none")
    params = list(initial_model.parameters())
    clipped_sum = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    norms = []
    for i in range(int(target.shape[0])):
        one = slice(i, i + 1)
        loss = loss_fn(initial_model(categorical[one], numeric[one]), target[one]).sum()
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()
        norm = grad.norm()
        norms.append(norm)
        # Opacus' (and book-keeping's) factor: min(1, C / (||g|| + 1e-6))
        clipped_sum += grad * min(1.0, float(privacy["max_grad_norm"]) / (float(norm) + 1e-6))

    def flat(model: PersonaNet) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    return OneStepRun(privacy=privacy, figures=result.figures, initial=flat(initial_model),
                      trained=flat(trained_model), clipped_sum=clipped_sum,
                      per_example_norms=torch.stack(norms))


@pytest.mark.parametrize("physical", PHYSICAL_BATCHES.values(), ids=PHYSICAL_BATCHES.keys())
@pytest.mark.parametrize("path", CLIPPING_PATHS, ids=[p.name for p in CLIPPING_PATHS])
def test_update_noise_has_the_recorded_scale_and_the_clipped_signal(
        tmp_path: Path, path: ClippingPath, physical: int) -> None:
    run = _train_one_step(_one_step_data(tmp_path, path, physical))
    privacy = run.privacy

    # The arrangement the statistics rely on: one step over every row, all of them clipped.
    assert privacy["grad_sample_mode"] == path.name
    assert privacy["sample_rate"] == 1.0 and privacy["steps"] == 1
    assert privacy["expected_batch_size"] == len(run.per_example_norms)
    assert float(run.per_example_norms.min()) > 5 * privacy["max_grad_norm"]
    for name in ("noise_multiplier", "max_grad_norm", "sample_rate", "steps"):
        assert run.figures[name] == privacy[name]  # the manifest says what privacy.json says

    sigma = float(privacy["noise_multiplier"])
    clip = float(privacy["max_grad_norm"])
    batch = float(privacy["expected_batch_size"])
    assert clip == MAX_GRAD_NORM and sigma > 0 and run.figures["learning_rate"] == 1.0

    z = run.noise
    d = z.numel()
    sum_of_squares = float(z.square().sum())
    low = float(stats.chi2.ppf(ALPHA / 2, d))
    high = float(stats.chi2.isf(ALPHA / 2, d))
    mean_statistic = float(z.sum()) / math.sqrt(d)
    direction = run.clipped_sum / run.clipped_sum.norm()
    along_signal = float(direction @ z)

    claimed_std = sigma * clip / batch
    signal = float(direction @ (run.initial - run.trained))
    report = (f"{path.name}, physical batch {physical}: d = {d}; update noise std claimed "
              f"sigma*C/B = {sigma:.4f}*{clip:g}/{batch:g} = {claimed_std:.4g}, realised "
              f"{float(z.std()) * claimed_std:.4g} (ratio {math.sqrt(sum_of_squares / d):.4f}, "
              f"bounds {math.sqrt(low / d):.4f}..{math.sqrt(high / d):.4f}); mean "
              f"{float(z.mean()) * claimed_std:.3g} (statistic {mean_statistic:.3f}, "
              f"|.| <= {NORMAL_BOUND:.2f}); clipped signal along its direction {signal:.5g}, "
              f"expected {float(run.clipped_sum.norm()) / batch:.5g} "
              f"(statistic {along_signal:.3f})")
    print(report)
    assert low <= sum_of_squares <= high, report
    assert abs(mean_statistic) <= NORMAL_BOUND, report
    assert abs(along_signal) <= NORMAL_BOUND, report


def test_noise_is_fresh_in_each_run_not_replayed_from_the_seed(tmp_path: Path) -> None:
    """Two runs of one config (same seed, same data, same initial weights) draw independent
    noise: noise replayable from the public seed could be subtracted from the model."""
    data = _one_step_data(tmp_path, CLIPPING_PATHS[0], PHYSICAL_BATCHES["one-pass"])
    first = _train_one_step(data).noise
    second = _train_one_step(data, force=True).noise
    # Given `second`, first . second / |second| is exactly N(0, 1) when they are independent.
    statistic = float(first @ second) / float(second.norm())
    assert abs(statistic) <= NORMAL_BOUND, (
        f"the two runs' noise vectors correlate: statistic {statistic:.1f} "
        f"(|.| <= {NORMAL_BOUND:.2f} for independent draws)")
