"""The structured-matrix contract, for every registered structure, against a dense oracle.

One suite: each case is (spec, d, dtype) from :mod:`tests.structures.cases`; every
operation is compared with its dense float64 value on the same (rounded) inputs,
projected by :mod:`tests.structures.dense_reference` where the result is structured.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from singd.structures import (
    NaiveImplementationWarning,
    TrilToeplitz,
    TriuToeplitz,
    available_structures,
    parse_structure,
    toeplitz,
)
from singd.structures.registry import _STRUCTURES
from singd.structures.toeplitz import DIRECT_MAX_DIM, TriangularToeplitz
from tests.structures.cases import (
    DIMS,
    DTYPES,
    SPECS,
    assert_close_scaled,
    check_stored,
    generator,
    random_columns,
    random_structured,
    random_symmetric,
    routes,
)
from tests.structures.dense_reference import PATTERNS, project
from tests.tolerances import TOEPLITZ_FFT_FLOAT32

CASES = [
    (spec, d, dtype, route)
    for spec, d, dtype in itertools.product(SPECS, DIMS, DTYPES)
    for route in routes(spec)
]


def _case_id(case) -> str:
    spec, d, dtype, route = case
    suffix = "" if route == "default" else f"-{route}"
    return f"{spec}-d{d}-{str(dtype).removeprefix('torch.')}{suffix}"


@pytest.fixture(params=CASES, ids=[_case_id(c) for c in CASES])
def case(request, monkeypatch):
    spec, d, dtype, route = request.param
    for setting in routes(spec)[route] or ():
        monkeypatch.setattr(*setting)
    return spec, d, dtype, generator(str(spec), d, dtype)


def test_from_dense_is_the_projection(case):
    spec, d, dtype, gen = case
    S = random_symmetric(d, gen).to(dtype)
    M = spec.from_dense(S)
    check_stored(M, spec, d, dtype)
    assert_close_scaled(M.to_dense(), project(spec, S.double()), dtype)


def test_from_dense_is_identity_on_the_structure_and_to_dense_roundtrips(case):
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    check_stored(K, spec, d, dtype)
    assert_close_scaled(K.to_dense(), K_dense, dtype)
    assert_close_scaled(spec.from_dense(K.to_dense()).to_dense(), K_dense, dtype)


def test_matmul_is_closed(case):
    spec, d, dtype, gen = case
    A, A_dense = random_structured(spec, d, dtype, gen)
    B, B_dense = random_structured(spec, d, dtype, gen)
    AB = A @ B
    check_stored(AB, spec, d, dtype)
    product = AB.to_dense().double()
    assert_close_scaled(product, A_dense @ B_dense, dtype)
    # in the structure: the projection (identity on the pattern) keeps it
    assert_close_scaled(project(spec, product), product, torch.float64)
    # another dtype is cast to ours (like add_)
    mixed = A @ B.to(torch.float64)
    check_stored(mixed, spec, d, dtype)
    assert_close_scaled(mixed.to_dense(), A_dense @ B_dense, dtype)
    # a new matrix: the factor update writes into it in place
    A_before, B_before = A.to_dense().clone(), B.to_dense().clone()
    AB.mul_(float("nan"))
    assert torch.equal(A.to_dense(), A_before) and torch.equal(B.to_dense(), B_before)


@pytest.mark.parametrize("transpose", [False, True], ids=["matmat", "rmatmat"])
def test_matmat(case, transpose):
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    X = random_columns(d, d + 3, dtype, gen)
    out = K.rmatmat(X) if transpose else K.matmat(X)
    assert out.shape == X.shape and out.dtype == dtype
    expected = (K_dense.T if transpose else K_dense) @ X.double()
    assert_close_scaled(out, expected, dtype)
    if not transpose:
        assert_close_scaled(K @ X, expected, dtype)


@pytest.mark.parametrize("n", ["few", "many"])
def test_from_inner(case, n):
    """Π̂(Kᵀ X Xᵀ K) with fewer and with more than 2d columns (dense picks its route by it)."""
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    X = random_columns(d, 3 if n == "few" else 2 * d + 5, dtype, gen)
    H = K.from_inner(X)
    check_stored(H, spec, d, dtype)
    S = K_dense.T @ X.double()
    assert_close_scaled(H.to_dense(), project(spec, S @ S.T), dtype)


def test_from_inner_without_X(case):
    """Π̂(KᵀK), not Π̂(KKᵀ) (spec §9 A1): K is non-symmetric."""
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    H = K.from_inner()
    check_stored(H, spec, d, dtype)
    assert_close_scaled(H.to_dense(), project(spec, K_dense.T @ K_dense), dtype)


@pytest.mark.parametrize("spec", [TrilToeplitz(), TriuToeplitz()], ids=str)
@pytest.mark.parametrize("d", [300, 2000])
@pytest.mark.parametrize("n", [3, 64])
def test_toeplitz_fft_route_is_accurate_for_every_lag(spec, d, n):
    """At sizes where FFTs are taken, the last lags (a few products each, divided by
    their small counts) stay within the FFT's norm-wise round-off."""
    gen = generator("fft", str(spec), d, n)
    K, K_dense = random_structured(spec, d, torch.float32, gen)
    X = random_columns(d, n, torch.float32, gen)
    S = K_dense.T @ X.double()
    for actual, expected in [
        (K.from_inner(X), project(spec, S @ S.T)),
        (spec.from_mat_inner(X), project(spec, X.double() @ X.double().T)),
    ]:
        assert_close_scaled(actual.to_dense(), expected, torch.float32, tol=TOEPLITZ_FFT_FLOAT32)


@pytest.mark.parametrize("spec", [TrilToeplitz(), TriuToeplitz()], ids=str)
@pytest.mark.parametrize(
    ("d", "n"), [(toeplitz.PREFIX_MIN_DIM, toeplitz.PREFIX_MIN_DIM), (300, 1000)]
)
def test_toeplitz_prefix_route_against_the_oracle(spec, d, n, monkeypatch):
    """The CPU's dense route from PREFIX_MIN_DIM (``d ≤ n``: the Gram matrix, then the
    prefix sums along its diagonals, ``toeplitz.diagonal_prefix_sandwich``) is exact to
    float32 round-off, for both orientations, and is the route taken at these sizes."""
    taken = []
    sandwich = toeplitz.diagonal_prefix_sandwich
    monkeypatch.setattr(
        toeplitz, "diagonal_prefix_sandwich", lambda *a: taken.append(1) or sandwich(*a)
    )
    gen = generator("prefix", str(spec), d, n)
    K, K_dense = random_structured(spec, d, torch.float32, gen)
    X = random_columns(d, n, torch.float32, gen)
    S = K_dense.T @ X.double()
    assert_close_scaled(K.from_inner(X).to_dense(), project(spec, S @ S.T), torch.float32)
    assert taken == [1]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("d", [5, 300])
def test_accelerator_kernels_run_on_the_cpu_too(spec, d, monkeypatch):
    """The one-operation kernels taken on GPUs (``splits_work`` false) are exact too;
    forced here so that CI, which has no GPU, runs them."""
    monkeypatch.setattr("singd.structures._linalg.splits_work", lambda X: False)
    gen = generator("one-kernel", str(spec), d)
    K, K_dense = random_structured(spec, d, torch.float32, gen)
    for n in (3, 2 * d + 5):
        X = random_columns(d, n, torch.float32, gen)
        S = K_dense.T @ X.double()
        fft = isinstance(spec, TriangularToeplitz) and d > DIRECT_MAX_DIM
        tol = TOEPLITZ_FFT_FLOAT32 if fft else None
        assert_close_scaled(
            K.from_inner(X).to_dense(), project(spec, S @ S.T), torch.float32, tol=tol
        )
        assert_close_scaled(
            spec.from_mat_inner(X).to_dense(),
            project(spec, X.double() @ X.double().T),
            torch.float32,
            tol=tol,
        )
    assert_close_scaled(
        K.from_inner().to_dense(), project(spec, K_dense.T @ K_dense), torch.float32
    )


def test_from_mat_inner(case):
    spec, d, dtype, gen = case
    X = random_columns(d, 2 * d + 1, dtype, gen)
    H = spec.from_mat_inner(X)
    check_stored(H, spec, d, dtype)
    assert_close_scaled(H.to_dense(), project(spec, X.double() @ X.double().T), dtype)


def test_diagonal_and_traces(case):
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    assert_close_scaled(K.diagonal(), K_dense.diagonal(), dtype)
    assert_close_scaled(K.trace(), K_dense.trace(), dtype)
    assert_close_scaled(K.average_trace(), K_dense.trace() / d, dtype)


def test_diag_add_is_in_place(case):
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    storage = {k: v.data_ptr() for k, v in K.tensors().items()}
    assert K.diag_add_(0.75) is K
    assert {k: v.data_ptr() for k, v in K.tensors().items()} == storage
    check_stored(K, spec, d, dtype)
    assert_close_scaled(K.to_dense(), K_dense + 0.75 * torch.eye(d, dtype=torch.float64), dtype)


def test_add_and_mul(case):
    spec, d, dtype, gen = case
    A, A_dense = random_structured(spec, d, dtype, gen)
    B, B_dense = random_structured(spec, d, torch.float64, gen)  # add_ casts other dtypes

    assert_close_scaled((A + B).to_dense(), A_dense + B_dense, dtype)
    assert_close_scaled((A - B).to_dense(), A_dense - B_dense, dtype)
    assert_close_scaled((A * 2.5).to_dense(), 2.5 * A_dense, dtype)
    assert_close_scaled((2.5 * A).to_dense(), 2.5 * A_dense, dtype)
    assert_close_scaled(A.to_dense(), A_dense, dtype)  # out-of-place left A alone

    storage = {k: v.data_ptr() for k, v in A.tensors().items()}
    assert A.add_(B, alpha=-0.5) is A
    assert A.mul_(3.0) is A
    assert {k: v.data_ptr() for k, v in A.tensors().items()} == storage
    check_stored(A, spec, d, dtype)
    assert_close_scaled(A.to_dense(), 3.0 * (A_dense - 0.5 * B_dense), dtype)
    # device scalars (0-d tensors: the factor update's traces), as fused operations
    assert A.add_(B, alpha=torch.tensor(2.0, dtype=torch.float64)) is A
    assert A.mul_(torch.tensor(0.5, dtype=dtype)) is A
    assert {k: v.data_ptr() for k, v in A.tensors().items()} == storage
    check_stored(A, spec, d, dtype)
    want = 0.5 * (3.0 * (A_dense - 0.5 * B_dense) + 2.0 * B_dense)
    assert_close_scaled(A.to_dense(), want, dtype)


def test_norms(case):
    spec, d, dtype, gen = case
    K, K_dense = random_structured(spec, d, dtype, gen)
    assert_close_scaled(K.frobenius_norm(), torch.linalg.matrix_norm(K_dense), dtype)
    # the largest |entry| of the matrix (not an induced norm)
    assert_close_scaled(K.infinity_vector_norm(), K_dense.abs().max(), dtype)


def test_eye_and_zeros(case):
    spec, d, dtype, _ = case
    device = torch.device("cpu")
    eye = spec.eye(d, dtype=dtype, device=device)
    zeros = spec.zeros(d, dtype=dtype, device=device)
    for M in (eye, zeros):
        check_stored(M, spec, d, dtype)
        assert M.device == device
    assert torch.equal(eye.to_dense().double(), torch.eye(d, dtype=torch.float64))
    assert torch.equal(zeros.to_dense().double(), torch.zeros(d, d, dtype=torch.float64))
    assert spec.num_stored(d) == zeros.numel()


def test_from_tensors_roundtrip(case):
    spec, d, dtype, gen = case
    K, _ = random_structured(spec, d, dtype, gen)
    copy = spec.from_tensors(d, {k: v.clone() for k, v in K.tensors().items()})
    check_stored(copy, spec, d, dtype)
    assert torch.equal(copy.to_dense(), K.to_dense())
    wrong = {k: torch.zeros(v.numel() + 1, dtype=dtype) for k, v in K.tensors().items()}
    with pytest.raises(ValueError, match="do not describe"):
        spec.from_tensors(d, wrong)


# --- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_canonical_name_roundtrips(spec):
    assert parse_structure(str(spec)) == spec
    assert parse_structure(spec) is spec


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("dense", "dense"),
        ("diagonal", "diagonal"),
        ("block30diagonal", "block_diagonal(30)"),
        ("block3diagonal", "block_diagonal(3)"),
        ("hierarchical15_15", "hierarchical(15, 15)"),
        ("hierarchical3_2", "hierarchical(3, 2)"),
        ("triltoeplitz", "tril_toeplitz"),
        ("triutoeplitz", "triu_toeplitz"),
        ("triltopleftdiagonal", "tril_top_left(1)"),
        ("trilbottomrightdiagonal", "tril_bottom_right(1)"),
        ("triutopleftdiagonal", "triu_top_left(1)"),
        ("triubottomrightdiagonal", "triu_bottom_right(1)"),
        ("block_diagonal(block_size=7)", "block_diagonal(7)"),
        ("hierarchical(k1=4, k2=1)", "hierarchical(4, 1)"),
        ("tril_top_left(rank=2)", "tril_top_left(2)"),
    ],
)
def test_published_aliases_and_keywords(alias, canonical):
    spec = parse_structure(alias)
    assert str(spec) == canonical
    assert parse_structure(canonical) == spec


@pytest.mark.parametrize(
    "bad", ["block_diagonal(0)", "hierarchical(-1, 2)", "tril_top_left(0)", "block_diagonal(2.5)"]
)
def test_invalid_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="Invalid arguments"):
        parse_structure(bad)


def test_unknown_name_lists_every_structure():
    with pytest.raises(ValueError, match="Unknown structure") as error:
        parse_structure("tridiagonal")
    message = str(error.value)
    for name in [*_STRUCTURES, "block30diagonal", "hierarchical15_15", "triltoeplitz"]:
        assert name in message
    assert set(available_structures()) >= {"dense", "diagonal", "block_diagonal(block_size)"}


def test_every_registered_structure_is_covered():
    """The suite and the oracle know every registered class (add new ones to both)."""
    ours = {name: cls for name, cls in _STRUCTURES.items() if cls.__module__.startswith("singd.")}
    assert {type(spec) for spec in SPECS} >= set(ours.values())
    assert set(PATTERNS) >= set(ours)


def test_no_dense_fallback_warning_is_configured():
    """The suite runs with NaiveImplementationWarning as an error (pyproject)."""
    with pytest.raises(NaiveImplementationWarning):
        warnings.warn("probe", NaiveImplementationWarning, stacklevel=1)


# --- every operation on every device ------------------------------------------------------

#: Small edge cases and sizes above every route threshold (Toeplitz's FFTs from 129 on).
DEVICE_DIMS = [1, 5, 30, 64, 300, 1153]
#: The largest of ``DEVICE_DIMS`` the CPU runs (the sizes of ``DIMS``).
CPU_MAX_DIM = 64

DEVICE_CASES = [
    pytest.param(spec, d, dtype, route, id=f"{spec}-{d}-{str(dtype)[6:]}-{route}")
    for spec in SPECS
    for route in routes(spec)
    for d in DEVICE_DIMS
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize(("spec", "d", "dtype", "route"), DEVICE_CASES)
def test_every_operation_on_the_device(spec, d, dtype, route, device, monkeypatch):
    """Every operation with every tensor on ``device``, against the float64 oracle on the
    CPU: a tensor created on the wrong device, a kernel PyTorch lacks on a device for a
    dtype, or a device-only numerical difference fails."""
    if device.type == "cpu" and d > CPU_MAX_DIM:
        pytest.skip(
            "an accelerator size: on the CPU the cases above and the Toeplitz-FFT and "
            "one-kernel tests cover the large-d routes (here minutes of CPU time, and "
            "float32 traces of 1153 cancelling entries summed in order)"
        )
    for setting in routes(spec)[route] or ():
        monkeypatch.setattr(*setting)

    def moved(M):
        return M.structure.from_tensors(M.dim, {k: v.to(device) for k, v in M.tensors().items()})

    gen = generator(device.type, str(spec), d, dtype)
    K_cpu, K_dense = random_structured(spec, d, dtype, gen)
    B_cpu, B_dense = random_structured(spec, d, dtype, gen)
    K, B = moved(K_cpu), moved(B_cpu)
    X = random_columns(d, 2 * d + 5, dtype, gen).to(device)
    X_few = random_columns(d, 3, dtype, gen).to(device)
    S = random_symmetric(d, gen)
    X64, X_few64 = X.cpu().double(), X_few.cpu().double()

    results = {
        "from_dense": (spec.from_dense(S.to(dtype).to(device)).to_dense(), project(spec, S)),
        "to_dense": (K.to_dense(), K_dense),
        "matmul": ((K @ B).to_dense(), K_dense @ B_dense),
        "matmat": (K.matmat(X), K_dense @ X64),
        "rmatmat": (K.rmatmat(X), K_dense.T @ X64),
        "from_inner": (
            K.from_inner(X).to_dense(),
            project(spec, K_dense.T @ X64 @ X64.T @ K_dense),
        ),
        "from_inner_few": (
            K.from_inner(X_few).to_dense(),
            project(spec, K_dense.T @ X_few64 @ X_few64.T @ K_dense),
        ),
        "from_inner_KtK": (K.from_inner().to_dense(), project(spec, K_dense.T @ K_dense)),
        "from_mat_inner": (spec.from_mat_inner(X).to_dense(), project(spec, X64 @ X64.T)),
        "diagonal": (K.diagonal(), K_dense.diagonal()),
        "trace": (K.trace(), K_dense.trace()),
        "frobenius": (K.frobenius_norm(), torch.linalg.matrix_norm(K_dense)),
        "infinity": (K.infinity_vector_norm(), K_dense.abs().max()),
        "diag_add": (K.clone().diag_add_(0.75).to_dense(), K_dense + 0.75 * torch.eye(d).double()),
        "eye": (spec.eye(d, dtype=dtype, device=device).to_dense(), torch.eye(d).double()),
    }
    fft = isinstance(spec, TriangularToeplitz) and (d > DIRECT_MAX_DIM or route == "fft")
    fft_tol = TOEPLITZ_FFT_FLOAT32 if fft and dtype == torch.float32 else None
    for name, (actual, expected) in results.items():
        assert actual.device.type == device.type, name
        assert actual.dtype == dtype, name
        assert_close_scaled(actual.cpu(), expected, dtype, name, fft_tol)
