r"""Block-diagonal factors (``"block_diagonal(b)"``, published alias ``"block{b}diagonal"``).

With :math:`d = N b + r` (:math:`0 \le r < b`) the pattern is

.. math::
    M = \operatorname{blockdiag}(M_1, \dots, M_N, M_\text{last}),
    \qquad M_i \in \mathbb{R}^{b\times b},\ M_\text{last} \in \mathbb{R}^{r\times r},

stored as ``blocks`` ``[N, b, b]`` and ``last`` ``[r, r]`` (possibly empty): at most
:math:`d b` numbers. Every block's pattern is mirror-symmetric, so
:math:`\hat\Pi(S)` copies the diagonal blocks of :math:`S`; products, transposes and
:math:`\hat\Pi` all act block by block. In particular

.. math::
    \hat\Pi(K^\top X X^\top K)_i = K_i^\top (X_i X_i^\top) K_i, \qquad
    \hat\Pi(K^\top K)_i = K_i^\top K_i,

where :math:`X_i` are the rows of ``X`` of block :math:`i`. Forming the small Gram
blocks :math:`X_i X_i^\top` first costs :math:`d b n + 2 d b^2` multiply-adds, instead
of :math:`2 d b n` for :math:`S_i = K_i^\top X_i` followed by :math:`S_i S_i^\top`.
(The published code returns :math:`K_i K_i^\top` for :math:`\hat\Pi(K^\top K)`, which
differs once the blocks are not symmetric; spec §9 A1.)

All blocks are processed by one batched product (``bmm``) plus one small product for
the trailing block: no Python loop over blocks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from singd.structures._linalg import tracing
from singd.structures.base import Structure, StructuredMatrix, check_size


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(Structure):
    """Block-diagonal factors with square blocks of size ``block_size`` (last one smaller).

    Args:
        block_size: :math:`b`, the size of every block but the last.
    """

    block_size: int
    name = "block_diagonal"

    def __post_init__(self) -> None:
        check_size("block_size", self.block_size, minimum=1)

    def split(self, dim: int) -> tuple[int, int]:
        """``(N, r)``: the number of full blocks and the size of the trailing block."""
        return divmod(dim, self.block_size)

    def from_dense(self, sym: Tensor) -> BlockDiagonalMatrix:
        d = sym.shape[0]
        N, _ = self.split(d)
        b, m = self.block_size, N * self.block_size
        # [N, b, N, b] -> the N diagonal [b, b] blocks
        grid = sym[:m, :m].reshape(N, b, N, b)
        blocks = grid.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return BlockDiagonalMatrix(
            self,
            d,
            {
                "blocks": blocks.clone(memory_format=torch.contiguous_format),
                "last": sym[m:, m:].clone(memory_format=torch.contiguous_format),
            },
        )

    def from_mat_inner(self, X: Tensor) -> BlockDiagonalMatrix:
        d = X.shape[0]
        N, _ = self.split(d)
        _, X_last = _row_blocks(X, N, self.block_size)
        return BlockDiagonalMatrix(
            self, d, {"blocks": block_grams(X, N, self.block_size), "last": X_last @ X_last.T}
        )

    def zeros(self, dim, *, dtype=None, device=None) -> BlockDiagonalMatrix:
        N, r = self.split(dim)
        b = self.block_size
        return BlockDiagonalMatrix(
            self,
            dim,
            {
                "blocks": torch.zeros(N, b, b, dtype=dtype, device=device),
                "last": torch.zeros(r, r, dtype=dtype, device=device),
            },
        )


def _row_blocks(X: Tensor, N: int, b: int) -> tuple[Tensor, Tensor]:
    """Rows of ``X`` ``[d, n]`` as full blocks ``[N, b, n]`` and the trailing rows ``[r, n]``.

    Both are views for row-major ``X`` and for ``X = A^T`` of a row-major ``A``.
    """
    m = N * b
    return X[:m].reshape(N, b, X.shape[1]), X[m:]


#: CPU float32 matrix-product kernels work in tiles of whole vector registers (64
#: bytes: 16 numbers); a block width just short of a tile multiple runs through slow
#: remainder code. Widening the Gram products to the next multiple by at most this many
#: rows measured 1.1–2.9× faster (widths 12–15, 28–31, 46–47, 60–63, 94, 126 at
#: n = 2048 on one thread; the published default b = 30: 1.55×); widening by 8 or more
#: rows (20, 24, 40, 50, 100, 120) was slower, and so was widening in float64 (b = 28)
#: or float16, which therefore keep plain products.
MAX_GRAM_WIDENING = 4


def block_grams(X: Tensor, N: int, b: int) -> Tensor:
    r"""The Gram matrices :math:`X_i X_i^\top` ``[N, b, b]`` of the ``N`` full row blocks of
    ``X`` ``[d, n]``.

    In float32 on CPUs each product reads a window of ``w`` rows (``b`` rounded up to a
    register tile, see :data:`MAX_GRAM_WIDENING`) starting at its block: the window's
    Gram matrix holds :math:`X_i X_i^\top` as its leading ``b × b`` corner, each entry
    the same dot product, and the rows borrowed from the next block only add entries
    that are dropped. Windows are overlapping views (no copy); blocks whose window
    would run past row ``d`` use plain ``b``-row products.
    """
    d, n = X.shape
    X_blocks, _ = _row_blocks(X, N, b)
    w = -(-b // 16) * 16
    windows = min(N, (d - w) // b + 1) if d >= w else 0
    widen = X.device.type == "cpu" and X.dtype == torch.float32 and not tracing()
    if not (widen and 0 < w - b <= MAX_GRAM_WIDENING and windows > 0):
        return X_blocks @ X_blocks.mT
    rows, cols = X.stride()
    wide = X.as_strided((windows, w, n), (b * rows, rows, cols))  # from X's first entry
    out = X.new_empty(N, b, b)
    out[:windows] = (wide @ wide.mT)[:, :b, :b]
    rest = X_blocks[windows:]
    torch.bmm(rest, rest.mT, out=out[windows:])
    return out


class BlockDiagonalMatrix(StructuredMatrix):
    """A block-diagonal matrix stored as ``blocks`` ``[N, b, b]`` and ``last`` ``[r, r]``."""

    structure: BlockDiagonal

    @property
    def blocks(self) -> Tensor:
        """The ``N`` full diagonal blocks, ``[N, b, b]``."""
        return self._tensors["blocks"]

    @property
    def last(self) -> Tensor:
        """The trailing ``[r, r]`` block (``r = d mod b``, possibly 0)."""
        return self._tensors["last"]

    def to_dense(self) -> Tensor:
        N, b = self.blocks.shape[:2]
        m = N * b
        out = self.blocks.new_zeros(self.dim, self.dim)
        grid = self.blocks.new_zeros(N, b, N, b)
        grid.diagonal(dim1=0, dim2=2).copy_(self.blocks.permute(1, 2, 0))
        out[:m, :m] = grid.reshape(m, m)
        out[m:, m:] = self.last
        return out

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        X = X.to(self.dtype)
        N, b = self.blocks.shape[:2]
        m, n = N * b, X.shape[1]
        blocks, last = (self.blocks.mT, self.last.T) if transpose else (self.blocks, self.last)
        X_blocks, X_last = _row_blocks(X, N, b)
        if tracing():  # (Dynamo and vmap cannot write out= into a view)
            return torch.cat([(blocks @ X_blocks).reshape(m, n), last @ X_last])
        out = X.new_empty(self.dim, n)
        torch.bmm(blocks, X_blocks, out=out[:m].view(N, b, n))
        torch.mm(last, X_last, out=out[m:])
        return out

    def matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=True)

    def matmul(self, other: BlockDiagonalMatrix) -> BlockDiagonalMatrix:
        self._check_same(other)
        other = other.to(self.dtype)
        return self._like(
            {"blocks": torch.bmm(self.blocks, other.blocks), "last": self.last @ other.last}
        )

    def outer(self) -> BlockDiagonalMatrix:
        r""":math:`M M^\top`, block by block (:math:`M_i M_i^\top`): the preconditioning
        :math:`K K^\top X` as one block product with ``X`` instead of two
        (:func:`singd.functional.natural_gradient`)."""
        return self._like(
            {"blocks": torch.bmm(self.blocks, self.blocks.mT), "last": self.last @ self.last.T}
        )

    def outer_matmat(self, X: Tensor) -> Tensor:
        r""":math:`M M^\top X` as one block product (:meth:`outer`)."""
        return self.outer().matmat(X)

    def from_inner(self, X: Tensor | None = None) -> BlockDiagonalMatrix:
        # (torch.bmm, not @: matmul dispatches 4 more view operations per product)
        blocks, last = self.blocks, self.last
        if X is None:  # K_i^T K_i (not K_i K_i^T: spec §9 A1)
            return self._like({"blocks": torch.bmm(blocks.mT, blocks), "last": last.T @ last})
        gram = self.structure.from_mat_inner(X.to(self.dtype))  # the X_i X_i^T
        return self._like(
            {
                "blocks": torch.bmm(blocks.mT, torch.bmm(gram.blocks, blocks)),
                "last": last.T @ (gram.last @ last),
            }
        )

    def diagonal(self) -> Tensor:
        return torch.cat([self.blocks.diagonal(dim1=1, dim2=2).reshape(-1), self.last.diagonal()])

    def diag_add_(self, value: float | Tensor) -> BlockDiagonalMatrix:
        self.blocks.diagonal(dim1=1, dim2=2).add_(value)
        self.last.diagonal().add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        return self._stored_frobenius_norm()


BlockDiagonal.matrix_cls = BlockDiagonalMatrix
