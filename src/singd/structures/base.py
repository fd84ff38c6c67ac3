r"""The structured-matrix interface that SINGD's Kronecker factors live in.

SINGD keeps each Kronecker factor :math:`K` (and its Riemannian momentum :math:`m_K`)
in a *structured* set :math:`\hat{\mathcal{L}}`: a matrix group, closed under
multiplication and containing :math:`I`, whose Lie algebra has the same sparsity
pattern. The update :math:`K \leftarrow K (I - \beta_1 m_K)` then never leaves the
group (paper §3; spec §3.1).

Two objects describe one structure:

* a :class:`Structure` — a small frozen dataclass *spec* (e.g. ``BlockDiagonal(30)``)
  that names the pattern and its sizes and builds matrices (``eye``, ``zeros``,
  the projection ``from_dense`` = :math:`\hat\Pi`, ``from_mat_inner``);
* a :class:`StructuredMatrix` — one :math:`d\times d` value of that structure,
  stored as a few named tensors, with the operations SINGD needs.

Projection convention (spec §3.3). For a **symmetric** ``S``, each free parameter
:math:`\theta_p` of the pattern, tied to the positions :math:`T_p`, is

.. math::
    \theta_p = \operatorname{mean}_{(i,j)\in T_p}
        \bigl(S_{ij} + [i\neq j \wedge (j,i)\notin P]\, S_{ji}\bigr),

i.e. an off-diagonal entry whose mirror is not free absorbs the mirror's value, and
tied entries are averaged. With this convention :math:`\hat\Pi` is linear,
idempotent on the structure, keeps the trace, and :math:`\hat\Pi(I) = I`.

Only operations that are exact in the structure are required from a subclass;
everything with a generic form (``add_``, ``mul_``, norms, ``average_trace``) is
written once here, on top of :meth:`StructuredMatrix.tensors`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from singd.structures._linalg import tracing

SelfMatrix = TypeVar("SelfMatrix", bound="StructuredMatrix")


class NaiveImplementationWarning(UserWarning):
    """Raised when a structure falls back to a dense O(d²) implementation."""


def check_size(name: str, value: object, minimum: int) -> None:
    """Validate an integer size argument of a structure spec.

    Raises:
        TypeError: If ``value`` is not an ``int`` (``bool`` is rejected too).
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")


@dataclasses.dataclass(frozen=True)
class Structure(ABC):
    """Spec of a structured matrix group: the pattern, its sizes, and factories.

    Subclasses are frozen dataclasses whose fields are the structure's sizes (for
    example the block size of a block-diagonal matrix), so two equal specs describe
    the same set of matrices. ``str(spec)`` is the canonical name that
    :func:`singd.structures.parse_structure` reads back.
    """

    #: Registry name, e.g. ``"block_diagonal"``; set by subclasses.
    name: ClassVar[str]
    #: The matrix class this spec builds.
    matrix_cls: ClassVar[type[StructuredMatrix]]

    def __str__(self) -> str:
        args = ", ".join(str(getattr(self, f.name)) for f in dataclasses.fields(self))
        return f"{self.name}({args})" if args else self.name

    # --- factories ---------------------------------------------------------------
    @abstractmethod
    def from_dense(self, sym: Tensor) -> StructuredMatrix:
        r"""Project a dense symmetric matrix onto the structure: :math:`\hat\Pi(S)`.

        Args:
            sym: Symmetric ``[d, d]`` matrix. Symmetry is not checked.

        Returns:
            The structured projection (rule of the module docstring).
        """

    def from_mat_inner(self, X: Tensor) -> StructuredMatrix:
        r""":math:`\hat\Pi(X X^\top)` for ``X`` of shape ``[d, n]``.

        The default forms the dense ``d×d`` product; structures override it to
        work in their own storage (e.g. row sums of squares for a diagonal).
        """
        return self.from_dense(X @ X.T)

    @abstractmethod
    def zeros(
        self,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StructuredMatrix:
        """The structured zero matrix of size ``dim``."""

    def eye(
        self,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> StructuredMatrix:
        """The structured identity of size ``dim``."""
        return self.zeros(dim, dtype=dtype, device=device).diag_add_(1.0)

    def from_tensors(self, dim: int, tensors: Mapping[str, Tensor]) -> StructuredMatrix:
        """Rebuild a matrix from the tensors returned by :meth:`StructuredMatrix.tensors`."""
        template = self.zeros(dim, dtype=next(iter(tensors.values())).dtype)
        expected = {k: v.shape for k, v in template.tensors().items()}
        got = {k: v.shape for k, v in tensors.items()}
        if expected != got:
            raise ValueError(
                f"Tensors {got} do not describe a {self} matrix of size {dim} "
                f"(expected {expected})."
            )
        return self.matrix_cls(self, dim, {k: v for k, v in tensors.items()})

    def num_stored(self, dim: int) -> int:
        """Number of stored scalars of a ``dim × dim`` matrix of this structure."""
        return sum(t.numel() for t in self.zeros(dim, device="meta").tensors().values())


class StructuredMatrix(ABC):
    r"""A :math:`d \times d` matrix in a structured group, stored as named tensors.

    Values follow *value semantics*: operations return new matrices, except the ones
    whose name ends in ``_`` (``add_``, ``mul_``, ``diag_add_``), which modify the
    stored tensors in place and return ``self``.

    Args:
        structure: The spec this matrix belongs to.
        dim: The size :math:`d`.
        tensors: Stored tensors by name (contiguous; all of one dtype and device).
    """

    #: True when :math:`\hat\Pi(M^\top X X^\top M)` depends on ``X`` only through
    #: :math:`\operatorname{diag}(X X^\top)` (a diagonal M): callers may then pass that
    #: diagonal to :meth:`from_inner_diagonal` without ever forming ``X``.
    inner_needs_only_diagonal: ClassVar[bool] = False

    def from_inner_diagonal(self: SelfMatrix, diag: Tensor) -> SelfMatrix:
        r""":math:`\hat\Pi(M^\top D M)` with :math:`D = \operatorname{diag}(v)`, ``diag`` = v.

        Only for structures with :attr:`inner_needs_only_diagonal`.
        """
        raise NotImplementedError(
            f"{self.structure} needs the full X for from_inner (inner_needs_only_diagonal=False)."
        )

    def __init__(self, structure: Structure, dim: int, tensors: dict[str, Tensor]) -> None:
        self.structure = structure
        self.dim = dim
        self._tensors = tensors

    # --- storage ------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (the live tensors, not copies)."""
        return self._tensors

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored tensors."""
        return next(iter(self._tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        """Device of the stored tensors."""
        return next(iter(self._tensors.values())).device

    @property
    def shape(self) -> torch.Size:
        """``(d, d)``."""
        return torch.Size((self.dim, self.dim))

    def _like(self: SelfMatrix, tensors: dict[str, Tensor]) -> SelfMatrix:
        return type(self)(self.structure, self.dim, tensors)

    def clone(self: SelfMatrix) -> SelfMatrix:
        """A deep copy."""
        return self._like({k: v.clone() for k, v in self._tensors.items()})

    def to(self: SelfMatrix, dtype: torch.dtype) -> SelfMatrix:
        """A copy in another dtype (``self`` if it already has it)."""
        if dtype == self.dtype:
            return self
        return self._like({k: v.to(dtype) for k, v in self._tensors.items()})

    def numel(self) -> int:
        """Number of stored scalars."""
        return sum(t.numel() for t in self._tensors.values())

    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    # --- the structure-specific operations ----------------------------------------
    @abstractmethod
    def to_dense(self) -> Tensor:
        """The represented ``[d, d]`` matrix."""

    @abstractmethod
    def matmat(self, X: Tensor) -> Tensor:
        r""":math:`M X` for a dense ``X`` of shape ``[d, n]``."""

    @abstractmethod
    def rmatmat(self, X: Tensor) -> Tensor:
        r""":math:`M^\top X` for a dense ``X`` of shape ``[d, n]``."""

    @abstractmethod
    def matmul(self: SelfMatrix, other: SelfMatrix) -> SelfMatrix:
        r"""The structured product :math:`M N` (closure: it stays in the structure).

        A new matrix that shares no storage with ``self`` or ``other``: the factor
        update writes :math:`K - \beta_1 K m` into it in place.
        """

    @abstractmethod
    def from_inner(self: SelfMatrix, X: Tensor | None = None) -> SelfMatrix:
        r""":math:`\hat\Pi(M^\top X X^\top M)`, or :math:`\hat\Pi(M^\top M)` if ``X`` is None.

        ``X`` has shape ``[d, n]``. SINGD calls it with :math:`X = A^\top` to get
        :math:`H_K = \hat\Pi(K^\top A^\top A K)` without forming :math:`A^\top A`.
        """

    @abstractmethod
    def diagonal(self) -> Tensor:
        """The main diagonal as a ``[d]`` tensor (a new tensor)."""

    @abstractmethod
    def diag_add_(self: SelfMatrix, value: float | Tensor) -> SelfMatrix:
        r"""In place :math:`M \leftarrow M + v I`; returns ``self``."""

    # --- generic operations -------------------------------------------------------
    def trace(self) -> Tensor:
        """:math:`\\operatorname{Tr}(M)`."""
        return self.diagonal().sum()

    def average_trace(self) -> Tensor:
        r""":math:`\overline{\operatorname{Tr}}(M) = \operatorname{Tr}(M)/d`.

        Divides before summing so that half-precision sums of large diagonals do
        not overflow (spec §1.7).
        """
        return (self.diagonal() / self.dim).sum()

    def _check_same(self, other: StructuredMatrix) -> None:
        if other.structure != self.structure or other.dim != self.dim:
            raise ValueError(
                f"Cannot combine a {self.structure} matrix of size {self.dim} with a "
                f"{other.structure} matrix of size {other.dim}."
            )

    def add_(self: SelfMatrix, other: StructuredMatrix, alpha: float | Tensor = 1.0) -> SelfMatrix:
        r"""In place :math:`M \leftarrow M + \alpha N`; returns ``self``.

        ``alpha`` may be a device scalar (a 0-d tensor): then each stored tensor gets
        one fused ``addcmul_``, and nothing is read back to the host.
        """
        self._check_same(other)
        theirs = other.tensors()
        mine = self._multi_tensor()
        if mine is not None:
            others = [theirs[name].to(t.dtype) for name, t in self._tensors.items()]
            if isinstance(alpha, Tensor):  # (the same fused addcmul_ per tensor)
                torch._foreach_addcmul_(mine, others, [alpha.to(mine[0].dtype)] * len(mine))
            else:
                torch._foreach_add_(mine, others, alpha=alpha)
            return self
        for name, t in self._tensors.items():
            if isinstance(alpha, Tensor) and tracing():  # (vmap: addcmul_ has no rule)
                t.add_(theirs[name].to(t.dtype) * alpha.to(t.dtype))
            elif isinstance(alpha, Tensor):  # a device scalar: one fused operation, no sync
                t.addcmul_(theirs[name].to(t.dtype), alpha.to(t.dtype))
            else:
                t.add_(theirs[name].to(t.dtype), alpha=alpha)
        return self

    def mul_(self: SelfMatrix, scalar: float | Tensor) -> SelfMatrix:
        r"""In place :math:`M \leftarrow s M`; returns ``self``."""
        mine = self._multi_tensor()
        if mine is not None:
            torch._foreach_mul_(mine, scalar)
            return self
        for t in self._tensors.values():
            t.mul_(scalar)
        return self

    def _multi_tensor(self) -> list[Tensor] | None:
        """The stored tensors for one multi-tensor (``torch._foreach_*``) operation, the same
        arithmetic per tensor in one dispatch instead of one per tensor (hierarchical
        factors store five: a refresh makes about fifteen such calls per factor); None
        for a single tensor, and under ``torch.compile`` or ``vmap`` (no batching rules
        for the multi-tensor operations)."""
        if len(self._tensors) < 2 or tracing():
            return None
        return list(self._tensors.values())

    def __add__(self: SelfMatrix, other: StructuredMatrix) -> SelfMatrix:
        return self.clone().add_(other)

    def __sub__(self: SelfMatrix, other: StructuredMatrix) -> SelfMatrix:
        return self.clone().add_(other, alpha=-1.0)

    def __mul__(self: SelfMatrix, scalar: float | Tensor) -> SelfMatrix:
        return self._like({k: v * scalar for k, v in self._tensors.items()})

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, StructuredMatrix):
            return self.matmul(other)
        return self.matmat(other)

    def infinity_vector_norm(self) -> Tensor:
        """Largest absolute stored entry, :math:`\\max_{ij} |M_{ij}|` (not an induced norm)."""
        return torch.stack([t.abs().max() for t in self._tensors.values() if t.numel() > 0]).max()

    def frobenius_norm(self) -> Tensor:
        r""":math:`\|M\|_F`. Dense by default: structures with tied entries override it."""
        return torch.linalg.matrix_norm(self.to_dense())

    def _stored_frobenius_norm(self) -> Tensor:
        r"""Euclidean norm of all stored values: :math:`\|M\|_F` when each stored value
        is exactly one entry of :math:`M` (no ties), as for every pattern without
        Toeplitz-like sharing."""
        norms = [torch.linalg.vector_norm(t) for t in self._tensors.values()]
        return torch.linalg.vector_norm(torch.stack(norms))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.structure}, dim={self.dim}, dtype={self.dtype})"
