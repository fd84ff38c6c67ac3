"""``singd.SINGD`` and ``singd.KFAC`` against the float64 oracle of ``tests/reference``.

Every case trains a copy of a small float64 model with the optimizer and another
copy with the oracle on the same batches, and after every step compares the
parameters, the heavy-ball buffers and the preconditioner state (K, C, m_K, m_C,
or S_K, S_C, P_K, P_C) at the float64 tolerance of ``tests/tolerances.py``.
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


PROBLEMS = {
    "mlp": Problem(mlp, (5,), (3,)),
    "seq": Problem(sequence, (4, 4), (4, 3)),
    "conv_strided": Problem(conv_strided, (2, 7, 7), (3,)),
    "conv_same": Problem(conv_same, (2, 5, 6), (3,)),
    "conv_modes": Problem(conv_modes, (2, 5, 4), (3,)),
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


def make_pair(problem: Problem) -> tuple[nn.Module, nn.Module]:
    """A float64 model and an identical copy for the oracle."""
    torch.manual_seed(0)
    model = problem.make().double()
    return model, copy.deepcopy(model)


def compare_params(
    model: nn.Module, ref: nn.Module, opt: torch.optim.Optimizer, oracle: Oracle
) -> None:
    """Parameters and heavy-ball buffers of ``model`` (optimizer) and ``ref`` (oracle)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p, ref_params[name], msg=f"parameter {name}")
        q = ref_params[name]
        if q in oracle.buf:
            assert_close(opt.state[p]["momentum_buffer"], oracle.buf[q], msg=f"buffer {name}")


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
    for X, Y in data:
        f = loss_fn(X, Y, loss_average)
        opt.zero_grad()
        f(model).backward()
        opt.step()
        oracle.step(f)
        compare_params(model, ref, opt, oracle)
        yield


#: Defaults of every case; a case overrides some of them.
BASE = {
    "lr": 0.05,
    "momentum": 0.9,
    "damping": 1e-2,
    "weight_decay": 1e-2,
    "lr_cov": 0.05,
    "alpha1": 0.5,
    "T": 1,
}


def _schedule(step: int) -> float:
    """A callable β₁ that changes every step (catches an off-by-one step index)."""
    return 0.02 * (1 + step)


# (id, problem, overrides of BASE and Hyper, input scale)
SINGD_CASES: list[tuple[str, str, dict[str, Any], float]] = [
    ("ikfac-mlp", "mlp", {"kfac_like": True, "alpha1": 0.0}, 1.0),
    ("ingd-mlp-a0", "mlp", {"alpha1": 0.0}, 1.0),
    ("ingd-mlp-T3", "mlp", {"T": 3}, 1.0),
    (
        "ikfac-mlp-T3-nomomentum-wd",
        "mlp",
        {"kfac_like": True, "alpha1": 0.0, "T": 3, "momentum": 0.0, "weight_decay": 0.1},
        1.0,
    ),
    ("ingd-seq-expand-batch+sequence", "seq", {"loss_average": "batch+sequence"}, 1.0),
    ("ingd-seq-reduce-batch", "seq", {"kfac_approx": "reduce"}, 1.0),
    # A summed loss over 12 positions makes H_C large: smaller β₁, β₂ keep β₁‖m‖ < 1.
    (
        "ikfac-seq-expand-sum",
        "seq",
        {"kfac_like": True, "alpha1": 0.0, "loss_average": None, "lr_cov": 5e-3, "lr": 0.01},
        1.0,
    ),
    (
        "ikfac-seq-reduce-batch+sequence",
        "seq",
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "kfac_approx": "reduce",
            "loss_average": "batch+sequence",
        },
        1.0,
    ),
    ("ingd-conv_strided-expand-T3", "conv_strided", {"T": 3}, 1.0),
    ("ingd-conv_strided-reduce", "conv_strided", {"kfac_approx": "reduce"}, 1.0),
    (
        "ikfac-conv_strided-expand-sum",
        "conv_strided",
        {"kfac_like": True, "alpha1": 0.0, "loss_average": None},
        1.0,
    ),
    ("ingd-conv_same-expand-batch+sequence", "conv_same", {"loss_average": "batch+sequence"}, 1.0),
    (
        "ikfac-conv_same-reduce",
        "conv_same",
        {"kfac_like": True, "alpha1": 0.0, "kfac_approx": "reduce"},
        1.0,
    ),
    ("ingd-mlp-normalize", "mlp", {"normalize_lr_cov": True, "lr_cov": 0.3}, 4.0),
    (
        "ikfac-seq-normalize",
        "seq",
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "normalize_lr_cov": True,
            "lr_cov": 0.3,
            "loss_average": None,
        },
        4.0,
    ),
    ("ingd-conv_modes-expand-T3", "conv_modes", {"T": 3}, 1.0),
    (
        "ikfac-conv_modes-reduce-sum",
        "conv_modes",
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "kfac_approx": "reduce",
            "loss_average": None,
            "lr": 0.01,
        },
        1.0,
    ),
    (
        "singd-conv_strided-diag-dense-expand",
        "conv_strided",
        {"structures": ("diagonal", "dense")},
        1.0,
    ),
    (
        "singd-conv_modes-diag-diag-batch+sequence",
        "conv_modes",
        {"structures": ("diagonal", "diagonal"), "loss_average": "batch+sequence"},
        1.0,
    ),
    # Structures beyond dense/diagonal (spec §3); K is non-symmetric after one step, so
    # Π̂(KᵀK) ≠ Π̂(KKᵀ) shows (spec §9 A1).
    (
        "singd-seq-block-block",
        "seq",
        {"structures": ("block_diagonal(2)", "block_diagonal(3)")},
        1.0,
    ),
    (
        "singd-mlp-hierarchical",
        "mlp",
        {"structures": ("hierarchical(2, 1)", "hierarchical(1, 2)")},
        1.0,
    ),
    (
        "ikfac-seq-toeplitz",
        "seq",
        {"kfac_like": True, "alpha1": 0.0, "structures": ("tril_toeplitz", "triu_toeplitz")},
        1.0,
    ),
    (
        "singd-mlp-rank-k-triangular",
        "mlp",
        {"structures": ("tril_top_left(2)", "triu_bottom_right(1)")},
        1.0,
    ),
    (
        "singd-seq-rank-k-triangular-normalize",
        "seq",
        {
            "structures": ("tril_bottom_right(1)", "triu_top_left(2)"),
            "normalize_lr_cov": True,
            "lr_cov": 0.3,
        },
        4.0,
    ),
    (
        "singd-conv_strided-block-hierarchical-T3",
        "conv_strided",
        {"structures": ("block_diagonal(4)", "hierarchical(1, 2)"), "T": 3},
        1.0,
    ),
    (
        "singd-conv_modes-toeplitz-reduce",
        "conv_modes",
        {"structures": ("triu_toeplitz", "tril_toeplitz"), "kfac_approx": "reduce"},
        1.0,
    ),
    ("ingd-conv_strided-callable-lr_cov-T2", "conv_strided", {"lr_cov": _schedule, "T": 2}, 1.0),
    ("singd-mlp-diag-dense", "mlp", {"structures": ("diagonal", "dense")}, 1.0),
    (
        "singd-conv_same-dense-diag",
        "conv_same",
        {"structures": ("dense", "diagonal"), "T": 3},
        1.0,
    ),
    (
        "singd-seq-diag-diag-normalize",
        "seq",
        {"structures": ("diagonal", "diagonal"), "normalize_lr_cov": True, "lr_cov": 0.3},
        4.0,
    ),
    (
        "ikfac-conv_strided-diag-diag",
        "conv_strided",
        {
            "kfac_like": True,
            "alpha1": 0.0,
            "structures": ("diagonal", "diagonal"),
            "kfac_approx": "reduce",
        },
        1.0,
    ),
]


@pytest.mark.parametrize(
    ("problem", "overrides", "scale"),
    [pytest.param(p, o, s, id=i) for i, p, o, s in SINGD_CASES],
)
def test_singd_matches_oracle(problem: str, overrides: dict[str, Any], scale: float) -> None:
    """Parameters, buffers and factors follow the oracle over ``STEPS`` steps."""
    hp = Hyper(**{**BASE, **overrides})
    prob = PROBLEMS[problem]
    model, ref = make_pair(prob)
    opt = SINGD(model, **{f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)})
    oracle = DenseSINGD(ref, hp)
    for _ in lockstep(model, ref, opt, oracle, batches(prob, STEPS, scale), hp.loss_average):
        for name in layers(ref):
            state = opt.factors(name)
            assert_close(state.K.to_dense(), oracle.K[name], msg=f"K of {name}")
            assert_close(state.C.to_dense(), oracle.C[name], msg=f"C of {name}")
            if hp.alpha1 != 0:
                assert_close(state.m_K.to_dense(), oracle.m_K[name], msg=f"m_K of {name}")
                assert_close(state.m_C.to_dense(), oracle.m_C[name], msg=f"m_C of {name}")
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
    for case_id, problem, overrides, scale in SINGD_CASES:
        if not overrides.get("normalize_lr_cov"):
            continue
        hp = Hyper(**{**BASE, **overrides})
        prob = PROBLEMS[problem]
        _, ref = make_pair(prob)
        oracle = DenseSINGD(ref, hp)
        X, Y = batches(prob, 1, scale)[0]
        oracle.step(loss_fn(X, Y, hp.loss_average))
        largest = max(m.abs().max().item() for m in [*oracle.m_K.values(), *oracle.m_C.values()])
        assert largest > 1.0, case_id


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


KFAC_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp-expand-T1", "mlp", {}),
    ("seq-reduce-T2-sum", "seq", {"kfac_approx": "reduce", "T": 2, "loss_average": None}),
    ("conv_strided-expand-callable-T2", "conv_strided", {"lr_cov": _schedule, "T": 2}),
    (
        "conv_same-reduce-batch+sequence-T3",
        "conv_same",
        {"kfac_approx": "reduce", "T": 3, "loss_average": "batch+sequence"},
    ),
]


@pytest.mark.parametrize(
    ("problem", "overrides"), [pytest.param(p, o, id=i) for i, p, o in KFAC_CASES]
)
def test_kfac_matches_oracle(problem: str, overrides: dict[str, Any]) -> None:
    """``singd.KFAC`` (float64 inverses) follows the dense KFAC oracle."""
    kwargs = {k: v for k, v in {**BASE, **overrides}.items() if k != "alpha1"}
    hp = Hyper(**kwargs)
    prob = PROBLEMS[problem]
    model, ref = make_pair(prob)
    opt = KFAC(model, inverse_dtype=F64, **kwargs)
    oracle = DenseKFAC(ref, hp)
    for _ in lockstep(model, ref, opt, oracle, batches(prob, STEPS), hp.loss_average):
        for name in layers(ref):
            state = opt.layer_state(name)
            S_K, S_C = oracle.S[name]
            P_K, P_C = oracle.P(name)
            for key, expected in (("S_K", S_K), ("S_C", S_C), ("P_K", P_K), ("P_C", P_C)):
                assert_close(state[key], expected, msg=f"{key} of {name}")


@pytest.mark.parametrize("d", [1, 4, 7])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_two_pattern_oracles_agree(spec: Structure, d: int) -> None:
    """Π̂ of the optimizer oracle (masks, Toeplitz diagonals averaged) equals Π̂ of the
    structure oracle (tie labels, scatter-mean), written independently from the spec."""
    S = random_symmetric(d, generator("pattern-oracles", str(spec), d))
    assert_close(project(S, str(spec)), structure_projection(spec, S))
