"""Augmentation of training images, and augmentation multiplicity under DP.

`Augmentation.expand` turns a batch of B images into B*K randomly shifted (a padded
random crop: zero fill), rotated and, if asked, flipped copies, the K copies of an
example adjacent. Without DP that is plain augmentation (K = 1: one fresh copy per
example per step).

Under DP, augmentation multiplicity (De et al., "Unlocking High-Accuracy Differentially
Private Image Classification through Scale", 2022): each example's K copies' gradients
are averaged *before* clipping, so one example still makes one clipped contribution of
norm at most C, and the accounting (sampling rate, noise, steps) is unchanged. With
Opacus' per-example gradient hooks that is: forward and backward the B*K rows, then
`average_copies` replaces each parameter's ``grad_sample`` ``(B*K, ...)`` by its mean
over the K copies ``(B, ...)``, before the DP optimizer clips. The loss is the mean over
the B*K rows, and Opacus' "mean" reduction multiplies the backpropagated gradients by
B*K, so each row's ``grad_sample`` is the gradient of that row's own loss and the mean
over K copies is the example's averaged gradient.

Book-keeping and Opacus' ghost clipping never hold per-example gradients, only their
norms: a run with K > 1 uses the hooks (`personanet.training.private.make_private`).
The augmentation draws are not secret (the guarantee holds for any augmentation, since
the clipping bounds each example's contribution whatever its copies are), so they come
from a generator seeded from the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the batch key augmentation applies to (`personanet.models.image_encoding.IMAGE_KEY`)
IMAGE_KEY = "image"


@dataclass
class Augmentation:
    """Random shifts (pixels), rotations (degrees) and flips, `multiplicity` copies each.

    Attributes:
        shift: largest shift in pixels along each axis (whole pixels, zero fill).
        rotate: largest rotation in degrees, either way.
        flip: random horizontal flips.
        multiplicity: K, copies per example (1 without DP).
        seed: seeds the augmentation draws (public: see the module docstring).
    """

    shift: int = 2
    rotate: float = 10.0
    flip: bool = False
    multiplicity: int = 1
    seed: int = 0
    _generator: Any = field(default=None, repr=False)

    def _draws(self) -> torch.Generator:
        import torch

        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """Each image ``(n, C, H, W)`` shifted, rotated and flipped at random."""
        import torch
        from torch.nn import functional as F

        n, _, height, width = images.shape
        if n == 0 or (self.shift == 0 and self.rotate == 0 and not self.flip):
            return images
        gen = self._draws()
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.rotate)
        dx = torch.randint(-self.shift, self.shift + 1, (n,), generator=gen).float()
        dy = torch.randint(-self.shift, self.shift + 1, (n,), generator=gen).float()
        mirror = (torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if self.flip
                  else torch.ones(n))
        cos, sin = torch.cos(angle), torch.sin(angle)
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of one pixel
        # is 2 / size there.
        theta = torch.stack([
            torch.stack([cos * mirror, -sin, -dx * 2 / width], dim=1),
            torch.stack([sin * mirror, cos, -dy * 2 / height], dim=1)], dim=1)
        theta = theta.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)

    def expand(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B examples -> B*K rows, example i's copies at rows ``i*K .. i*K+K-1``, each
        image augmented independently; the other tensors (the target) repeated."""
        k = self.multiplicity
        out = {name: (t.repeat_interleave(k, dim=0) if k > 1 else t)
               for name, t in batch.items()}
        if IMAGE_KEY in out:
            out[IMAGE_KEY] = self.augment(out[IMAGE_KEY])
        return out

    def average_copies(self, model: torch.nn.Module) -> None:
        """Each parameter's per-example gradient ``grad_sample`` ``(B*K, ...)`` -> the mean
        over each example's K copies ``(B, ...)``: what the DP optimizer then clips."""
        import torch

        k = self.multiplicity
        if k == 1:
            return
        for p in model.parameters():
            sample = getattr(p, "grad_sample", None)
            if sample is None:
                continue
            if isinstance(sample, list):
                sample = torch.cat(sample, dim=0)
            rows = sample.shape[0]
            if rows % k:
                raise ValueError(f"{rows} per-example gradients are not {k} copies each")
            p.grad_sample = sample.view(rows // k, k, *sample.shape[1:]).mean(dim=1)


def augmentation_for(train: Any, *, private: bool) -> Augmentation | None:
    """The run's augmentation from a resolved `[train]` (None when off); K = 1 without DP."""
    if train.augment is not True:
        return None
    k = int(train.augment_multiplicity) if private else 1
    return Augmentation(shift=int(train.augment_shift), rotate=float(train.augment_rotate),
                        flip=bool(train.augment_flip), multiplicity=k, seed=int(train.seed))
