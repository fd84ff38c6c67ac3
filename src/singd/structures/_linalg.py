"""Dense kernels shared by the structures: Gram matrices and row norms, done cheaply.

On a CPU both avoid work or memory traffic that a one-line PyTorch expression would
spend: ``X @ X.T`` computes both halves of a symmetric result, and
``X.square().sum(1)`` allocates a temporary as large as ``X`` (for SINGD's ``X = Aᵀ``
with many columns, touching that fresh memory costs several times the arithmetic).

On a GPU the opposite holds: each operation costs a kernel launch (measured about
25 µs of host time per operation on an H200 machine, where the whole SINGD-diagonal
step was host-bound with 1.5 ms of kernel time in 21 ms), memory comes from a caching
allocator, and these sizes are far from compute-bound, so there the one-line
expressions are used (:func:`splits_work`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Below this size a Gram block is one matrix product: splitting it further saves
#: fewer multiply-adds than the extra calls cost.
_GRAM_LEAF = 128


def splits_work(X: Tensor) -> bool:
    """Whether splitting a product into more, smaller operations pays off on ``X``'s
    device: on a CPU (arithmetic and memory traffic dominate), not on accelerators
    (kernel launches dominate; module docstring)."""
    return X.device.type == "cpu"


def tracing() -> bool:
    """Whether the code runs under ``torch.compile`` or a ``torch.func`` transform
    (``vmap`` of a batch of layers, :mod:`singd.preconditioners.stacked`): there tensors
    have no meaningful version counters, ``out=`` cannot write into views, and some
    in-place operations (``addcmul_``) have no batching rule."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


def symmetric_gram(X: Tensor) -> Tensor:
    r""":math:`X X^\top` for ``X`` of shape ``[d, n]``, computing only its lower half.

    The rows are halved recursively: the two diagonal blocks recurse and the
    off-diagonal block :math:`X_2 X_1^\top` is one product whose transpose fills the
    upper half. About :math:`\tfrac12 d^2 n` multiply-adds instead of :math:`d^2 n`.
    The result is exactly symmetric.
    """
    if not splits_work(X) or tracing():  # (tracing: no writes into views of out)
        return symmetrized(X @ X.T)  # one product (module docstring)
    d = X.shape[0]
    out = X.new_empty(d, d)
    _gram_into(X, out, _GRAM_LEAF)
    return out


def symmetrized(M: Tensor) -> Tensor:
    r""":math:`(M + M^\top) / 2`: exactly symmetric (floating-point addition commutes)
    and, for an :math:`M` symmetric up to round-off, equal to it to round-off; three
    operations."""
    return (M + M.mT).mul_(0.5)


def _gram_into(X: Tensor, out: Tensor, leaf: int) -> None:
    d = X.shape[0]
    if d <= leaf:
        G = X @ X.T
        # a single GEMM is symmetric only up to round-off; keep the result exactly so
        out.copy_(G.tril() + G.tril(-1).T)
        return
    h = d // 2
    _gram_into(X[:h], out[:h, :h], leaf)
    _gram_into(X[h:], out[h:, h:], leaf)
    off = X[h:] @ X[:h].T
    out[h:, :h] = off
    out[:h, h:] = off.T


#: Elements per column chunk of :func:`row_sum_of_squares` (1 MB in float32): the
#: squared chunk stays in a core's L2 cache, and a temporary this small is recycled by
#: the memory allocator instead of being mapped fresh (one page fault per 4 KB) for
#: every chunk. On the benchmark CNN, hierarchical(15, 15)'s statistics took 17.9 ms
#: per step with 4 MB chunks, 13.1 ms with 1 MB ones.
_ROW_NORM_CHUNK = 1 << 18


def row_sum_of_squares(X: Tensor) -> Tensor:
    r""":math:`\operatorname{diag}(X X^\top) = \sum_m X_{im}^2` for ``X`` ``[d, n]``.

    Summed over chunks of columns, so the squares never fill a ``[d, n]`` temporary:
    about 9× faster than ``X.square().sum(1)`` for ``d = 577, n = 32768`` on one CPU
    thread.
    """
    d, n = X.shape
    # chunk sums are accumulated in at least float32 (half precision would lose them)
    accumulate = torch.float32 if X.dtype in (torch.float16, torch.bfloat16) else X.dtype
    if not splits_work(X) or tracing():  # one reduction (vmap: no += into a zeros tensor)
        return X.square().sum(1, dtype=accumulate).to(X.dtype)
    step = max(1, _ROW_NORM_CHUNK // max(d, 1))
    out = torch.zeros(d, dtype=accumulate, device=X.device)
    for start in range(0, n, step):
        out += X[:, start : start + step].square().sum(1, dtype=accumulate)
    return out.to(X.dtype)
