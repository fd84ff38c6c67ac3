"""The library on a CUDA device: structures, the optimizers' trajectories, float16 + GradScaler.

Skipped without a GPU (CI has none; the figures of the last run on one are in
``docs/mixed_precision.md``). The CPU suite tests every operation against a float64
oracle; here the same operations run with every tensor on the GPU and are compared with
that oracle, so a tensor created on the wrong device, a kernel PyTorch lacks on CUDA for
a dtype, or a CUDA-only numerical difference fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.structures import Structure, StructuredMatrix
from singd.structures.toeplitz import DIRECT_MAX_DIM, TriangularToeplitz
from tests.helpers import NET_HYPER as HYPER
from tests.helpers import data, net, params_of
from tests.structures.cases import (
    SPECS,
    assert_close_scaled,
    generator,
    random_columns,
    random_structured,
    random_symmetric,
    routes,
)
from tests.structures.dense_reference import project
from tests.tolerances import TOEPLITZ_FFT_FLOAT32, tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

CUDA = torch.device("cuda")

#: Small edge cases and sizes above every route threshold (Toeplitz's FFTs from 129 on).
DIMS = [1, 5, 30, 64, 300, 1153]


def on_cuda(M: StructuredMatrix) -> StructuredMatrix:
    return M.structure.from_tensors(M.dim, {k: v.to(CUDA) for k, v in M.tensors().items()})


def assert_on_cuda(*tensors: torch.Tensor) -> None:
    assert all(t.device.type == "cuda" for t in tensors)


CASES = [
    pytest.param(spec, d, dtype, route, id=f"{spec}-{d}-{str(dtype)[6:]}-{route}")
    for spec in SPECS
    for route in routes(spec)
    for d in DIMS
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize(("spec", "d", "dtype", "route"), CASES)
def test_structure_operations_on_cuda(
    spec: Structure, d: int, dtype: torch.dtype, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for setting in routes(spec)[route] or ():
        monkeypatch.setattr(*setting)
    gen = generator("cuda", str(spec), d, dtype)
    K_cpu, K_dense = random_structured(spec, d, dtype, gen)
    B_cpu, B_dense = random_structured(spec, d, dtype, gen)
    K, B = on_cuda(K_cpu), on_cuda(B_cpu)
    X = random_columns(d, 2 * d + 5, dtype, gen).to(CUDA)
    X_few = random_columns(d, 3, dtype, gen).to(CUDA)
    S = random_symmetric(d, gen)

    results = {
        "from_dense": (spec.from_dense(S.to(dtype).to(CUDA)).to_dense(), project(spec, S)),
        "to_dense": (K.to_dense(), K_dense),
        "matmul": ((K @ B).to_dense(), K_dense @ B_dense),
        "matmat": (K.matmat(X), K_dense @ X.cpu().double()),
        "rmatmat": (K.rmatmat(X), K_dense.T @ X.cpu().double()),
        "from_inner": (
            K.from_inner(X).to_dense(),
            project(spec, K_dense.T @ X.cpu().double() @ X.cpu().double().T @ K_dense),
        ),
        "from_inner_few": (
            K.from_inner(X_few).to_dense(),
            project(spec, K_dense.T @ X_few.cpu().double() @ X_few.cpu().double().T @ K_dense),
        ),
        "from_inner_KtK": (K.from_inner().to_dense(), project(spec, K_dense.T @ K_dense)),
        "from_mat_inner": (
            spec.from_mat_inner(X).to_dense(),
            project(spec, X.cpu().double() @ X.cpu().double().T),
        ),
        "diagonal": (K.diagonal(), K_dense.diagonal()),
        "trace": (K.trace(), K_dense.trace()),
        "frobenius": (K.frobenius_norm(), torch.linalg.matrix_norm(K_dense)),
        "infinity": (K.infinity_vector_norm(), K_dense.abs().max()),
        "diag_add": (K.clone().diag_add_(0.75).to_dense(), K_dense + 0.75 * torch.eye(d).double()),
        "eye": (spec.eye(d, dtype=dtype, device=CUDA).to_dense(), torch.eye(d).double()),
    }
    fft = isinstance(spec, TriangularToeplitz) and (d > DIRECT_MAX_DIM or route == "fft")
    fft_tol = TOEPLITZ_FFT_FLOAT32 if fft and dtype == torch.float32 else None
    for name, (actual, expected) in results.items():
        assert_on_cuda(actual)
        assert actual.dtype == dtype, name
        assert_close_scaled(actual.cpu(), expected, dtype, name, fft_tol)


# --- optimizers -----------------------------------------------------------------------------

#: Every structure class once (the CPU suite covers the sizes); KFAC and IKFAC besides.
OPTIMIZERS = [
    *[pytest.param(SINGD, {"structures": (spec, spec)}, id=f"singd-{spec}") for spec in SPECS],
    pytest.param(SINGD, {"kfac_like": True}, id="ikfac"),
    pytest.param(KFAC, {"inverse_dtype": torch.float64}, id="kfac"),
]


def train(
    optim_cls: type, kwargs: dict, device: str, dtype: torch.dtype, steps: int = 5
) -> list[torch.Tensor]:
    model = net(device, dtype)
    optim = optim_cls(model, **HYPER, **kwargs)
    for X, y in data(steps, device):
        optim.zero_grad()
        nn.functional.cross_entropy(model(X.to(dtype)), y).backward()
        optim.step()
    return params_of(model)


@pytest.mark.parametrize(("optim_cls", "kwargs"), OPTIMIZERS)
def test_cuda_trajectory_matches_cpu_in_float64(optim_cls: type, kwargs: dict) -> None:
    """Same float64 trajectory on the GPU as on the CPU (cuDNN vs oneDNN round-off only)."""
    on_gpu = train(optim_cls, kwargs, "cuda", torch.float64)
    on_cpu = train(optim_cls, kwargs, "cpu", torch.float64)
    for p, q in zip(on_gpu, on_cpu, strict=True):
        assert p.device.type == "cuda"
        torch.testing.assert_close(p.cpu(), q, **tolerance(torch.float64))


def test_float16_autocast_with_grad_scaler_tracks_float32_and_skips_inf_steps() -> None:
    """The usual CUDA recipe: fp16 autocast, GradScaler; an inf batch is skipped."""
    batches = data(6, "cuda")
    model = net("cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    optim = SINGD(model, grad_scaler=scaler, **HYPER)
    poisoned = (batches[2][0].clone(), batches[2][1])
    poisoned[0][0, 0, 0, 0] = float("inf")
    for i, (X, y) in enumerate([*batches[:2], poisoned, *batches[2:]]):
        optim.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(X), y)
        scaler.scale(loss).backward()
        if i == 2:
            before = params_of(model)
            with pytest.warns(UserWarning, match="Step 2 skipped"):
                scaler.step(optim)
            assert all(torch.equal(p, q) for p, q in zip(before, params_of(model), strict=True))
        else:
            scaler.step(optim)
        scaler.update()
    assert optim.steps == len(batches)
    assert optim.factors("3").K.dtype == torch.float32
    reference = train(SINGD, {}, "cuda", torch.float32, steps=6)
    for p, q in zip(params_of(model), reference, strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float16))
