"""``from_inner`` and ``from_mat_inner`` never allocate a ``d × d`` matrix (except dense).

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every tensor every
ATen operation returns; the guard fails on any result whose *storage* holds half a
``d × d`` matrix or more. Storage (not shape) counts, so views of the inputs are free
and a flattened or batched ``d²`` buffer is caught as well. ``X`` has ``n = d/8``
columns, so the legitimate ``[d, n]``-sized intermediates stay far below the limit.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from singd.structures import Dense
from singd.structures.toeplitz import DIRECT_MAX_DIM, dense_gram_is_cheaper, fft_length
from tests.structures.cases import SPECS, generator, random_columns, random_structured

D = 512  # above every size threshold (Toeplitz: above DIRECT_MAX_DIM and n < d, so FFTs)
N = D // 8


class LargeAllocationGuard(TorchDispatchMode):
    """Records every op whose result storage holds at least ``limit`` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            # elements of the tensor's own dtype (a complex FFT buffer counts once per entry)
            if t.untyped_storage().nbytes() // t.element_size() >= self.limit:
                self.offenders.append(f"{func}: {tuple(t.shape)} {t.dtype}")
        return out


def _guarded(fn) -> list[str]:
    with LargeAllocationGuard(D * D // 2) as guard:
        fn()
    return guard.offenders


STRUCTURED = [spec for spec in SPECS if not isinstance(spec, Dense)]


def test_the_guard_catches_a_dense_gram():
    """Sanity check of the guard itself: dense from_inner forms ``d × d``."""
    K, _ = random_structured(Dense(), D, torch.float32, generator("guard"))
    X = random_columns(D, N, torch.float32, generator("guard-x"))
    assert _guarded(lambda: K.from_inner(X))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", STRUCTURED, ids=str)
def test_no_d_by_d_intermediate(spec, dtype):
    assert D > DIRECT_MAX_DIM
    gen = generator(str(spec), "memory")
    K, _ = random_structured(spec, D, dtype, gen)
    X = random_columns(D, N, dtype, gen)
    assert _guarded(lambda: K.from_inner(X)) == []
    assert _guarded(lambda: K.from_inner()) == []
    assert _guarded(lambda: spec.from_mat_inner(X)) == []
    assert _guarded(lambda: K.matmat(X)) == []
    assert _guarded(lambda: K.rmatmat(X)) == []


@pytest.mark.parametrize("d", [DIRECT_MAX_DIM + 1, 300, 1153])
def test_toeplitz_dense_route_needs_no_more_memory_than_its_input(d):
    """Above DIRECT_MAX_DIM the ``d × d`` route is taken only while ``d ≤ n`` (and then
    only where cheaper): with fewer columns than rows it is never taken."""
    for n in (1, d // 2, d - 1):
        assert not dense_gram_is_cheaper(d, n, fft_length(2 * d - 1))


def test_toeplitz_route_costs():
    """Many columns (a convolution's patch statistics): dense for small d (d² n against
    n·L·log L), FFTs for large d; few columns: FFTs."""
    assert dense_gram_is_cheaper(DIRECT_MAX_DIM + 1, 10**6, fft_length(2 * DIRECT_MAX_DIM + 1))
    assert not dense_gram_is_cheaper(1153, 10**6, fft_length(2 * 1153 - 1))
