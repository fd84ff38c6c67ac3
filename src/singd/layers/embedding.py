r"""``nn.Embedding`` as a linear layer on one-hot inputs.

:math:`y = W^\top \operatorname{onehot}(i)` with the weight stored as ``[V, d]``, so
the Kronecker weight matrix is :math:`W^\top \in \mathbb{R}^{d \times V}`: the
output side (C) spans the embedding dimension and follows the group's structure,
the input side (K) spans the vocabulary. Its statistic
:math:`U = A^\top A` is diagonal under KFAC-expand (token frequencies), and a dense
``V × V`` factor is out of the question, so K is always **diagonal** here. Its
diagonal is computed from token counts with ``bincount`` — the one-hot matrix is
never formed. Tokens equal to ``padding_idx`` are left out of the counts: PyTorch
gives the padding row no gradient, so it has no curvature either.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from singd.layers.base import LayerAdapter
from singd.structures import Diagonal


class EmbeddingAdapter(LayerAdapter[nn.Embedding]):
    """Adapter for :class:`torch.nn.Embedding` (dense gradients only)."""

    input_structure = Diagonal()

    def check(self) -> None:
        if self.module.sparse:
            raise ValueError(
                "nn.Embedding(sparse=True) produces sparse gradients, which Kronecker "
                "optimizers cannot precondition; construct it with sparse=False."
            )

    def parameters(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        return cast(nn.Parameter, self.module.weight), None  # (no bias)

    def factor_dims(self) -> tuple[int, int]:
        module = self.module
        return module.num_embeddings, module.embedding_dim

    def _one_hot_counts(self, x: Tensor, approx: str) -> Tensor:
        module = self.module
        index = x.reshape(x.shape[0], -1) if x.ndim >= 1 else x.reshape(1, 1)  # [B, R]
        batch, positions = index.shape
        weight = (index != module.padding_idx) if module.padding_idx is not None else None
        if approx == "expand":
            tokens = index.flatten() if weight is None else index.flatten()[weight.flatten()]
            counts = tokens.bincount(minlength=module.num_embeddings)
            return counts.to(module.weight.dtype) / (batch * positions)
        # reduce: rows are per-sample averages of one-hots; only diag(AᵀA) is needed
        V = module.num_embeddings
        per_sample = index.new_zeros(batch, V, dtype=module.weight.dtype)
        ones = index.new_ones(index.shape, dtype=module.weight.dtype)
        if weight is not None:
            ones = ones * weight
        per_sample.scatter_add_(1, index, ones)
        return (per_sample / positions).square().sum(0) / batch

    def input_diagonal(self, x: Tensor, approx: str) -> Tensor:
        return self._one_hot_counts(x, approx)

    def shared_inputs(self, x: Tensor) -> Tensor:
        raise NotImplementedError(
            "nn.Embedding has a diagonal input factor: use input_diagonal(), which never "
            "forms the one-hot matrix."
        )

    def shared_grad_outputs(self, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0] if g.ndim >= 2 else 1, -1, g.shape[-1])

    def grad_matrix(self) -> Tensor:
        grad = self.module.weight.grad
        assert grad is not None
        if grad.is_sparse:
            grad = grad.to_dense()
        return grad.T

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        return [mat.T]
