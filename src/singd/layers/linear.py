r"""``nn.Linear`` with any number of weight-sharing dimensions.

Input ``[B, ..., d_in]``, output ``[B, ..., d_o]``; every dimension between batch
and features is a shared position (R = their product). A 1-d input is one sample.
"""

from __future__ import annotations

from torch import Tensor, nn

from singd.layers.base import LayerAdapter


class LinearAdapter(LayerAdapter[nn.Linear]):
    """Adapter for :class:`torch.nn.Linear`."""

    def factor_dims(self, module: nn.Linear) -> tuple[int, int]:
        return module.in_features + int(module.bias is not None), module.out_features

    def shared_inputs(self, module: nn.Linear, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0] if x.ndim > 1 else 1, -1, x.shape[-1])

    def shared_grad_outputs(self, module: nn.Linear, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0] if g.ndim > 1 else 1, -1, g.shape[-1])
