"""Clipping handler for convolutions: book-keeping arithmetic of `nn.Conv2d`.

A convolution is a linear layer applied at every output position: with the input
unfolded into patches ``A_i`` (``Cin*kh*kw`` by ``L`` positions, `torch.nn.functional.unfold`)
and the output gradient ``B_i`` (``Cout`` by ``L``), example i's weight gradient is
``G_i = B_i A_i^T`` and its bias gradient the row sums of ``B_i``. The handler forms
``G_i`` (small for the networks here: 16 x 64 and 32 x 256 weights in the DP-MNIST CNN)
for the norms, and the clipped sum ``sum_i c_i B_i A_i^T`` as one matrix product over
examples and positions together. The arithmetic is exact (tests compare it with Opacus'
per-example gradients); `accepts` refuses what it does not cover: grouped convolutions,
string padding ("same") and padding modes other than zeros.

The ghost-norm alternative (``||G_i||^2 = <A_i^T A_i, B_i^T B_i>``, Bu et al.; Lee and
Kifer) costs ``L^2`` per example, more than forming ``G_i`` when ``L`` is in the hundreds,
as here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from personanet.privacy.clipping import LayerClipping, register_clipping


@register_clipping(nn.Conv2d)
class Conv2dClipping(LayerClipping):
    """``y = conv(a, W) + c`` on ``(batch, C, H, W)``: per-example gradients from patches."""

    output_dims = 4

    def accepts(self, module: Any) -> bool:
        return (module.groups == 1 and not isinstance(module.padding, str)
                and module.padding_mode == "zeros")

    def add_squared_norms(self, module: Any, activation: torch.Tensor, grad: torch.Tensor,
                          squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = activation.shape[0]
        patches = F.unfold(activation, module.kernel_size, dilation=module.dilation,
                           padding=module.padding, stride=module.stride)
        out = grad.reshape(batch, grad.shape[1], -1)
        per_example = torch.bmm(out, patches.transpose(1, 2))
        squared += per_example.square().sum((1, 2))
        if module.bias is not None:
            squared += out.sum(2).square().sum(1)
        return patches, out

    def write_clipped_sum(self, module: Any, saved: torch.Tensor,
                          weighted: torch.Tensor) -> None:
        out_channels = weighted.shape[1]
        flat_out = weighted.transpose(0, 1).reshape(out_channels, -1)
        flat_in = saved.transpose(1, 2).reshape(-1, saved.shape[1])
        module.weight.grad = (flat_out @ flat_in).view_as(module.weight)
        if module.bias is not None:
            module.bias.grad = weighted.sum((0, 2))
