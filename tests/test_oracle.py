"""``singd.SINGD`` and ``singd.KFAC`` against the float64 oracle of ``tests/reference``.

Every case (the ``oracle`` suite of ``tests/cases.py``) trains a copy of a small
float64 model with the optimizer and another copy with the oracle on the same batches,
and after every step compares the parameters, the heavy-ball buffers and the
preconditioner state (K, C, m_K, m_C, or S_K, S_C, P_K, P_C) at the float64 tolerance
of ``tests/tolerances.py``. The optimizer runs on every device of ``tests/conftest.py``
(the oracle on the CPU), so a GPU runs the same trajectories: a tensor created on the
wrong device or a CUDA-only numerical difference fails.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from singd import KFAC, SINGD
from singd.structures import Structure
from tests.cases import OPTIMIZER_CASES, OptimizerCase, cases
from tests.reference.dense_singd import DenseKFAC, DenseSINGD, Hyper, Oracle, layers, project
from tests.structures.cases import SPECS, generator, random_symmetric
from tests.structures.dense_reference import project as structure_projection
from tests.tolerances import assert_close

STEPS = 6
F64 = torch.float64

# torch's own note about the zero-padded copy it makes for even kernels with "same".
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model factory and the per-sample shapes of its inputs and targets."""

    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    target_shape: tuple[int, ...]


def mlp() -> nn.Module:
    """Linear (bias) → Tanh → Linear (no bias)."""
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))


def mlp_repeated() -> nn.Module:
    """Linear → three equal Linear (one without bias) → Linear, Tanh between: the equal
    layers are refreshed and preconditioned as one stack
    (:mod:`singd.preconditioners.stacked`; as one batch when diagonal)."""
    return nn.Sequential(
        nn.Linear(5, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 3, bias=False),
    )


def sequence() -> nn.Module:
    """Linear layers applied to every position of ``[B, S, d]``."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def conv_strided() -> nn.Module:
    """Stride + int padding; then grouped, dilated, tuple-padded conv without bias."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, (2, 3), padding=(1, 0), dilation=(2, 1), groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 2, 3),
    )


def conv_same() -> nn.Module:
    """Even kernel with ``"same"`` (asymmetric padding), then ``"valid"``, then pooling."""
    return nn.Sequential(
        nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(1, 2)),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding="valid", bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def conv_modes() -> nn.Module:
    """Reflect padding, then circular ``"same"`` padding with an even kernel width."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(3, 2, (3, 2), padding="same", padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(2 * 5 * 4, 3),
    )


def conv_repeated() -> nn.Module:
    """Three equal convolutions (their statistics are formed together), and two whose
    inputs and output gradients have their shapes but whose padding mode or padding and
    dilation differ, between the second and the third."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=2, dilation=2),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 3),
    )


PROBLEMS = {
    "mlp": Problem(mlp, (5,), (3,)),
    "mlp_repeated": Problem(mlp_repeated, (5,), (3,)),
    "seq": Problem(sequence, (4, 4), (4, 3)),
    "conv_strided": Problem(conv_strided, (2, 7, 7), (3,)),
    "conv_same": Problem(conv_same, (2, 5, 6), (3,)),
    "conv_modes": Problem(conv_modes, (2, 5, 4), (3,)),
    "conv_repeated": Problem(conv_repeated, (2, 5, 5), (3,)),
}


def batches(problem: Problem, n: int, scale: float = 1.0) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed random (input, target) pairs of batch size 3."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        X = scale * torch.randn(3, *problem.input_shape, generator=gen, dtype=F64)
        Y = torch.randn(3, *problem.target_shape, generator=gen, dtype=F64)
        out.append((X, Y))
    return out


def loss_fn(X: Tensor, Y: Tensor, loss_average: str | None) -> Callable[[nn.Module], Tensor]:
    """Squared error reduced as ``loss_average`` says (sum, mean over batch / all terms)."""

    def f(model: nn.Module) -> Tensor:
        out = model(X)
        terms = ((out - Y) ** 2).sum(-1)  # one loss term per (sample, position)
        divisor = {None: 1, "batch": out.shape[0], "batch+sequence": terms.numel()}
        return terms.sum() / divisor[loss_average]

    return f


def make_pair(problem: Problem, device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Module]:
    """A float64 model on ``device`` and an identical copy on the CPU for the oracle."""
    torch.manual_seed(0)
    ref = problem.make().double()
    return copy.deepcopy(ref).to(device), ref


def compare_params(
    model: nn.Module, ref: nn.Module, opt: torch.optim.Optimizer, oracle: Oracle
) -> None:
    """Parameters and heavy-ball buffers of ``model`` (optimizer) and ``ref`` (oracle)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.cpu(), ref_params[name], msg=f"parameter {name}")
        q = ref_params[name]
        if q in oracle.buf:
            buf = opt.state[p]["momentum_buffer"]
            assert_close(buf.cpu(), oracle.buf[q], msg=f"buffer {name}")


def dense(M: Any) -> Tensor:
    """A factor (structured or a tensor) as a dense CPU tensor."""
    return (M.to_dense() if hasattr(M, "to_dense") else M).cpu()


def lockstep(
    model: nn.Module,
    ref: nn.Module,
    opt: torch.optim.Optimizer,
    oracle: Oracle,
    data: Sequence[tuple[Tensor, Tensor]],
    loss_average: str | None,
) -> Iterator[None]:
    """One optimizer step and one oracle step per batch; parameters and buffers are
    compared after each, then control returns to the caller for further checks."""
    device = next(model.parameters()).device
    for X, Y in data:
        opt.zero_grad()
        loss_fn(X.to(device), Y.to(device), loss_average)(model).backward()
        opt.step()
        oracle.step(loss_fn(X, Y, loss_average))
        compare_params(model, ref, opt, oracle)
        yield


#: Hyper-parameters every oracle case starts from (the case overrides some of them).
BASE = {
    "lr": 0.05,
    "momentum": 0.9,
    "damping": 1e-2,
    "weight_decay": 1e-2,
    "lr_cov": 0.05,
    "alpha1": 0.5,
    "T": 1,
}


@pytest.mark.parametrize("case", cases("oracle", SINGD))
def test_singd_matches_oracle(case: OptimizerCase, device: torch.device) -> None:
    """Parameters, buffers and factors follow the oracle over ``STEPS`` steps."""
    hp = Hyper(**{**BASE, **case.kwargs})
    assert case.problem is not None
    prob = PROBLEMS[case.problem]
    model, ref = make_pair(prob, device)
    opt = SINGD(model, **{f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)})
    oracle = DenseSINGD(ref, hp)
    data = batches(prob, STEPS, case.scale)
    for _ in lockstep(model, ref, opt, oracle, data, hp.loss_average):
        for name in layers(ref):
            state = opt.factors(name)
            assert state.K.device.type == device.type
            assert_close(dense(state.K), oracle.K[name], msg=f"K of {name}")
            assert_close(dense(state.C), oracle.C[name], msg=f"C of {name}")
            if hp.alpha1 != 0:
                assert_close(dense(state.m_K), oracle.m_K[name], msg=f"m_K of {name}")
                assert_close(dense(state.m_C), oracle.m_C[name], msg=f"m_C of {name}")
            else:
                assert state.m_K is None and state.m_C is None
    assert opt.steps == STEPS


@pytest.mark.parametrize("kfac_like", [True, False], ids=["ikfac", "ingd"])
def test_oracle_fixed_point(kfac_like: bool) -> None:
    """Self-check of the oracle against the fixed points stated in spec §1.3/§1.4.

    IKFAC: m_K = 0 iff K Kᵀ = (U + λI)⁻¹. INGD: m_K = 0 iff
    K Kᵀ = (Tr̄(H_C)·U + λ Tr̄(CᵀC)·I)⁻¹. There the refresh leaves K unchanged.
    """
    gen = torch.Generator().manual_seed(0)
    A, Gm = torch.randn(7, 4, generator=gen, dtype=F64), torch.randn(7, 3, generator=gen, dtype=F64)
    U, G = A.T @ A, Gm.T @ Gm
    hp = Hyper(kfac_like=kfac_like, damping=0.1, lr_cov=0.3)
    oracle = DenseSINGD(nn.Linear(4, 3, bias=False).double(), hp)
    C = torch.eye(3, dtype=F64) + 0.1 * torch.randn(3, 3, generator=gen, dtype=F64)
    if kfac_like:
        target = U + hp.damping * torch.eye(4, dtype=F64)
    else:
        tr_H_C = torch.trace(C.T @ G @ C) / 3
        target = tr_H_C * U + hp.damping * torch.trace(C.T @ C) / 3 * torch.eye(4, dtype=F64)
    K = torch.linalg.cholesky(torch.linalg.inv(target))
    oracle.K[""], oracle.C[""] = K, C
    oracle.refresh("", U, G)
    assert_close(oracle.K[""], K)
    assert_close(oracle.m_K[""], torch.zeros_like(K))


def test_normalize_lr_cov_cases_normalize() -> None:
    """The ``normalize`` cases above really have ‖m‖_∞ > 1 (else they test nothing new)."""
    normalized = [
        c for c in OPTIMIZER_CASES if "oracle" in c.supports and c.kwargs.get("normalize_lr_cov")
    ]
    assert normalized
    for case in normalized:
        hp = Hyper(**{**BASE, **case.kwargs})
        assert case.problem is not None
        prob = PROBLEMS[case.problem]
        _, ref = make_pair(prob)
        oracle = DenseSINGD(ref, hp)
        X, Y = batches(prob, 1, case.scale)[0]
        oracle.step(loss_fn(X, Y, hp.loss_average))
        largest = max(m.abs().max().item() for m in [*oracle.m_K.values(), *oracle.m_C.values()])
        assert largest > 1.0, case.id


def test_kfac_like_forces_alpha1_zero() -> None:
    """``kfac_like=True`` with α₁ ≠ 0 warns and runs IKFAC (α₁ = 0), as the oracle."""
    prob = PROBLEMS["mlp"]
    model, ref = make_pair(prob)
    with pytest.warns(UserWarning, match="alpha1"):
        opt = SINGD(model, kfac_like=True, alpha1=0.5, lr=0.05, lr_cov=0.05, damping=1e-2, T=1)
    oracle = DenseSINGD(ref, Hyper(kfac_like=True, lr=0.05, lr_cov=0.05, damping=1e-2,
                                   momentum=0.9))  # fmt: skip
    for _ in lockstep(model, ref, opt, oracle, batches(prob, 3), "batch"):
        pass
    assert all(opt.factors(n).m_K is None for n in layers(ref))


def _optimizer_and_oracle(
    kind: str, model: nn.Module, ref: nn.Module, **overrides: Any
) -> tuple[torch.optim.Optimizer, Oracle]:
    """``"ingd"``, ``"ikfac"`` or ``"kfac"`` on ``model`` and its oracle on ``ref``."""
    kwargs = {**BASE, **overrides}
    if kind == "kfac":
        kwargs.pop("alpha1")
        init = kwargs.pop("init_grad_scale", 1.0)
        hp = Hyper(**kwargs)
        return KFAC(model, inverse_dtype=F64, init_grad_scale=init, **kwargs), DenseKFAC(ref, hp)
    if kind == "ikfac":
        kwargs.update(kfac_like=True, alpha1=0.0)
    init = kwargs.pop("init_grad_scale", 1.0)
    hp = Hyper(**kwargs)
    return SINGD(model, init_grad_scale=init, **kwargs), DenseSINGD(ref, hp)


@pytest.mark.parametrize("kind", ["ingd", "ikfac", "kfac"])
def test_micro_batches_match_oracle(kind: str) -> None:
    """Two backward passes per step: gradients and statistics add up (spec §1.6, step 7)."""
    prob = PROBLEMS["conv_strided"]
    model, ref = make_pair(prob)
    opt, oracle = _optimizer_and_oracle(kind, model, ref, T=2)
    data = batches(prob, 2 * STEPS)
    for (X1, Y1), (X2, Y2) in zip(data[::2], data[1::2], strict=True):
        f1, f2 = loss_fn(X1, Y1, "batch"), loss_fn(X2, Y2, "batch")
        opt.zero_grad()
        f1(model).backward()
        f2(model).backward()
        opt.step()
        oracle.step(f1, f2)
        compare_params(model, ref, opt, oracle)


@pytest.mark.parametrize("kind", ["ingd", "ikfac", "kfac"])
def test_grad_scale_matches_unscaled_oracle(kind: str) -> None:
    """A loss scaled by a changing s_t trains exactly as the unscaled oracle.

    GradScaler protocol through ``set_current_grad_scale`` (spec §1.6, §5): H_C is
    un-scaled by u = s_{t-1}/s_t², the gradient by 1/s_t. Powers of two keep the
    scaling exact.
    """
    scales = [2.0**k for k in (10, 3, 16, 0, 7, 12)]
    prob = PROBLEMS["mlp"]
    model, ref = make_pair(prob)
    opt, oracle = _optimizer_and_oracle(kind, model, ref, init_grad_scale=scales[0])
    for (X, Y), s in zip(batches(prob, STEPS), scales, strict=True):
        f = loss_fn(X, Y, "batch")
        opt.zero_grad()
        (s * f(model)).backward()
        opt.set_current_grad_scale(s)
        opt.step()
        oracle.step(f)
        compare_params(model, ref, opt, oracle)


@pytest.mark.parametrize("case", cases("oracle", KFAC))
def test_kfac_matches_oracle(case: OptimizerCase, device: torch.device) -> None:
    """``singd.KFAC`` (float64 inverses) follows the dense KFAC oracle."""
    kwargs = {k: v for k, v in {**BASE, **case.kwargs}.items() if k != "alpha1"}
    hp = Hyper(**kwargs)
    assert case.problem is not None
    prob = PROBLEMS[case.problem]
    model, ref = make_pair(prob, device)
    opt = KFAC(model, inverse_dtype=F64, **kwargs)
    oracle = DenseKFAC(ref, hp)
    for _ in lockstep(model, ref, opt, oracle, batches(prob, STEPS), hp.loss_average):
        for name in layers(ref):
            state = opt.layer_state(name)
            S_K, S_C = oracle.S[name]
            P_K, P_C = oracle.P(name)
            for key, expected in (("S_K", S_K), ("S_C", S_C), ("P_K", P_K), ("P_C", P_C)):
                assert state[key].device.type == device.type
                assert_close(state[key].cpu(), expected, msg=f"{key} of {name}")


@pytest.mark.parametrize("d", [1, 4, 7])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_two_pattern_oracles_agree(spec: Structure, d: int) -> None:
    """Π̂ of the optimizer oracle (masks, Toeplitz diagonals averaged) equals Π̂ of the
    structure oracle (tie labels, scatter-mean), written independently from the spec."""
    S = random_symmetric(d, generator("pattern-oracles", str(spec), d))
    assert_close(project(S, str(spec)), structure_projection(spec, S))


def test_the_case_table_names_exactly_these_problems() -> None:
    from tests.cases import ORACLE_PROBLEMS

    assert set(PROBLEMS) == ORACLE_PROBLEMS
