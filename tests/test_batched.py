"""The multi-tensor forms equal the per-matrix forms.

* :mod:`singd.functional.batched`: the pure refresh and the preconditioning of a list of
  diagonal layers against :func:`update_factors` / :func:`natural_gradient`;
* the optimizer: SINGD with diagonal factors batched (:mod:`singd.preconditioners.diagonal`)
  and equal layers of other structures stacked (:mod:`singd.preconditioners.stacked`)
  against the same optimizer one layer at a time (``batch_key`` returning None), over
  refresh intervals, momenta, IKFAC, a GradScaler, a checkpoint loaded mid-run and a
  non-finite batch.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.functional import FactorHyperparams, FactorState, natural_gradient, update_factors
from singd.functional.batched import DiagonalFactors, DiagonalGroup
from singd.optim.phases import StepPhasesMixin
from singd.preconditioners import KFACPreconditioner, SINGDPreconditioner
from singd.preconditioners.diagonal import DiagonalBatch
from singd.preconditioners.kfac import KFACStack
from singd.preconditioners.stacked import StackedBatch
from singd.structures import Diagonal, DiagonalMatrix
from tests.tolerances import assert_close

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


def _flat(states: list[FactorState]) -> DiagonalFactors:
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in states]
        return None if parts[0] is None else torch.cat([p.diag for p in parts])

    k, c = cat("K"), cat("C")
    assert k is not None and c is not None
    return DiagonalFactors(k, c, cat("m_K"), cat("m_C"))


def _group() -> DiagonalGroup:
    return DiagonalGroup(DIMS, SHAPES, BIAS, torch.float64, torch.float64, torch.device("cpu"))


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
    old = _flat(states)
    before = [t.clone() for t in old.tensors()]
    h_k, h_c = torch.cat(stats_K), torch.cat(stats_C)
    new = _group().refresh(old, h_k, h_c, hp, case["u"], raw=case["raw"])
    # pure: the inputs are untouched
    for t, b in zip(old.tensors(), before, strict=True):
        assert torch.equal(t, b)
    assert torch.equal(h_k, torch.cat(stats_K)) and torch.equal(h_c, torch.cat(stats_C))
    assert (new.m_k is None) == (new.m_c is None) == (not momentum)
    want = _flat(expected)
    for got_t, want_t in zip(new.tensors(), want.tensors(), strict=True):
        torch.testing.assert_close(got_t, want_t, rtol=1e-13, atol=1e-14)


def test_diagonal_precondition_equals_the_natural_gradient() -> None:
    generator = torch.Generator().manual_seed(2)
    states = _states(False, generator)
    group = _group()
    flat = _flat(states)
    group.set_squares(flat.k, flat.c)
    weights = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in SHAPES]
    biases = [torch.randn(d_C, dtype=torch.float64, generator=generator) for _, d_C in DIMS[:2]]
    got = group.precondition(weights + biases)
    for i, (state, w) in enumerate(zip(states, weights, strict=True)):
        G = w.flatten(1)
        if BIAS[i]:
            G = torch.cat([G, biases[i].unsqueeze(1)], 1)
        want = natural_gradient(state.K, state.C, G)
        torch.testing.assert_close(got[i].flatten(1), want[:, : G.shape[1] - BIAS[i]])
        if BIAS[i]:
            torch.testing.assert_close(got[len(SHAPES) + i], want[:, -1])


# --- the optimizer: batched against one layer at a time -----------------------------------
def _model() -> nn.Sequential:
    """Convolutions and linears of different shapes, with two pairs of equal layers (a
    pair of convolutions, a pair of linears without bias)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 10),
        nn.Tanh(),
        nn.Linear(10, 10, bias=False),
        nn.Tanh(),
        nn.Linear(10, 10, bias=False),
        nn.Tanh(),
        nn.Linear(10, 5),
    ).double()


#: The structures of the stacked tests: (K, C) pairs other than both diagonal.
STACKED_STRUCTURES = [
    ("dense", "dense"),
    ("dense", "diagonal"),
    ("block_diagonal(4)", "tril_toeplitz"),
    ("hierarchical(2, 3)", "triu_bottom_right(2)"),
]


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 2, 8, 8, dtype=torch.float64, generator=generator),
            torch.randint(5, (6,), generator=generator),
        )
        for _ in range(steps)
    ]


def _run(
    kwargs: dict[str, Any],
    *,
    batched: bool,
    monkeypatch: pytest.MonkeyPatch,
    structures: tuple[str, str] | None = ("diagonal", "diagonal"),
    steps: int = 5,
    micro_batches: int = 1,
    scaler_scale: float | None = None,
    reload_at: int | None = None,
) -> tuple[nn.Module, Any]:
    with monkeypatch.context() as patch:
        if not batched:
            patch.setattr(SINGDPreconditioner, "batch_key", lambda self: None)
            patch.setattr(KFACPreconditioner, "batch_key", lambda self: None)
        model = _model()
        options = {"lr": 5e-2, "lr_cov": 5e-2, "damping": 1e-3, "weight_decay": 1e-2, **kwargs}

        def make(**extra: object) -> torch.optim.Optimizer:
            if structures is None:  # KFAC, inverses in float64 (float32 by default)
                return KFAC(model, inverse_dtype=torch.float64, **options, **extra)  # type: ignore[arg-type]
            return SINGD(model, structures=structures, **options, **extra)  # type: ignore[arg-type]

        optim = make()
        scaler = None
        if scaler_scale is not None:
            scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale, growth_interval=2)
            optim = make(grad_scaler=scaler)
        loss_func = nn.CrossEntropyLoss()
        for step, (X, y) in enumerate(_batches(steps)):
            if reload_at is not None and step == 1:
                saved = copy.deepcopy(optim.state_dict())
            if reload_at is not None and step == reload_at:
                # back to the state of step 1 (other factors than the live ones), in the
                # same optimizer: the layers' tensors are replaced behind the batch's back
                optim.load_state_dict(saved)
            optim.zero_grad()
            for X_m, y_m in zip(X.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                loss = loss_func(model(X_m), y_m) / micro_batches
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.step(optim)
                scaler.update()
            else:
                optim.step()
        if batched:  # the batched path did run
            kind = {None: KFACStack, ("diagonal", "diagonal"): DiagonalBatch}.get(
                structures, StackedBatch
            )
            assert any(
                isinstance(batch, kind)
                for pre in optim.preconditioners.values()  # type: ignore[attr-defined]
                for batch in pre.batches.values()
            )
    return model, optim


def _assert_same(a: tuple[nn.Module, Any], b: tuple[nn.Module, Any]) -> None:
    for (name, p), q in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert_close(p, q, msg=f"parameter {name}")
        buffers = a[1].state[p].get("momentum_buffer"), b[1].state[q].get("momentum_buffer")
        assert (buffers[0] is None) == (buffers[1] is None)
        if buffers[0] is not None:
            assert_close(buffers[0], buffers[1], msg=f"momentum of {name}")
    for name, pre in a[1].preconditioners.items():
        theirs = b[1].preconditioners[name].state_dict()
        for key, t in pre.state_dict().items():
            assert_close(t, theirs[key], msg=f"{key} of {name}")


OPTIONS = [
    pytest.param({"T": 1}, id="T1"),
    pytest.param({"T": 2, "alpha1": 0.0, "momentum": 0.0}, id="T2-no-momenta"),
    pytest.param({"T": 1, "kfac_like": True}, id="IKFAC"),
    pytest.param({"T": 1, "normalize_lr_cov": True}, id="normalized"),
]


@pytest.mark.parametrize("kwargs", OPTIONS)
def test_batched_optimizer_equals_one_layer_at_a_time(
    kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _assert_same(
        _run(kwargs, batched=True, monkeypatch=monkeypatch),
        _run(kwargs, batched=False, monkeypatch=monkeypatch),
    )


def test_batched_with_accumulation_scaler_and_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    options = dict(micro_batches=2, scaler_scale=2.0**10)
    _assert_same(
        _run({"T": 1}, batched=True, monkeypatch=monkeypatch, **options),
        _run({"T": 1}, batched=False, monkeypatch=monkeypatch, **options),
    )
    _assert_same(  # a checkpoint replaces the layers' tensors: the batch concatenates anew
        _run({"T": 2}, batched=True, monkeypatch=monkeypatch, reload_at=3),
        _run({"T": 2}, batched=False, monkeypatch=monkeypatch, reload_at=3),
    )


# --- equal layers of other structures: stacked ---------------------------------------------
@pytest.mark.parametrize("structures", STACKED_STRUCTURES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("kwargs", OPTIONS)
def test_stacked_optimizer_equals_one_layer_at_a_time(
    kwargs: dict, structures: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _assert_same(
        _run(kwargs, batched=True, monkeypatch=monkeypatch, structures=structures),
        _run(kwargs, batched=False, monkeypatch=monkeypatch, structures=structures),
    )


@pytest.mark.parametrize("structures", STACKED_STRUCTURES[::3], ids=lambda s: "-".join(s))
def test_stacked_with_accumulation_scaler_and_reload(
    structures: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    options = dict(micro_batches=2, scaler_scale=2.0**10, structures=structures)
    _assert_same(
        _run({"T": 1}, batched=True, monkeypatch=monkeypatch, **options),
        _run({"T": 1}, batched=False, monkeypatch=monkeypatch, **options),
    )
    reload = dict(reload_at=3, structures=structures)
    _assert_same(  # a checkpoint replaces the layers' tensors: the batch stacks anew
        _run({"T": 2}, batched=True, monkeypatch=monkeypatch, **reload),
        _run({"T": 2}, batched=False, monkeypatch=monkeypatch, **reload),
    )


# --- the joint state: views, a non-finite step, an exception -----------------------------
def _joint_batches(optim: Any) -> list[Any]:
    return [b for pre in optim.preconditioners.values() for b in pre.batches.values()]


def _holds_views_of_the_concatenation(optim: Any) -> None:
    """Diagonal layers (all of them one batch): every layer's K is a view of one vector."""
    pres = list(optim.preconditioners.values())
    (batch,) = _joint_batches(optim)
    assert isinstance(batch, DiagonalBatch)
    flat = batch.current()
    storage = flat.k.untyped_storage().data_ptr()
    assert all(pre.state.K.diag.untyped_storage().data_ptr() == storage for pre in pres)
    assert flat.k.numel() == sum(pre.plan.d_K for pre in pres)


def _rows_of(kind: type, stacked: Any, held: Any) -> Callable[[Any], None]:
    """Stacks of ``kind`` of the pair of convolutions and the pair of linears, nothing
    else, whose layers hold rows of them: ``stacked(batch)`` the stack, ``held(pre)``
    a layer's tensor."""

    def check(optim: Any) -> None:
        stacks = _joint_batches(optim)
        assert sorted(len(b.pres) for b in stacks) == [2, 2]
        assert all(isinstance(b, kind) for b in stacks)
        for batch in stacks:
            stack = stacked(batch)
            assert stack.shape[0] == 2
            for i, pre in enumerate(batch.pres):
                assert held(pre).untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
                assert torch.equal(held(pre), stack[i])

    return check


#: (optimizer, how its layers hold views of the joint state) per kind of batch
JOINT = [
    pytest.param(
        lambda m, T: SINGD(m, structures=("diagonal", "diagonal"), T=T, lr=5e-2, lr_cov=5e-2),
        _holds_views_of_the_concatenation,
        id="diagonal",
    ),
    pytest.param(
        lambda m, T: SINGD(m, structures=("block_diagonal(4)", "dense"), T=T, lr=5e-2, lr_cov=5e-2),
        _rows_of(
            StackedBatch,
            lambda batch: batch.current()["K"]["blocks"],
            lambda pre: pre.state.K.tensors()["blocks"],
        ),
        id="stacked",
    ),
    pytest.param(
        lambda m, T: KFAC(m, T=T, lr=5e-2, lr_cov=5e-2, inverse_dtype=torch.float64),
        _rows_of(KFACStack, lambda batch: batch.current()["P_K"], lambda pre: pre.state["P_K"]),
        id="kfac",
    ),
]


def _snapshot(model: nn.Module, optim: Any) -> list[torch.Tensor]:
    """Parameters, momenta and every layer's state, cloned."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [
        t.clone() for p in model.parameters() for t in optim.state[p].values() if torch.is_tensor(t)
    ]
    return tensors + [
        t.clone() for pre in optim.preconditioners.values() for t in pre.state_dict().values()
    ]


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("T", [1, 10], ids=["nan-at-a-refresh", "nan-at-a-plain-step"])
@pytest.mark.parametrize(("make", "holds_views"), JOINT)
def test_layers_hold_views_of_the_batch_and_a_non_finite_step_changes_nothing(
    make: Any, holds_views: Any, T: int
) -> None:
    """A NaN input at step 1 (T=1: a refresh step, whose statistics and factor updates
    are NaN; T=10: a plain step) is skipped: parameters, momenta and every layer's state
    are as before, and the layers still hold views of the joint state."""
    model = _model()
    optim = make(model, T)
    loss_func = nn.CrossEntropyLoss()
    (X, y), (X_bad, _) = _batches(2)
    optim.zero_grad()
    loss_func(model(X), y).backward()
    optim.step()
    holds_views(optim)
    before = _snapshot(model, optim)
    X_bad[0, 0, 0, 0] = float("nan")
    optim.zero_grad()
    loss_func(model(X_bad), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optim.step()
    assert any("skipped" in str(w.message) for w in caught)
    _assert_equal(_snapshot(model, optim), before)
    # and the next good step trains from there (the diagonal k², c² buffers were refilled)
    optim.zero_grad()
    loss_func(model(X), y).backward()
    optim.step()
    holds_views(optim)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(("make", "holds_views"), JOINT)
def test_an_exception_after_the_refresh_changes_nothing(
    make: Any, holds_views: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception inside the step after the batches refreshed (here: in the parameter
    updates) runs their undo: every layer's state and statistics are put back and the
    joint state is forgotten; the retry of the step equals a run without the exception."""
    data = _batches(3)
    loss_func = nn.CrossEntropyLoss()
    runs = []
    for inject in (False, True):
        model = _model()
        optim = make(model, 1)
        for step, (X, y) in enumerate(data):
            optim.zero_grad()
            loss_func(model(X), y).backward()
            if inject and step == 1:
                before = _snapshot(model, optim)
                held = {name: pre.state for name, pre in optim.preconditioners.items()}
                with monkeypatch.context() as patch:

                    def broken(*args: Any, **kwargs: Any) -> None:
                        raise RuntimeError("update broke")

                    patch.setattr(StepPhasesMixin, "_parameter_updates", broken)
                    with pytest.raises(RuntimeError, match="update broke"):
                        optim.step()
                _assert_equal(_snapshot(model, optim), before)
                for name, pre in optim.preconditioners.items():
                    assert pre.state is held[name], name
                    assert pre.has_statistics(), name
                assert all(not b.synced() for b in _joint_batches(optim))
            optim.step()
        holds_views(optim)
        runs.append(_snapshot(model, optim))
    _assert_equal(runs[1], runs[0])


@pytest.mark.parametrize("T", [1, 2])
def test_kfac_stacked_equals_one_layer_at_a_time(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    options: dict[str, Any] = dict(structures=None, micro_batches=2, scaler_scale=2.0**10)
    if T == 2:  # a checkpoint replaces the layers' tensors: the stack is built anew
        options = dict(structures=None, reload_at=3)
    _assert_same(
        _run({"T": T}, batched=True, monkeypatch=monkeypatch, **options),
        _run({"T": T}, batched=False, monkeypatch=monkeypatch, **options),
    )


# --- statistics of equal layers: formed together at the end of each backward pass ----------
def _static_input_run(
    monkeypatch: pytest.MonkeyPatch, *, batched: bool, max_bytes: int | None = None
) -> tuple[tuple[nn.Module, Any], list[int]]:
    """Two equal Linear layers, the first reading one input buffer that is refilled in
    place for each of two micro-batches (as pinned or CUDA-graph inputs are); returns
    the trained (model, optimizer) and the sizes of the stacked statistics formed."""
    from singd.optim import pending
    from singd.preconditioners import singd as singd_module

    sizes: list[int] = []
    original = singd_module.stacked_statistics

    def spy(pres, xs, gs, previous_scale):  # type: ignore[no-untyped-def]
        sizes.append(len(pres))
        return original(pres, xs, gs, previous_scale)

    with monkeypatch.context() as patch:
        patch.setattr(singd_module, "stacked_statistics", spy)
        if max_bytes is not None:
            patch.setattr(pending, "PENDING_MAX_BYTES", max_bytes)
        if not batched:
            patch.setattr(SINGDPreconditioner, "batch_key", lambda self: None)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        ).double()
        optim = SINGD(model, structures=("dense", "dense"), lr=5e-2, lr_cov=5e-2, T=1)
        buffer = torch.empty(3, 8, dtype=torch.float64)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            optim.zero_grad()
            for _ in range(2):
                buffer.copy_(torch.randn(3, 8, dtype=torch.float64, generator=generator))
                y = torch.randint(3, (3,), generator=generator)
                (nn.functional.cross_entropy(model(buffer), y) / 2).backward()
            optim.step()
    return (model, optim), sizes


def test_equal_layers_statistics_are_formed_together_per_backward_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each backward pass forms the two equal layers' statistics in one stacked
    computation, at its end: so refilling the input buffer for the next micro-batch
    changes nothing, and the optimizer equals one layer at a time."""
    batched, sizes = _static_input_run(monkeypatch, batched=True)
    alone, alone_sizes = _static_input_run(monkeypatch, batched=False)
    assert sizes == [2] * 6 and alone_sizes == []  # (3 steps × 2 micro-batches)
    _assert_same(batched, alone)


def test_waiting_statistics_are_flushed_at_the_memory_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above :data:`singd.optim.pending.PENDING_MAX_BYTES` a pass is accumulated at once
    (here every pass: a limit of 0 bytes), with the same result."""
    limited, sizes = _static_input_run(monkeypatch, batched=True, max_bytes=0)
    alone, _ = _static_input_run(monkeypatch, batched=False)
    assert sizes == []  # (groups of one are accumulated by the layer itself)
    _assert_same(limited, alone)


@pytest.mark.parametrize("structures", [("diagonal", "diagonal"), ("dense", "dense")])
def test_layers_with_equal_shapes_of_input_and_gradient_but_not_of_parameters(
    structures: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linear(8, 8) with and without a bias see inputs and output gradients of the same
    shapes: their statistics must not be formed as one group (their K differ in size)."""

    def run(batched: bool) -> tuple[nn.Module, Any]:
        with monkeypatch.context() as patch:
            if not batched:
                patch.setattr(SINGDPreconditioner, "batch_key", lambda self: None)
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for bias in (True, False, True, False, True):
                layers += [nn.Linear(8, 8, bias=bias), nn.Tanh()]
            model = nn.Sequential(*layers, nn.Linear(8, 3)).double()
            optim = SINGD(model, structures=structures, lr=5e-2, lr_cov=5e-2, T=1)
            generator = torch.Generator().manual_seed(3)
            for _ in range(3):
                X = torch.randn(4, 8, dtype=torch.float64, generator=generator)
                y = torch.randint(3, (4,), generator=generator)
                optim.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
                optim.step()
        return model, optim

    _assert_same(run(batched=True), run(batched=False))


# --- statistics of equal convolutions: grouped by their geometry ----------------------------
#: (stride, padding, dilation, padding_mode) of the branches of :class:`_Branches`: on a
#: 14-wide input every one maps to 3 output positions per dimension with a 3-wide kernel,
#: so their inputs and output gradients have equal shapes. Equal geometries (A, C) group;
#: each other branch differs from one of them in one attribute only (B from A in the
#: stride, C from B in the padding, D from C in the padding mode, E from A in the
#: dilation): grouped with it, its statistics would be formed with the wrong geometry.
BRANCHES = {
    "A1": (4, 0, 1, "zeros"),
    "A2": (4, 0, 1, "zeros"),
    "B": (5, 0, 1, "zeros"),
    "C1": (5, 1, 1, "zeros"),
    "C2": (5, 1, 1, "zeros"),
    "D": (5, 1, 1, "reflect"),
    "E": (4, 0, 2, "zeros"),
}


class _Branches(nn.Module):
    """``Σ tanh(conv(x))`` over the convolutions of :data:`BRANCHES` (one input)."""

    def __init__(self, conv: type[nn.Module], channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleDict(
            {
                name: conv(channels, channels, 3, stride=s, padding=p, dilation=d, padding_mode=m)
                for name, (s, p, d, m) in BRANCHES.items()
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((torch.tanh(c(x)) for c in self.convs.values()), torch.zeros(()))


#: Input sizes per number of spatial dimensions: 14 wide (3 output positions in each
#: branch), and 5 wide (one output position in each branch) in the last two of three, to
#: keep the test cheap.
CONV_INPUTS = {1: (14,), 2: (14, 14), 3: (14, 5, 5)}


def _conv_model(dim: int) -> nn.Sequential:
    """A convolution, three equal ones (a residual stage's), two equal depthwise ones
    (whose inputs and output gradients have the shapes of the three), then the branches of one
    input whose inputs and output gradients have equal shapes but whose geometries
    differ (:data:`BRANCHES`), and a linear read-out; on ``[B, 2, *CONV_INPUTS[dim]]``
    inputs."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    outputs = math.prod(3 if n == 14 else 1 for n in CONV_INPUTS[dim])
    torch.manual_seed(0)
    return nn.Sequential(
        conv(2, 3, 3, padding=1),
        nn.Tanh(),
        *[m for _ in range(3) for m in (conv(3, 3, 3, padding=1), nn.Tanh())],
        *[m for _ in range(2) for m in (conv(3, 3, 3, padding="same", groups=3), nn.Tanh())],
        _Branches(conv, 3),
        nn.Flatten(),
        nn.Linear(3 * outputs, 4),
    ).double()


#: The statistics groups of one pass of :func:`_conv_model`: the three equal
#: convolutions, the two depthwise ones, A1 with A2, C1 with C2; every other layer alone.
CONV_GROUPS = [2, 2, 2, 3]

CONV_OPTIMIZERS = {
    "diagonal": {"structures": ("diagonal", "diagonal")},
    "INGD": {"structures": ("dense", "dense")},
    "dense-diagonal": {"structures": ("dense", "diagonal")},
    "hierarchical-block": {"structures": ("hierarchical(2, 3)", "block_diagonal(2)")},
    "IKFAC": {"structures": ("dense", "dense"), "kfac_like": True, "alpha1": 0.0},
    "KFAC": {},
}


def _conv_run(
    dim: int, name: str, approx: str, *, grouped: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[tuple[nn.Module, Any], list[list[int]]]:
    """Two steps of :func:`_conv_model`; returns the trained (model, optimizer) and
    the sizes of the statistics groups of every backward pass."""
    from singd.optim.pending import PendingStatistics
    from singd.preconditioners.base import LayerPreconditioner

    groups: list[list[int]] = []
    flush = PendingStatistics.flush

    def spy(self: PendingStatistics) -> None:
        sizes = sorted(len(w) for w in self._waiting.values() if len(w) > 1)
        if sizes:
            groups.append(sizes)
        flush(self)

    with monkeypatch.context() as patch:
        patch.setattr(PendingStatistics, "flush", spy)
        if not grouped:
            patch.setattr(LayerPreconditioner, "statistics_key", lambda self, x, g: None)
        model = _conv_model(dim)
        options = {"lr": 5e-2, "lr_cov": 5e-2, "damping": 1e-3, "T": 1, "kfac_approx": approx}
        kwargs = {**options, **CONV_OPTIMIZERS[name]}
        if name == "KFAC":
            optim: Any = KFAC(model, inverse_dtype=torch.float64, **kwargs)  # type: ignore[arg-type]
        else:
            optim = SINGD(model, **kwargs)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(4)
        for _ in range(2):
            X = torch.randn(3, 2, *CONV_INPUTS[dim], dtype=torch.float64, generator=generator)
            y = torch.randint(4, (3,), generator=generator)
            optim.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            optim.step()
    return (model, optim), groups


#: (dimensions, optimizer, KFAC approximation): every optimizer on Conv2d; on Conv1d and
#: Conv3d the paths that differ by dimension (the expand matrix without F.unfold, the
#: patch sums of a diagonal K and of reduce).
CONV_CASES = [
    *[(2, name, approx) for name in CONV_OPTIMIZERS for approx in ("expand", "reduce")],
    *[(dim, *case) for dim in (1, 3) for case in (("diagonal", "expand"), ("INGD", "expand"))],
    *[(dim, "KFAC", "reduce") for dim in (1, 3)],
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: float64 convolutions on a busy CPU are otherwise up to 100×
    slower (measured: a Conv3d's forward and backward, 250 ms on two threads of a loaded
    machine, 2.5 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("dim", "name", "approx"), CONV_CASES)
def test_equal_convolutions_statistics_are_formed_together(
    dim: int, name: str, approx: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal convolutions' statistics are formed as one group per backward pass, those
    of equal shapes but other geometry (stride, padding, dilation, padding mode) are
    not; the optimizer equals one layer at a time."""
    grouped, groups = _conv_run(dim, name, approx, grouped=True, monkeypatch=monkeypatch)
    alone, alone_groups = _conv_run(dim, name, approx, grouped=False, monkeypatch=monkeypatch)
    _assert_same(grouped, alone)
    assert groups == [CONV_GROUPS] * 2 and alone_groups == []
