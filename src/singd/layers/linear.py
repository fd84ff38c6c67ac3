r"""``nn.Linear`` with any number of weight-sharing dimensions.

Input ``[B, ..., d_in]``, output ``[B, ..., d_o]``; every dimension between batch
and features is a shared position (R = their product). A 1-d input is one sample.
"""

from __future__ import annotations

from torch import Tensor, nn

from singd.layers.base import LayerAdapter


def sequence_format(t: Tensor) -> Tensor:
    """``[B, ..., d]`` as ``[B, R, d]`` (R = the product of the middle dimensions); a
    1-d tensor is one sample."""
    return t.reshape(t.shape[0] if t.ndim > 1 else 1, -1, t.shape[-1])


class LinearAdapter(LayerAdapter[nn.Linear]):
    """Adapter for :class:`torch.nn.Linear`."""

    def factor_dims(self) -> tuple[int, int]:
        module = self.module
        return module.in_features + int(module.bias is not None), module.out_features

    def shared_inputs(self, x: Tensor) -> Tensor:
        return sequence_format(x)

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return sequence_format(g)
