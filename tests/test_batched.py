"""The multi-tensor forms (:mod:`singd.functional.batched`) equal the per-matrix forms."""

from __future__ import annotations

import itertools

import pytest
import torch

from singd.functional import FactorHyperparams, FactorState, natural_gradient, update_factors
from singd.functional.batched import DiagonalGroup, all_finite, commit_if_finite
from singd.structures import Diagonal, DiagonalMatrix, parse_structure

DIAG = Diagonal()
#: (d_K, d_C) of the layers of one batch: different sizes, one without bias
DIMS = [(5, 3), (9, 4), (4, 4)]
SHAPES = [torch.Size([3, 4]), torch.Size([4, 2, 2, 2]), torch.Size([4, 4])]
BIAS = [True, True, False]


def _diag(values: torch.Tensor) -> DiagonalMatrix:
    return DiagonalMatrix(DIAG, values.shape[0], {"diag": values})


def _states(momentum: bool, generator: torch.Generator) -> list[FactorState]:
    def rand(d: int, shift: float) -> torch.Tensor:
        return torch.rand(d, dtype=torch.float64, generator=generator) + shift

    states = []
    for d_K, d_C in DIMS:
        state = FactorState(K=_diag(rand(d_K, 0.5)), C=_diag(rand(d_C, 0.5)))
        if momentum:
            state.m_K, state.m_C = _diag(rand(d_K, -0.5)), _diag(rand(d_C, -0.5))
        states.append(state)
    return states


def _clone(states: list[FactorState]) -> list[FactorState]:
    return [
        FactorState(*(f.clone() if f is not None else None for f in (s.K, s.C, s.m_K, s.m_C)))
        for s in states
    ]


CASES = [
    dict(kfac_like=k, normalize_lr_cov=n, alpha1=a, raw=r, u=u)
    for k, n, a, r, u in itertools.product(
        (False, True), (False, True), (0.0, 0.5), (False, True), (1.0, 0.25)
    )
    if not (k and a)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_diagonal_refresh_equals_the_per_matrix_update(case: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    momentum = case["alpha1"] != 0
    states = _states(momentum, generator)
    hp = FactorHyperparams(
        lr_cov=0.3,
        damping=0.1,
        alpha1=case["alpha1"],
        kfac_like=case["kfac_like"],
        normalize_lr_cov=case["normalize_lr_cov"],
    )
    stats_K = [torch.rand(d, dtype=torch.float64, generator=generator) * 3 for d, _ in DIMS]
    stats_C = [torch.rand(d, dtype=torch.float64, generator=generator) * 3 for _, d in DIMS]
    expected = []
    for state, sK, sC in zip(_clone(states), stats_K, stats_C, strict=True):
        H_K = state.K.from_inner_diagonal(sK) if case["raw"] else _diag(sK)
        H_C = state.C.from_inner_diagonal(sC) if case["raw"] else _diag(sC)
        expected.append(update_factors(state, H_K, H_C, hp, case["u"]))
    batch = DiagonalGroup(DIMS, SHAPES, BIAS, torch.float64, torch.float64, torch.device("cpu"))
    flags = batch.refresh(
        states,
        [_diag(s.clone()) for s in stats_K],
        [_diag(s.clone()) for s in stats_C],
        hp,
        case["u"],
        raw=case["raw"],
    )
    assert flags.tolist() == [True] * len(DIMS)
    for got, want in zip(states, expected, strict=True):
        for name in ("K", "C", "m_K", "m_C"):
            g, w = getattr(got, name), getattr(want, name)
            assert (g is None) == (w is None) == (not momentum and name.startswith("m"))
            if w is not None:
                torch.testing.assert_close(g.diag, w.diag, rtol=1e-13, atol=1e-14)
    # the k², c² buffers hold the new factors' squares
    torch.testing.assert_close(batch.k2, torch.cat([s.K.diag for s in states]) ** 2)
    torch.testing.assert_close(batch.c2, torch.cat([s.C.diag for s in states]) ** 2)


def test_non_finite_layer_keeps_its_factors_and_the_others_refresh() -> None:
    generator = torch.Generator().manual_seed(1)
    states = _states(True, generator)
    before = _clone(states)
    hp = FactorHyperparams(0.1, 0.1, 0.5, kfac_like=False, normalize_lr_cov=False)
    H_K = [_diag(torch.rand(d, dtype=torch.float64, generator=generator)) for d, _ in DIMS]
    H_C = [_diag(torch.rand(d, dtype=torch.float64, generator=generator)) for _, d in DIMS]
    H_K[1].diag[2] = float("inf")  # layer 1: non-finite statistics
    batch = DiagonalGroup(DIMS, SHAPES, BIAS, torch.float64, torch.float64, torch.device("cpu"))
    flags = batch.refresh(states, H_K, H_C, hp)
    assert flags.tolist() == [True, False, True]
    for name in ("K", "C", "m_K", "m_C"):
        assert torch.equal(getattr(states[1], name).diag, getattr(before[1], name).diag)
        assert not torch.equal(getattr(states[0], name).diag, getattr(before[0], name).diag)


def test_commit_if_finite_chooses_on_the_device() -> None:
    structure = parse_structure("block_diagonal(2)")
    old = FactorState(K=structure.eye(3), C=structure.eye(2))
    new = FactorState(K=structure.eye(3).mul_(2.0), C=structure.eye(2).mul_(3.0))
    assert all_finite(new).item()
    kept = commit_if_finite(old, new, torch.tensor(False))
    taken = commit_if_finite(old, new, torch.tensor(True))
    assert torch.equal(kept.K.to_dense(), old.K.to_dense())
    assert torch.equal(taken.C.to_dense(), new.C.to_dense())
    new.C.tensors()["blocks"][0, 0, 0] = float("nan")
    assert not all_finite(new).item()


def test_diagonal_precondition_equals_the_natural_gradient() -> None:
    generator = torch.Generator().manual_seed(2)
    states = _states(False, generator)
    batch = DiagonalGroup(DIMS, SHAPES, BIAS, torch.float64, torch.float64, torch.device("cpu"))
    batch.load([s.K.diag for s in states], [s.C.diag for s in states])
    weights = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in SHAPES]
    biases = [torch.randn(d_C, dtype=torch.float64, generator=generator) for _, d_C in DIMS[:2]]
    got = batch.precondition(weights + biases)
    for i, (state, w) in enumerate(zip(states, weights, strict=True)):
        G = w.flatten(1)
        if BIAS[i]:
            G = torch.cat([G, biases[i].unsqueeze(1)], 1)
        want = natural_gradient(state.K, state.C, G)
        torch.testing.assert_close(got[i].flatten(1), want[:, : G.shape[1] - BIAS[i]])
        if BIAS[i]:
            torch.testing.assert_close(got[len(SHAPES) + i], want[:, -1])
