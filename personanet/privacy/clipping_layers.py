"""Clipping handlers: the book-keeping arithmetic of each layer type PersonaNet uses.

One `LayerClipping` per layer type, registered with `register_clipping` (the pattern of
Opacus' ``@register_grad_sampler(nn.Linear)``). For every layer the input ``a`` (batch
first) and the gradient ``b`` of the loss with respect to the output come from the one
backward pass; each handler turns them into its share of each example's squared gradient
norm, and then into the clipped sum of its parameters' gradients. A new layer type is one
more class here (see `personanet.privacy.clipping`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from personanet.privacy.clipping import LayerClipping, UnsupportedLayerError, register_clipping
from personanet.privacy.units import UnitLayout


@register_clipping(nn.Linear)
class LinearClipping(LayerClipping):
    """``y = a W^T + c``: example i's weight gradient is ``b_i a_i^T``, whose squared norm
    is ``||a_i||^2 ||b_i||^2``; its bias gradient is ``b_i``."""

    def add_squared_norms(self, module: Any, activation: torch.Tensor, grad: torch.Tensor,
                          squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_sq = grad.square().sum(1)
        squared += out_sq * activation.square().sum(1)
        if module.bias is not None:
            squared += out_sq
        return activation, grad

    per_unit = True

    def add_unit_squared_norms(self, module: Any, saved: torch.Tensor, grad: torch.Tensor,
                               units: UnitLayout, squared: torch.Tensor) -> None:
        # A person's weight gradient is sum_i b_i a_i^T. Its squared norm is either that
        # matrix's, materialised per person (k in out multiply-adds a row), or the "ghost"
        # sum_{i,j} (a_i . a_j)(b_i . b_j) over the person's row pairs (k^2 (in + out)
        # a person): the cheaper of the two, both exact.
        a, b = units.pad(saved), units.pad(grad)
        k, fan_in, fan_out = units.max_rows, saved.shape[1], grad.shape[1]
        if k * (fan_in + fan_out) < fan_in * fan_out:
            squared += ((a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))).sum((1, 2))
        else:
            squared += (b.transpose(1, 2) @ a).square().sum((1, 2))
        if module.bias is not None:
            squared += units.sum(grad).square().sum(1)

    def write_clipped_sum(self, module: Any, saved: torch.Tensor,
                          weighted: torch.Tensor) -> None:
        module.weight.grad = weighted.t() @ saved
        if module.bias is not None:
            module.bias.grad = weighted.sum(0)


@register_clipping(nn.Embedding)
class EmbeddingClipping(LayerClipping):
    """One index per example: example i's gradient is ``b_i`` in the row of its index
    (none at the padding index, which the embedding never trains)."""

    def accepts(self, module: Any) -> bool:
        # max_norm renormalises rows in the forward pass and sparse gradients are another
        # tensor layout: neither is the arithmetic below.
        return module.max_norm is None and not module.sparse

    def add_squared_norms(self, module: Any, activation: torch.Tensor, grad: torch.Tensor,
                          squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if activation.dim() != 1:
            raise UnsupportedLayerError("book-keeping needs one embedding index per example")
        if module.padding_idx is not None:
            grad = grad * (activation != module.padding_idx).unsqueeze(1)
        squared += grad.square().sum(1)
        return activation, grad

    per_unit = True

    def add_unit_squared_norms(self, module: Any, saved: torch.Tensor, grad: torch.Tensor,
                               units: UnitLayout, squared: torch.Tensor) -> None:
        # Rows i, j of one person meet only where they index the same embedding row.
        index, b = units.pad(saved, fill=-1), units.pad(grad)
        same = (index.unsqueeze(2) == index.unsqueeze(1)).to(b.dtype)
        squared += (same * (b @ b.transpose(1, 2))).sum((1, 2))

    def write_clipped_sum(self, module: Any, saved: torch.Tensor,
                          weighted: torch.Tensor) -> None:
        module.weight.grad = torch.zeros_like(module.weight).index_add_(
            0, saved, weighted.to(module.weight.dtype))


class _AffineNormClipping(LayerClipping):
    """``y = n(a) * w + c``: example i's weight gradient is ``b_i * n(a_i)``, its bias
    gradient ``b_i``; subclasses say what the normalisation ``n`` is."""

    def normalize(self, module: Any, activation: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_squared_norms(self, module: Any, activation: torch.Tensor, grad: torch.Tensor,
                          squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.normalize(module, activation)
        if module.weight is not None:
            squared += (grad * normed).square().sum(1)
        if module.bias is not None:
            squared += grad.square().sum(1)
        return normed, grad

    per_unit = True

    def add_unit_squared_norms(self, module: Any, saved: torch.Tensor, grad: torch.Tensor,
                               units: UnitLayout, squared: torch.Tensor) -> None:
        # Gradients of a few features a row: summed per person outright.
        if module.weight is not None:
            squared += units.sum(grad * saved).square().sum(1)
        if module.bias is not None:
            squared += units.sum(grad).square().sum(1)

    def write_clipped_sum(self, module: Any, saved: torch.Tensor,
                          weighted: torch.Tensor) -> None:
        if module.weight is not None:
            module.weight.grad = (weighted * saved).sum(0)
        if module.bias is not None:
            module.bias.grad = weighted.sum(0)


@register_clipping(nn.LayerNorm)
class LayerNormClipping(_AffineNormClipping):
    """LayerNorm over the last dimension of ``(batch, features)``."""

    def accepts(self, module: Any) -> bool:
        return len(module.normalized_shape) == 1

    def normalize(self, module: Any, activation: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(activation, module.normalized_shape,
                                              eps=module.eps)


@register_clipping(nn.GroupNorm)
class GroupNormClipping(_AffineNormClipping):
    """GroupNorm over ``(batch, channels)`` or ``(batch, channels, *spatial)`` (after a
    convolution): a channel's weight and bias gradients sum over the spatial positions."""

    output_dims = (2, 3, 4)

    def normalize(self, module: Any, activation: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(activation, module.num_groups, eps=module.eps)

    def add_squared_norms(self, module: Any, activation: torch.Tensor, grad: torch.Tensor,
                          squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.normalize(module, activation)
        if module.weight is not None:
            squared += _per_channel(grad * normed).square().sum(1)
        if module.bias is not None:
            squared += _per_channel(grad).square().sum(1)
        return normed, grad

    def add_unit_squared_norms(self, module: Any, saved: torch.Tensor, grad: torch.Tensor,
                               units: UnitLayout, squared: torch.Tensor) -> None:
        if module.weight is not None:
            squared += units.sum(_per_channel(grad * saved)).square().sum(1)
        if module.bias is not None:
            squared += units.sum(_per_channel(grad)).square().sum(1)

    def write_clipped_sum(self, module: Any, saved: torch.Tensor,
                          weighted: torch.Tensor) -> None:
        if module.weight is not None:
            module.weight.grad = _per_channel(weighted * saved).sum(0)
        if module.bias is not None:
            module.bias.grad = _per_channel(weighted).sum(0)


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    """``(batch, channels, *spatial)`` summed over the spatial positions: ``(batch, channels)``."""
    return values.flatten(2).sum(2) if values.dim() > 2 else values
