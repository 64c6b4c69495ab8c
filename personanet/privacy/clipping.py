"""Clipping: per-example gradient clipping in one backward pass (book-keeping).

DP-SGD needs ``sum_i min(1, C / ||g_i||) g_i`` where ``g_i`` is example i's gradient.
Opacus' ghost clipping gets the norms ``||g_i||`` without materialising ``g_i`` (for a
linear layer, ``||g_i||^2 = ||a_i||^2 ||b_i||^2`` from the layer's input ``a_i`` and output
gradient ``b_i``), then runs a *second* full backward pass on the reweighted loss to get
the clipped sum. Book-keeping (Bu et al., "Differentially Private Optimization on Large
Model at Small Cost", ICML 2023) keeps ``a`` and ``b`` from the single backward pass and
forms the clipped sum directly, ``W.grad = (c * B)^T A``: the same numbers, one backward
pass fewer.

The per-layer arithmetic is one handler per layer type, registered like Opacus' grad
samplers (`register_clipping`); the handlers PersonaNet's layers need are in
`personanet.privacy.clipping_layers` (and `nn.Conv2d`'s, for the image CNN, in
`personanet.privacy.clipping_conv`). **A new layer type** needs one handler and nothing
else: a `LayerClipping` subclass that

- adds the layer's share to the per-example squared norms (for a convolution, from its
  unfolded input and its output gradient; `output_dims = 4` for ``(batch, C, H, W)``),
- writes the layer's clipped-sum gradient into ``p.grad``,
- and, in `accepts`, refuses the configurations its arithmetic does not cover,

registered with ``@register_clipping(LayerType)``. Until then a network with such a layer
is not `supported` and `train` uses Opacus' own two-pass ghost clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from personanet.privacy.units import UnitLayout


class UnsupportedLayerError(ValueError):
    """The network has a layer the book-keeping clipper cannot clip exactly."""


class LayerClipping:
    """The book-keeping arithmetic of one layer type.

    The clipper calls `add_squared_norms` for every layer of a forward pass, takes the
    square root of the sum to get each example's gradient norm, and then calls
    `write_clipped_sum` with the output gradient scaled by each example's clipping
    coefficient.
    """

    #: dimensions of the layer's output, batch first (``(batch, features)``)
    output_dims = 2

    def accepts(self, module: torch.nn.Module) -> bool:
        """Whether this instance of the layer type is one the arithmetic covers."""
        return True

    def add_squared_norms(self, module: Any, activation: torch.Tensor, grad: torch.Tensor,
                          squared: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Add the layer's share of each example's squared gradient norm to `squared`
        (in place, shape ``(batch,)``), from its input `activation` and the gradient of
        the loss with respect to its output `grad`.

        Returns:
            What `write_clipped_sum` needs of the input, and the output gradient it is
            to scale (the handler may mask it, as Embedding does for its padding index).
        """
        raise NotImplementedError

    #: whether `add_unit_squared_norms` is implemented (person-level clipping)
    per_unit = False

    def add_unit_squared_norms(self, module: Any, saved: Any, grad: torch.Tensor,
                               units: UnitLayout, squared: torch.Tensor) -> None:
        """Add the layer's share of each *person's* squared gradient norm to `squared`
        (shape ``(units.count,)``): the norm of the sum of the person's row gradients,
        from what `add_squared_norms` returned. Person-level training needs it of every
        layer; a handler without it (`per_unit` False) sends such runs to Opacus' hooks."""
        raise NotImplementedError

    def write_clipped_sum(self, module: Any, saved: Any, weighted: torch.Tensor) -> None:
        """Set ``p.grad`` of the layer's parameters to the sum over examples of their
        clipped gradients; `weighted` is the output gradient times each example's
        clipping coefficient."""
        raise NotImplementedError


_HANDLERS: dict[type, LayerClipping] = {}


def register_clipping(*layer_types: type) -> Callable[[type[LayerClipping]],
                                                      type[LayerClipping]]:
    """Register a `LayerClipping` subclass for `layer_types` (matched exactly, not by
    subclass: a subclass may change the forward pass the arithmetic assumes)."""
    def register(handler: type[LayerClipping]) -> type[LayerClipping]:
        for layer_type in layer_types:
            _HANDLERS[layer_type] = handler()
        return handler
    return register


def handler_for(module: Any) -> LayerClipping | None:
    """The registered handler for `module`'s exact type, or None."""
    # The handlers import torch: registered on first use, so importing this module is cheap.
    import personanet.privacy.clipping_conv  # noqa: F401
    import personanet.privacy.clipping_layers  # noqa: F401

    return _HANDLERS.get(type(module))


class BookkeepingClipper:
    """Per-example gradient clipping in one backward pass, for PersonaNet's layers.

    The output is exactly what Opacus' clipping computes (the tests compare both against
    per-example gradients from Opacus' hooks).

    It needs every trainable layer to have a registered handler (today `nn.Linear`,
    `nn.Embedding` with one index per example, `nn.LayerNorm` over the last dimension,
    `nn.GroupNorm` and `nn.Conv2d` without groups), used once per forward, and no
    interaction between examples (no BatchNorm). `supports()` says whether a network
    qualifies; anything else goes to Opacus' own two-pass ghost clipping.

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
    def supports(model: torch.nn.Module, *, per_unit: bool = False) -> bool:
        """Whether every layer with trainable parameters has a handler that accepts it
        (and, with `per_unit`, that can clip per person)."""
        for module in model.modules():
            if not _own_parameters(module):
                continue
            handler = handler_for(module)
            if handler is None or not handler.accepts(module):
                return False
            if per_unit and not handler.per_unit:
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

    def backward(self, losses: torch.Tensor, *, units: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Set ``p.grad`` of every parameter to the sum of clipped per-example gradients.

        Args:
            losses: one loss per example, shape ``(batch,)``, from the last forward pass.
            units: person-level clipping: row i's person (0 .. U-1), shape ``(batch,)``;
                each person's gradient (the sum of their rows' gradients: weight
                `losses` to make it a mean) is clipped as one, ``(U,)`` norms returned.

        Returns:
            The per-example gradient norms before clipping (for diagnostics only: they
            are not private).
        """
        import torch

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
        layout = None
        if units is not None:
            from personanet.privacy.units import UnitLayout

            layout = UnitLayout(units)
            per_unit = torch.zeros(layout.count, dtype=losses.dtype, device=losses.device)
        prepared = []
        for index, ((module, activation, _), grad) in enumerate(zip(records, grads,
                                                                  strict=True)):
            handler = _HANDLERS[type(module)]
            if grad is None:  # a layer whose output did not reach the loss
                grad = torch.zeros_like(outputs[index])
            dims = handler.output_dims  # an int, or the tuple of those a handler takes
            if grad.dim() not in (dims if isinstance(dims, tuple) else (dims,)) \
                    or grad.shape[0] != batch:
                raise UnsupportedLayerError(
                    f"{type(module).__name__} output has shape {tuple(grad.shape)}; "
                    "book-keeping needs (batch, features)")
            saved, grad = handler.add_squared_norms(module, activation, grad, squared)
            if layout is not None:
                handler.add_unit_squared_norms(module, saved, grad, layout, per_unit)
            prepared.append((handler, module, saved, grad))
        norms = squared.sqrt() if layout is None else per_unit.sqrt()
        # The coefficient of Opacus' ghost clipping, so both paths give the same numbers.
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        if layout is not None:  # each row takes its person's coefficient
            coef = coef[layout.index]
        for handler, module, saved, grad in prepared:
            per_example = coef.view(batch, *[1] * (grad.dim() - 1))  # broadcast over features
            handler.write_clipped_sum(module, saved, grad * per_example)
        return norms.detach()


def _own_parameters(module: Any) -> list[Any]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]
