r"""Triangular Toeplitz factors (``"tril_toeplitz"``, ``"triu_toeplitz"``).

A lower-triangular Toeplitz matrix is constant along each diagonal:

.. math::
    T(t)_{ij} = t_{i-j} \ (i \ge j), \qquad 0 \ (i < j), \qquad t \in \mathbb{R}^d,

i.e. the polynomial :math:`\sum_k t_k Z^k` in the down-shift :math:`Z`; such
matrices commute, and :math:`T(t)\,T(s) = T\bigl((t * s)_{0:d}\bigr)` (truncated
convolution), so they form a group (for :math:`t_0 \ne 0`). The upper variant is the
transpose :math:`T(t)^\top` (which equals :math:`J\,T(t)\,J`: Toeplitz matrices are
persymmetric); both store only the coefficient vector ``coeffs`` :math:`= t`, and one
implementation serves both orientations by swapping :math:`T` and :math:`T^\top`.

**Projection** (tie-sets are diagonals; the mirror of an off-diagonal entry is off
pattern): :math:`t_0 = \operatorname{Tr}(S)/d` and, for :math:`k \ge 1`,
:math:`t_k = \frac{1}{d-k}\sum_i (S_{i+k,i} + S_{i,i+k})`, twice the mean of the
:math:`k`-th sub-diagonal of a symmetric :math:`S`. The same formula serves both
orientations.

**Fast products.** :math:`T(t) X` is a causal convolution of every column of ``X``
with :math:`t`, and :math:`T(t)^\top X` a correlation; both are computed with real
FFTs of length :math:`L \ge 2d - 1` (so the circular wrap-around never reaches the
kept entries), in chunks of columns that stay in cache: :math:`O(n d \log d)`
instead of :math:`O(d^2 n)`. Half precision runs the FFTs in float32 (CPU FFTs need
it) and rounds the result once. For small :math:`d \le` :data:`DIRECT_MAX_DIM` (128)
the FFTs' per-column overhead dominates, and a product with the dense :math:`T(t)`
(at most :math:`128^2` numbers, less than one FFT chunk) is faster, so it is used
there: e.g. 1.8 instead of 12 ms for :math:`d = 28, n = 32768`; from
:math:`d \approx 150`–200 on the FFTs win (at :math:`d = 577, n = 2048`: 9.5 vs 15 ms
for :math:`T X`, one CPU thread).

**from_inner without a** ``d × d`` **matrix.** :math:`\hat\Pi(S S^\top)` needs only the
diagonal sums :math:`c_k = \sum_i (S S^\top)_{i+k,i} = \sum_m \sum_i S_{i+k,m} S_{i,m}`,
the summed autocorrelations of the columns of :math:`S` (Wiener–Khinchin:
:math:`c = \mathcal F^{-1}\sum_m |\mathcal F s_m|^2`). For
:math:`\hat\Pi(K^\top X X^\top K)` each chunk of columns goes through
FFT → multiply by :math:`\hat t` → inverse FFT → truncate to :math:`d` rows
(:math:`S = K^\top X`) → FFT → :math:`|\cdot|^2`, summed over columns: three FFTs of the
chunk and :math:`O(L)` extra memory. Where it is cheaper (:func:`dense_gram_is_cheaper`)
the dense route forms :math:`G = XX^\top` instead, above :data:`DIRECT_MAX_DIM` only
while :math:`d \le n` (no memory beyond the input's). The sandwich then needs no
:math:`d^3` products: with :math:`c_k(M) = \langle M, Z^k\rangle` and :math:`T(t)`
commuting with :math:`Z`, :math:`c_k(W T(t)^\top) = \sum_u t_u c_{k+u}(W)`, and
:math:`c_j(T(t) G) = \sum_r t_r D_{r-j}(d-1-j)` with the prefix sums
:math:`D_\delta(m) = \sum_{a \le m} G_{a,\,a-\delta}` along the diagonals of
:math:`G`: :math:`O(d^2 \log d)` on a CPU (:func:`diagonal_prefix_sandwich`; at
:math:`d = 577, n = 2048` 35 instead of 45 ms through FFTs, one shared CPU thread).
:math:`\hat\Pi(K^\top K)` has the closed form
:math:`c_k = \sum_{u \ge k} (d-u)\, t_u t_{u-k}` (a correlation of :math:`d`-vectors;
the same for both orientations).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures import _linalg
from singd.structures._linalg import symmetric_gram
from singd.structures.base import Structure, StructuredMatrix

#: Up to this size, products with the dense ``d × d`` matrix (at most 16384 numbers,
#: less than one FFT chunk) beat the FFTs: e.g. ``from_inner`` at d = 28, n = 32768 on
#: one CPU thread, 7.2 ms through FFTs, 0.9 ms dense.
DIRECT_MAX_DIM = 128

#: Relative cost of one ``n × L`` FFT unit (``n L log₂ L``, three passes) against one
#: multiply-add of a dense product, for choosing the route of the diagonal sums of a
#: Gram matrix (:func:`gram_diagonal_sums`): fitted on one CPU thread, where it picks
#: the faster route for every measured shape from d = 145 to 1153, n = 512 to 8192
#: (with the prefix route: FFTs 1.9-2.0 ns per unit at d ≥ 577, the dense route 85-100
#: ps per multiply-add; dense up to d = 577 at n = 2048, FFTs from d = 769).
FFT_UNIT_COST = 20.0

#: Cost of :func:`diagonal_prefix_sandwich` per :math:`d^2 \log_2 d` in multiply-adds of
#: a dense product (its adds and copies are memory-bound): fitted on one CPU thread,
#: where it beats the two d³ products from this size on (d = 145: 0.68 vs 0.49 ms,
#: d = 200: 0.48 vs 0.67 ms).
PREFIX_UNIT_COST, PREFIX_MIN_DIM = 24.0, 170

#: The last lags of :func:`gram_diagonal_sums` summed directly, not through FFTs (see
#: there): 64 keeps the FFT error of every other lag amplified at most d/32 times.
EXACT_LAGS = 64

#: Columns per FFT chunk are chosen so that a chunk's spectrum (complex, about
#: ``chunk × L / 2`` numbers) stays within a few MB of cache: measured 2-3× faster
#: than transforming all columns at once for ``n`` in the thousands.
_CHUNK_NUMBERS = 1 << 18


def fft_length(m: int) -> int:
    """The smallest 5-smooth integer :math:`\\ge m` (:math:`2^a 3^b 5^c`, fast for FFTs)."""
    best = 1 << max(m - 1, 0).bit_length()  # a power of two always qualifies
    odd3 = 1
    while odd3 < best:
        odd = odd3  # 3^b 5^c
        while odd < best:
            candidate = odd
            while candidate < m:
                candidate *= 2
            best = min(best, candidate)
            odd *= 5
        odd3 *= 3
    return best


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """FFT dtype: CPU FFTs need at least float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _column_chunks(X: Tensor, L: int, work: torch.dtype) -> Iterator[tuple[slice, Tensor]]:
    """``(columns, rows)``: chunks of the columns of ``X`` ``[d, n]`` as ``[chunk, d]`` rows."""
    n = X.shape[1]
    # 16× larger chunks on accelerators, where each chunk costs launches, not cache
    step = max(1, (_CHUNK_NUMBERS if _linalg.splits_work(X) else _CHUNK_NUMBERS << 4) // L)
    for start in range(0, n, step):
        cols = slice(start, min(start + step, n))
        yield cols, X[:, cols].T.to(work)


def _coefficient_spectrum(t: Tensor, L: int, transpose: bool, work: torch.dtype) -> Tensor:
    r"""FFT of :math:`t` for products with :math:`T(t)`, conjugated for :math:`T(t)^\top`.

    With :math:`L \ge 2d-1`: :math:`\hat t \hat x` is the causal convolution
    :math:`\sum_{u} t_u x_{i-u}` and :math:`\bar{\hat t} \hat x` the correlation
    :math:`\sum_u t_u x_{i+u}`, both exact on the first :math:`d` entries.
    """
    spectrum = torch.fft.rfft(t.to(work), n=L)
    return spectrum.conj() if transpose else spectrum


def lower_toeplitz(t: Tensor) -> Tensor:
    """The dense ``[d, d]`` :math:`T(t)`: :math:`T(t)_{ij} = t_{i-j}` for :math:`i \\ge j`.

    A Hankel view :math:`H_{ij} = r_{i+j}` of :math:`r = (t_{d-1}, …, t_0, 0, …, 0)`
    flipped upside down: one copy, no index tensors.
    """
    d = t.shape[0]
    r = torch.cat([t.flip(0), t.new_zeros(max(d - 1, 0))])
    return r.as_strided((d, d), (1, 1)).flip(0)


def subdiagonal_sums(M: Tensor) -> Tensor:
    """:math:`\\sum_i M_{i+k,\\,i}` for :math:`k = 0..d-1`, in float64."""
    d = M.shape[0]
    rows, cols = torch.tril_indices(d, d, device=M.device)
    sums = torch.zeros(d, dtype=torch.float64, device=M.device)
    # (out of place: vmap cannot add a batch of sums into one zeros tensor in place)
    return sums.index_add(0, rows - cols, M[rows, cols].to(torch.float64))


def toeplitz_matmat(t: Tensor, X: Tensor, transpose: bool = False) -> Tensor:
    r""":math:`T(t) X` (or :math:`T(t)^\top X`) for ``X`` of shape ``[d, n]``.

    FFT-based for :math:`d >` :data:`DIRECT_MAX_DIM`, a product with the dense
    :math:`T(t)` below (module docstring).
    """
    d, n = X.shape
    if d <= DIRECT_MAX_DIM:
        T = lower_toeplitz(t.to(X.dtype))
        return (T.T if transpose else T) @ X
    L = fft_length(2 * d - 1)
    work = _work_dtype(X.dtype)
    t_hat = _coefficient_spectrum(t, L, transpose, work)
    out = X.new_empty(n, d)  # filled chunk by chunk as rows, returned transposed
    for cols, rows in _column_chunks(X, L, work):
        out[cols] = torch.fft.irfft(torch.fft.rfft(rows, n=L, dim=1).mul_(t_hat), n=L, dim=1)[:, :d]
    return out.T


def gram_diagonal_sums(X: Tensor, t: Tensor | None = None, transpose: bool = False) -> Tensor:
    r""":math:`c_k = \sum_i (S S^\top)_{i+k,\,i}`, :math:`k = 0..d-1`, for ``X`` ``[d, n]``.

    :math:`S = X`, or :math:`S = T(t) X` (:math:`T(t)^\top X` with ``transpose``).
    Through the FFTs (below), :math:`S` is never stored beyond one chunk of columns; the
    dense route (:func:`dense_gram_diagonal_sums`) is taken where it is cheaper
    (:func:`dense_gram_is_cheaper`). Returned in float64.
    """
    d, n = X.shape
    work = _work_dtype(X.dtype)
    L = fft_length(2 * d - 1)
    if dense_gram_is_cheaper(d, n, L, prefix=t is not None and _prefix_route(X)):
        return dense_gram_diagonal_sums(X.to(work), None if t is None else t.to(work), transpose)
    t_hat = None if t is None else _coefficient_spectrum(t, L, transpose, work)
    # The sums c_k are divided by the counts d - k, which amplifies the FFT's
    # (norm-wise) round-off of the last lags up to 2d times; so the last EXACT_LAGS
    # lags are summed directly, from the corner S[d-m:] S[:m]ᵀ of the Gram matrix
    # (m² multiply-adds per column), and the rest keep an amplification ≤ 2d/m. The
    # power spectrum is summed in float64 (a float32 sum of all columns gave 10× the
    # error of a dense float32 Gram), on a CPU each chunk's (a cascade sum) in float32
    # first: as accurate (0.95-1.4× the error, d = 300…3000, n = 3…8192), 10-20% faster.
    # Against a float64 oracle (float32 input, largest error over the largest entry,
    # d = 1153…3000): 1.6e-5 to 1.8e-5 without the corner, with it as accurate as a
    # float64 spectrum for 1/10 of that one's cost.
    m = min(EXACT_LAGS, d)
    power = torch.zeros(2 * (L // 2 + 1), dtype=torch.float64, device=X.device)
    corner = torch.zeros(m, m, dtype=torch.float64, device=X.device)
    cpu = _linalg.splits_work(X)
    for _, rows in _column_chunks(X, L, work):
        if t_hat is not None:
            rows = torch.fft.irfft(torch.fft.rfft(rows, n=L, dim=1).mul_(t_hat), n=L, dim=1)[:, :d]
        spectrum = torch.view_as_real(torch.fft.rfft(rows, n=L, dim=1)).reshape(rows.shape[0], -1)
        power += spectrum.square_().sum(0) if cpu else spectrum.square().sum(0, dtype=torch.float64)
        corner += rows[:, d - m :].T @ rows[:, :m]
    sums = torch.fft.irfft(power.view(-1, 2).sum(1), n=L)[:d]
    sums[d - m :] = subdiagonal_sums(corner)
    return sums


def dense_gram_is_cheaper(d: int, n: int, L: int, prefix: bool = False) -> bool:
    r"""Whether :func:`dense_gram_diagonal_sums` beats the FFTs for ``X`` ``[d, n]``.

    Always for :math:`d \le` :data:`DIRECT_MAX_DIM`; above, only for :math:`d \le n`
    (module docstring) and multiply-adds below :data:`FFT_UNIT_COST` ×
    :math:`n L \log_2 L`: :math:`d^2 \min(\tfrac32 n, \tfrac12 n + 2d)`, or with
    ``prefix`` (:func:`diagonal_prefix_sandwich`) :math:`\tfrac12 d^2 n` +
    :data:`PREFIX_UNIT_COST` × :math:`d^2 \log_2 d`. On the benchmark CNN: dense for
    the 3×3 convolutions with 16 to 64 input channels and many rows (``d = 145, n =
    8192`` to ``d = 577, n = 2048``), FFTs for the others.
    """
    if d <= DIRECT_MAX_DIM:
        return True
    if prefix:
        dense = d * d * (0.5 * n + PREFIX_UNIT_COST * math.log2(d))
    else:
        dense = d * d * min(1.5 * n, 0.5 * n + 2 * d)
    return d <= n and dense < FFT_UNIT_COST * n * L * math.log2(L)


def dense_gram_diagonal_sums(X: Tensor, t: Tensor | None, transpose: bool) -> Tensor:
    r""":func:`gram_diagonal_sums` through the dense :math:`S S^\top`, in float64.

    With :math:`T'` = :math:`T(t)` or :math:`T(t)^\top`: for :math:`n \ge d` the Gram
    matrix first (:math:`\tfrac12 d^2 n` multiply-adds: Gram matrices are formed by
    halves, see :func:`~singd.structures._linalg.symmetric_gram`), then on a CPU from
    :data:`PREFIX_MIN_DIM` on the diagonal sums of :math:`T' (X X^\top) T'^\top` in
    :math:`O(d^2 \log d)` (:func:`diagonal_prefix_sandwich`), elsewhere the two products
    (:math:`2 d^3`, one operation each); for :math:`n < d` :math:`S = T' X` first
    (:math:`\tfrac32 d^2 n`).
    """
    d, n = X.shape
    if t is None:
        return subdiagonal_sums(symmetric_gram(X))
    if n >= d and _prefix_route(X):
        return diagonal_prefix_sandwich(symmetric_gram(X), t, transpose)
    T = lower_toeplitz(t)
    T = T.T if transpose else T
    if n >= d:
        return subdiagonal_sums(T @ symmetric_gram(X) @ T.T)
    return subdiagonal_sums(symmetric_gram(T @ X))


def _prefix_route(X: Tensor) -> bool:
    """Whether :func:`diagonal_prefix_sandwich` serves ``X``: from :data:`PREFIX_MIN_DIM`
    rows, on a CPU, outside compiled or vmapped code (it writes into a view)."""
    return X.shape[0] >= PREFIX_MIN_DIM and _linalg.splits_work(X) and not _linalg.tracing()


def diagonal_prefix_sandwich(G: Tensor, t: Tensor, transpose: bool) -> Tensor:
    r"""The diagonal sums of :math:`T(t) G T(t)^\top` (:math:`T(t)^\top G T(t)` with
    ``transpose``) for a symmetric ``G`` ``[d, d]`` through the prefix sums along its
    diagonals (module docstring), :math:`O(d^2 \log d)`, in float64."""
    d = G.shape[0]
    if transpose:  # Tᵀ G T = J T (J G J) Tᵀ J, and J·J keeps a symmetric's diagonal sums
        G = G.flip((0, 1))
    # W[a, e] = G[a, a + e - (d - 1)], zero off G: row a holds its entries by diagonal
    W = G.new_zeros(d, 2 * d - 1)
    W.as_strided((d, d), (2 * d - 2, 1), d - 1).copy_(G)
    # prefix sums down the columns by doubling, log₂ d vectorised adds (torch.cumsum
    # along dim 0 strides through memory one element at a time: 8× slower at d = 577)
    spare, shift = torch.empty_like(W), 1
    while shift < d:
        spare[:shift] = W[:shift]
        torch.add(W[shift:], W[:-shift], out=spare[shift:])
        W, spare, shift = spare, W, 2 * shift
    # the prefix sums D_{r-j}(d-1-j) as a [d, d] view, rows j and columns r reversed
    D = W.as_strided((d, d), (2 * d - 2, 1), d - 1)
    w = (D @ t.flip(0).to(G.dtype)).flip(0).to(torch.float64)
    return toeplitz_matmat(t.to(torch.float64), w.unsqueeze(1), transpose=True)[:, 0]


def _coefficients_from_diagonal_sums(c: Tensor) -> Tensor:
    r"""Toeplitz coefficients of :math:`\hat\Pi(Q)` from the diagonal sums :math:`c_k` of a
    symmetric :math:`Q`: :math:`t_0 = c_0/d`, :math:`t_k = 2 c_k/(d-k)`."""
    d = c.shape[0]
    weights = 2.0 / torch.arange(d, 0, -1, dtype=c.dtype, device=c.device)
    weights[:1] = 1.0 / d
    return c * weights


@dataclasses.dataclass(frozen=True)
class TriangularToeplitz(Structure):
    """Triangular Toeplitz factors; ``lower`` picks the orientation (subclasses)."""

    #: Lower (``T(t)``) or upper (``T(t)^T``) triangular.
    lower: ClassVar[bool]

    def from_dense(self, sym: Tensor) -> ToeplitzMatrix:
        d = sym.shape[0]
        # S_ij + S_ji summed over the lower triangle counts the diagonal twice
        sums = subdiagonal_sums(sym) + subdiagonal_sums(sym.T)
        sums[:1] /= 2
        counts = torch.arange(d, 0, -1, dtype=sums.dtype, device=sym.device)
        return ToeplitzMatrix(self, d, {"coeffs": (sums / counts).to(sym.dtype)})

    def from_mat_inner(self, X: Tensor) -> ToeplitzMatrix:
        c = gram_diagonal_sums(X)
        return ToeplitzMatrix(
            self, X.shape[0], {"coeffs": _coefficients_from_diagonal_sums(c).to(X.dtype)}
        )

    def zeros(self, dim, *, dtype=None, device=None) -> ToeplitzMatrix:
        return ToeplitzMatrix(self, dim, {"coeffs": torch.zeros(dim, dtype=dtype, device=device)})


@dataclasses.dataclass(frozen=True)
class TrilToeplitz(TriangularToeplitz):
    """Lower-triangular Toeplitz factors (``"tril_toeplitz"``): :math:`M_{ij} = t_{i-j}`."""

    name = "tril_toeplitz"
    lower = True


@dataclasses.dataclass(frozen=True)
class TriuToeplitz(TriangularToeplitz):
    """Upper-triangular Toeplitz factors (``"triu_toeplitz"``): :math:`M_{ij} = t_{j-i}`."""

    name = "triu_toeplitz"
    lower = False


class ToeplitzMatrix(StructuredMatrix):
    """A triangular Toeplitz matrix stored as its ``d`` diagonal constants ``coeffs``."""

    structure: TriangularToeplitz

    @property
    def coeffs(self) -> Tensor:
        """:math:`t`: ``coeffs[k]`` fills the ``k``-th sub- (lower) or super-diagonal (upper)."""
        return self._tensors["coeffs"]

    def to_dense(self) -> Tensor:
        T = lower_toeplitz(self.coeffs)
        return T if self.structure.lower else T.T.contiguous()

    def matmat(self, X: Tensor) -> Tensor:
        X = X.to(self.dtype)
        return toeplitz_matmat(self.coeffs, X, transpose=not self.structure.lower).to(self.dtype)

    def rmatmat(self, X: Tensor) -> Tensor:
        X = X.to(self.dtype)
        return toeplitz_matmat(self.coeffs, X, transpose=self.structure.lower).to(self.dtype)

    def matmul(self, other: ToeplitzMatrix) -> ToeplitzMatrix:
        self._check_same(other)
        # T(t) T(s) = T(T(t) s); transposes commute the same way
        # d-vectors: float64 keeps the FFT's norm-wise round-off off the small coefficients
        t, s = self.coeffs.double(), other.coeffs.double().unsqueeze(1)
        return self._like({"coeffs": toeplitz_matmat(t, s)[:, 0].to(self.dtype).contiguous()})

    def from_inner(self, X: Tensor | None = None) -> ToeplitzMatrix:
        t = self.coeffs
        if X is None:
            # c_k = sum_{u>=k} (d-u) t_u t_{u-k} = (T(t)^T w)_k with w_u = (d-u) t_u;
            # in float64 because c_k is divided by d-k (see gram_diagonal_sums)
            t = t.double()
            w = t * torch.arange(self.dim, 0, -1, dtype=t.dtype, device=t.device)
            c = toeplitz_matmat(t, w.unsqueeze(1), transpose=True)[:, 0]
        else:
            # S = K^T X: T(t)^T X for lower K, T(t) X for upper K
            c = gram_diagonal_sums(X.to(self.dtype), t, transpose=self.structure.lower)
        return self._like({"coeffs": _coefficients_from_diagonal_sums(c).to(self.dtype)})

    def diagonal(self) -> Tensor:
        return self.coeffs[:1].expand(self.dim).clone()

    def trace(self) -> Tensor:
        return self.coeffs[0] * self.dim

    def average_trace(self) -> Tensor:
        return self.coeffs[0].clone()

    def diag_add_(self, value: float | Tensor) -> ToeplitzMatrix:
        self.coeffs[:1].add_(value)
        return self

    def frobenius_norm(self) -> Tensor:
        # the k-th coefficient appears d-k times
        counts = torch.arange(self.dim, 0, -1, dtype=self.dtype, device=self.device)
        return torch.linalg.vector_norm(self.coeffs * counts.sqrt())


TriangularToeplitz.matrix_cls = ToeplitzMatrix
