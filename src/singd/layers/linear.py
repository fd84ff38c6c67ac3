r"""``nn.Linear`` with any number of weight-sharing dimensions.

Input ``[B, ..., d_in]``, output ``[B, ..., d_o]``; every dimension between batch
and features is a shared position (R = their product). A 1-d input is one sample.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from singd.layers.base import LayerAdapter, pad_bias_entry


def sequence_format(t: Tensor) -> Tensor:
    """``[B, ..., d]`` as ``[B, R, d]`` (R = the product of the middle dimensions); a
    1-d tensor is one sample."""
    return t.reshape(t.shape[0] if t.ndim > 1 else 1, -1, t.shape[-1])


class LinearAdapter(LayerAdapter[nn.Linear]):
    """Adapter for :class:`torch.nn.Linear`."""

    statistics_attributes = ()  # (shapes only)

    def factor_dims(self) -> tuple[int, int]:
        module = self.module
        return module.in_features + int(module.bias is not None), module.out_features

    def shared_inputs(self, x: Tensor) -> Tensor:
        return sequence_format(x)

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return sequence_format(g)

    # direct reductions over every dimension but the features (no reshaping view)
    def input_diagonal(self, x: Tensor, approx: str) -> Tensor:
        if approx != "expand" or x.ndim < 2:
            return super().input_diagonal(x, approx)
        diag = x.square().mean(tuple(range(x.ndim - 1)))
        return pad_bias_entry(diag) if self.module.bias is not None else diag

    def grad_output_squares(self, g: Tensor) -> tuple[Tensor, int, int]:
        if g.ndim < 2:
            return super().grad_output_squares(g)
        positions = math.prod(g.shape[1:-1])
        return g.square().sum(tuple(range(g.ndim - 1))), g.shape[0], positions
