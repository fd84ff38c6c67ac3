r"""``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections).

Despite its name this is a linear layer with the weight stored transposed:
``weight`` is ``[d_in, d_out]`` and :math:`y = x W + b`. Its Kronecker weight matrix is
therefore :math:`W^\top \in \mathbb{R}^{d_o \times d_i}`, exactly the matrix of the
equivalent ``nn.Linear`` (whose weight is ``W^\top``): the statistics are the Linear
adapter's, and only :meth:`grad_matrix` / :meth:`split_matrix` transpose, so a Conv1D
and the equivalent Linear follow the same trajectory.

``transformers`` stays optional: the adapter is registered under the class's dotted
name (:func:`singd.layers.register_adapter_by_name`) and matched by name, so
``import singd`` never imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from singd.layers.base import LayerAdapter
from singd.layers.linear import sequence_format

#: Where ``transformers`` defines the layer (matched by ``__module__`` and ``__qualname__``).
CONV1D_CLASS = "transformers.pytorch_utils.Conv1D"


class TransformersConv1DAdapter(LayerAdapter[nn.Module]):
    """Adapter for ``transformers.pytorch_utils.Conv1D`` (weight ``[d_in, d_out]``)."""

    statistics_attributes = ()  # (shapes only)

    def factor_dims(self) -> tuple[int, int]:
        weight, bias = self.parameters()
        d_in, d_out = weight.shape
        return d_in + int(bias is not None), d_out

    def shared_inputs(self, x: Tensor) -> Tensor:
        return sequence_format(x)  # the statistics are the Linear layer's (shapes only)

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return sequence_format(g)

    def grad_matrix(self) -> Tensor:
        """``[∇Wᵀ | ∇b]``: the stored ``[d_in, d_out]`` gradient, transposed."""
        weight, bias = self.parameters()
        assert weight.grad is not None
        g = weight.grad.T
        if bias is None:
            return g
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return torch.cat([g, bias_grad.unsqueeze(1).to(g.dtype)], dim=1)

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        """``[d_o, d_K]`` back to the stored ``[d_in, d_out]`` weight (and the bias)."""
        if self.parameters()[1] is None:
            return [mat.T]
        return [mat[:, :-1].T, mat[:, -1]]

    # the stacked forms of the two above: a few operations for any number of layers
    @classmethod
    def stacked_grad_matrices(cls, adapters: Sequence[LayerAdapter[Any]]) -> Tensor:
        G = torch.stack([a.parameters()[0].grad for a in adapters]).mT  # type: ignore[misc]
        if adapters[0].parameters()[1] is None:
            return G
        biases = torch.stack([a.parameters()[1].grad for a in adapters])  # type: ignore[misc, union-attr]
        return torch.cat([G, biases.unsqueeze(2).to(G.dtype)], dim=2)

    @classmethod
    def split_stacked(cls, N: Tensor, adapters: Sequence[LayerAdapter[Any]]) -> list[list[Tensor]]:
        if adapters[0].parameters()[1] is None:
            return [[w] for w in N.mT.unbind(0)]
        weights, biases = N[:, :, :-1].mT.unbind(0), N[:, :, -1].unbind(0)
        return [[w, b] for w, b in zip(weights, biases, strict=True)]
