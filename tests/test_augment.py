"""Augmentation and augmentation multiplicity (training/augment.py): what one example's
K augmented copies contribute under DP, and what the augmentations do to an image."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from personanet.models.cnn import ImageCNN
from personanet.training.augment import Augmentation, augmentation_for

C = 0.05  # small enough that every example's averaged gradient is clipped


def _tiny_cnn() -> ImageCNN:
    torch.manual_seed(0)
    return ImageCNN(preset="tanh", shape=[16, 16, 1], n_outputs=3, task="multiclass")


def _private(model: nn.Module, rows: int):
    """Opacus' DP optimizer with hooks and no noise, over a loader of `rows` examples."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(rows, 1)), batch_size=rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=C,
            grad_sample_mode="hooks", wrap_model=False, poisson_sampling=False)
    return hooks, optimizer


def _reference_contributions(model: nn.Module, batch: dict[str, torch.Tensor], k: int
                             ) -> list[dict[str, torch.Tensor]]:
    """Slow reference: each copy's gradient alone, averaged per example, then clipped."""
    per_example = []
    rows = batch["image"].shape[0]
    for first in range(0, rows, k):
        mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for row in range(first, first + k):
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(batch["image"][row:row + 1]),
                                               batch["target"][row:row + 1])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for (name, _), g in zip(model.named_parameters(), grads, strict=True):
                mean[name] += g / k
        norm = torch.sqrt(sum(g.square().sum() for g in mean.values()))
        scale = min(1.0, C / (float(norm) + 1e-6))
        per_example.append({n: g * scale for n, g in mean.items()})
    return per_example


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("examples", [1, 4])
def test_k_copies_make_one_clipped_contribution_per_example(examples: int) -> None:
    k = 3
    model = _tiny_cnn()
    reference_model = _tiny_cnn()  # the same initial weights, without Opacus' hooks
    torch.manual_seed(1)
    batch = {"image": torch.rand(examples, 1, 16, 16),
             "target": torch.randint(0, 3, (examples,))}
    augmentation = Augmentation(shift=2, rotate=15.0, multiplicity=k, seed=3)
    expanded = augmentation.expand(batch)
    assert expanded["image"].shape[0] == examples * k

    hooks, optimizer = _private(model, examples)
    optimizer.zero_grad()
    losses = nn.functional.cross_entropy(model(expanded["image"]), expanded["target"],
                                         reduction="none")
    losses.mean().backward()  # what the loop does on the hooks path
    augmentation.average_copies(model)
    optimizer.clip_and_accumulate()
    clipped_sum = {n: p.summed_grad for n, p in model.named_parameters()}
    hooks.cleanup()

    contributions = _reference_contributions(reference_model, expanded, k)
    for name, value in clipped_sum.items():
        expected = sum(c[name] for c in contributions)
        assert torch.allclose(value, expected, atol=1e-7, rtol=1e-4), name
    for contribution in contributions:  # clipping bound: one example moves the sum by <= C
        norm = torch.sqrt(sum(g.square().sum() for g in contribution.values()))
        assert float(norm) <= C * (1 + 1e-5)
    if examples == 1:
        total = torch.sqrt(sum(g.square().sum() for g in clipped_sum.values()))
        assert float(total) <= C * (1 + 1e-5)
        assert float(total) > 0.99 * C  # the clip was active: the bound is what was tested


def test_copies_are_adjacent_and_targets_repeat() -> None:
    batch = {"image": torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 8, 8).clone(),
             "target": torch.tensor([0, 1, 2])}
    expanded = Augmentation(shift=0, rotate=0.0, multiplicity=4).expand(batch)
    assert expanded["target"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(expanded["image"][4:8], batch["image"][1:2].expand(4, 1, 8, 8))


def test_shift_is_a_zero_filled_whole_pixel_translation() -> None:
    torch.manual_seed(0)
    image = torch.rand(64, 1, 10, 10)
    shifted = Augmentation(shift=2, rotate=0.0, seed=5).augment(image)
    for original, moved in zip(image, shifted, strict=True):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros_like(original)
                src = original[:, max(0, -dy):10 - max(0, dy), max(0, -dx):10 - max(0, dx)]
                expected[:, max(0, dy):max(0, dy) + src.shape[1],
                         max(0, dx):max(0, dx) + src.shape[2]] = src
                matches.append(torch.allclose(moved, expected, atol=1e-5))
        assert any(matches)
    assert not torch.equal(shifted, image)


def test_no_flips_unless_asked() -> None:
    asymmetric = torch.zeros(200, 1, 9, 9)
    asymmetric[:, :, :, :3] = 1.0  # the left third lit
    kept = Augmentation(shift=0, rotate=0.0).augment(asymmetric)
    assert torch.equal(kept, asymmetric)
    flipped = Augmentation(shift=0, rotate=0.0, flip=True, seed=1).augment(asymmetric)
    mirrored = flipped[:, :, :, -3:].sum((1, 2, 3)) > 0
    assert 0 < int(mirrored.sum()) < 200


def test_rotation_keeps_the_picture_near_its_centre() -> None:
    disc = torch.zeros(1, 1, 21, 21)
    yy, xx = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    disc[0, 0] = (((yy - 10) ** 2 + (xx - 10) ** 2) <= 16).float()
    rotated = Augmentation(shift=0, rotate=30.0, seed=2).augment(disc.repeat(8, 1, 1, 1))
    assert torch.allclose(rotated.sum((1, 2, 3)), disc.sum().expand(8), rtol=0.05)


def test_without_dp_one_copy_per_example() -> None:
    from dataclasses import replace

    from personanet.config import TrainConfig

    train = replace(TrainConfig(), augment=True, augment_multiplicity=4)
    assert augmentation_for(train, private=True).multiplicity == 4
    assert augmentation_for(train, private=False).multiplicity == 1
    assert augmentation_for(replace(train, augment=False), private=True) is None
