"""Mixed precision and the training loop: dtypes, autocast, GradScaler, clipping, compile."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.cases import OptimizerCase, cases
from tests.helpers import NET_HYPER, assert_params_close, data, net, params_of
from tests.tolerances import TRAJECTORY_FLOAT32, tolerance

HYPER = NET_HYPER


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preconditioner_dtype",
    [(None, None), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
)
def test_dtypes_are_kept(
    device: torch.device, dtype: torch.dtype, preconditioner_dtype: tuple[torch.dtype | None, ...]
) -> None:
    model_dtype = dtype
    model = net(device, model_dtype)
    optim = SINGD(
        model, preconditioner_dtype=preconditioner_dtype, structures=("dense", "diagonal"), **HYPER
    )
    for X, y in data(4, device):
        optim.zero_grad()
        nn.functional.cross_entropy(model(X.to(model_dtype)).float(), y).backward()
        optim.step()
    expected_K = preconditioner_dtype[0] or model_dtype
    expected_C = preconditioner_dtype[1] or model_dtype
    for name in ("0", "3", "6"):
        state = optim.factors(name)
        assert state.K.dtype == state.m_K.dtype == expected_K
        assert state.C.dtype == state.m_C.dtype == expected_C
        assert str(state.C.structure) == "diagonal"
    for p in model.parameters():
        assert p.dtype == model_dtype and torch.isfinite(p).all()


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_fp32_factors_and_tracks_fp32_run(
    device: torch.device, amp_dtype: torch.dtype
) -> None:
    if device.type == "cpu" and amp_dtype == torch.float16:
        pytest.skip("float16 autocast is the CUDA recipe (bfloat16 on the CPU)")
    batches = data(6, device)
    reference = net(device)
    ref_optim = SINGD(reference, **HYPER)
    for X, y in batches:
        ref_optim.zero_grad()
        nn.functional.cross_entropy(reference(X), y).backward()
        ref_optim.step()

    model = net(device)
    optim = SINGD(model, **HYPER)
    for X, y in batches:
        optim.zero_grad()
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()  # even backward and step inside autocast
            optim.step()
    for name in ("0", "3", "6"):
        assert optim.factors(name).K.dtype == torch.float32
        assert optim.factors(name).C.dtype == torch.float32
    assert_params_close(params_of(model), params_of(reference), amp_dtype)


# --- GradScaler -----------------------------------------------------------------------------


def run_plain(
    batches,
    *,
    model_dtype=torch.float32,
    clip: float | None = None,
    case: OptimizerCase | None = None,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Params after training :func:`net` without scaling (SINGD, or ``case``, on ``HYPER``)."""
    model = net(device, dtype=model_dtype)
    optim = SINGD(model, **HYPER) if case is None else make(case, model)
    for X, y in batches:
        optim.zero_grad()
        nn.functional.cross_entropy(model(X.to(model_dtype)), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optim.step()
    return params_of(model)


def test_injected_cyclic_scales_match_unscaled_run() -> None:
    """The published emulation: scale the loss by s_t and announce s_t (spec §5)."""
    batches = data(8)
    scales = [100.0, 1e4, 100.0, 1.0]
    model = net(dtype=torch.float64)
    optim = SINGD(model, init_grad_scale=scales[-1], **HYPER)
    for t, (X, y) in enumerate(batches):
        optim.zero_grad()
        (scales[t % 4] * nn.functional.cross_entropy(model(X.double()), y)).backward()
        optim.set_current_grad_scale(scales[t % 4])
        optim.step()  # t = 0: s₋₁ = 1 ≠ s₀ is exact (float64 statistics: no warning)
    assert_params_close(
        params_of(model), run_plain(batches, model_dtype=torch.float64), torch.float64
    )


def make(case: OptimizerCase, model: nn.Module, **kwargs: Any) -> Any:
    """The case's optimizer on :func:`net`'s hyper-parameters."""
    return case.cls(model, **{**HYPER, **case.kwargs, **kwargs})  # type: ignore[call-arg]


def layer_state(optim: Any, name: str) -> dict[str, torch.Tensor]:
    """Copies of a layer's preconditioner state (any Kronecker optimizer)."""
    saved = optim.state_dict()[optim._STATE_KEY]["layers"][name]
    return {k: v.clone() for k, v in saved.items()}


@pytest.mark.parametrize("case", cases("amp"))
def test_inf_step_is_skipped_and_does_not_count(case: OptimizerCase) -> None:
    batches = data(6)
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optim = make(case, model, grad_scaler=scaler)
    poisoned = (batches[2][0].clone(), batches[2][1])
    poisoned[0][0, 0, 0, 0] = float("inf")
    for i, (X, y) in enumerate([*batches[:2], poisoned, *batches[2:]]):
        optim.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
        if i == 2:
            before = (params_of(model), layer_state(optim, "3"), optim.steps)
            with pytest.warns(UserWarning, match="Step 2 skipped"):
                scaler.step(optim)
            after = (params_of(model), layer_state(optim, "3"), optim.steps)
            assert all(torch.equal(p, q) for p, q in zip(before[0], after[0], strict=True))
            assert before[1].keys() == after[1].keys()
            assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
            assert before[2] == after[2] == 2
        else:
            scaler.step(optim)
        scaler.update()
    assert optim.steps == len(batches)
    # Same trajectory as never seeing the poisoned batch (with the halved scale after it).
    rtol, atol = TRAJECTORY_FLOAT32
    for p, q in zip(params_of(model), run_plain(batches, case=case), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def test_float16_autocast_with_grad_scaler_tracks_float32_and_skips_inf_steps(
    device: torch.device,
) -> None:
    """The usual CUDA recipe (float16 autocast, GradScaler; an inf batch is skipped), on
    every device."""
    batches = data(6, device)
    model = net(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    optim = SINGD(model, grad_scaler=scaler, **HYPER)
    poisoned = (batches[2][0].clone(), batches[2][1])
    poisoned[0][0, 0, 0, 0] = float("inf")
    for i, (X, y) in enumerate([*batches[:2], poisoned, *batches[2:]]):
        optim.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16):
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
    assert optim.factors("3").K.device.type == device.type
    reference = run_plain(batches, device=device)
    assert_params_close(params_of(model), reference, torch.float16)


def test_unscale_then_clip_then_step() -> None:
    batches = data(6)
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    optim = SINGD(model, grad_scaler=scaler, **HYPER)
    for X, y in batches:
        optim.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
        scaler.unscale_(optim)
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(optim)
        scaler.update()
    rtol, atol = TRAJECTORY_FLOAT32
    for p, q in zip(params_of(model), run_plain(batches, clip=0.5), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_scaler_made_after_the_optimizer_unscale_clip_step(clip: float | None) -> None:
    """accelerate / HF Trainer: no grad_scaler=, the scaler comes later, unscale_ always."""
    batches = data(6)
    model = net()
    optim = SINGD(model, **HYPER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: nothing is left to the user
        for X, y in batches:
            optim.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
            scales.append(scaler.get_scale())
            scaler.unscale_(optim)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optim)
            scaler.update()
    assert len(set(scales)) > 2 and optim.steps == len(batches)
    rtol, atol = TRAJECTORY_FLOAT32
    for p, q in zip(params_of(model), run_plain(batches, clip=clip), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def test_scaler_made_after_the_optimizer_skips_inf_steps() -> None:
    batches = data(4)
    model = net()
    optim = SINGD(model, **HYPER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    poisoned = (batches[1][0].clone(), batches[1][1])
    poisoned[0][0, 0, 0, 0] = float("inf")
    for i, (X, y) in enumerate([batches[0], poisoned, *batches[1:]]):
        optim.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
        if i == 1:
            with pytest.warns(UserWarning, match="Step 1 skipped"):
                scaler.unscale_(optim)
        else:
            scaler.unscale_(optim)
        scaler.step(optim)
        scaler.update()
    assert optim.steps == len(batches)
    rtol, atol = TRAJECTORY_FLOAT32
    for p, q in zip(params_of(model), run_plain(batches), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def test_optimizer_lets_frameworks_unscale_and_clip() -> None:
    """Lightning refuses to clip for optimizers that declare they unscale internally."""
    assert SINGD._step_supports_amp_scaling is False
    assert KFAC._step_supports_amp_scaling is False


def test_init_grad_scale_mismatch_warns_for_float16_statistics() -> None:
    for dtype_C, warns in ((torch.float16, True), (None, False)):
        model = net()
        optim = SINGD(model, preconditioner_dtype=(None, dtype_C), **HYPER)
        X, y = data(1)[0]
        (1024 * nn.functional.cross_entropy(model(X), y)).backward()
        optim.set_current_grad_scale(1024.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optim.step()
        assert any("init_grad_scale" in str(w.message) for w in caught) == warns


def test_accumulation_under_autocast_and_scaler() -> None:
    batches = data(4)
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    optim = SINGD(model, grad_scaler=scaler, **HYPER)
    for X, y in batches:
        optim.zero_grad(set_to_none=False)
        for Xm, ym in zip(X.split(4), y.split(4), strict=True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(Xm), ym) / 3
            scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
    assert_params_close(params_of(model), run_plain(batches), torch.bfloat16)


# --- never poisoned -------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("amp"))
def test_non_finite_statistics_leave_factors_and_training_goes_on(case: OptimizerCase) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    optim = case.cls(model, **{**case.kwargs, "T": 1, "lr": 1e-2})  # type: ignore[call-arg]
    X = torch.randn(8, 4)
    optim.zero_grad()
    model(X).square().mean().backward()
    optim.step()
    state = optim.state_dict()[optim._STATE_KEY]["layers"]["0"]
    before = {k: v.clone() for k, v in state.items()}
    optim.zero_grad()
    huge = X * 1e30  # AᵀA overflows float32; the output gradient is zero, so is ∇W
    (model(huge) * 0).sum().backward()
    params = [p.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match=r"Step 1 skipped: inf/NaN in layer '0'.*as they were"):
        optim.step()  # the whole step: factors, parameters and the counter as they were
    after = optim.state_dict()[optim._STATE_KEY]["layers"]["0"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters(), strict=True))
    assert optim.steps == 1
    for _ in range(2):  # training goes on, and the warning is not repeated
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            optim.zero_grad()
            model(X).square().mean().backward()
            optim.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- clipping the preconditioned update -----------------------------------------------------


def test_kl_clip_scales_the_natural_gradient() -> None:
    """ν = min(1, sqrt(c / (lr² Σ⟨G, Δ⟩))) multiplies every natural gradient of the group."""
    X, y = data(1)[0]
    lr = 0.5
    runs = {}
    for kl_clip in (None, 1e-6):
        model = net(dtype=torch.float64)
        optim = SINGD(
            model,
            params=[p for n, p in model.named_parameters() if not n.startswith("4")],
            lr=lr,
            momentum=0.0,
            T=1,
            kl_clip=kl_clip,
        )
        optim.zero_grad()
        nn.functional.cross_entropy(model(X.double()), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("4")}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optim.step()
        runs[kl_clip] = {
            n: (before[n] - p.detach()) / lr for n, p in model.named_parameters() if n in grads
        }
    vg = sum((grads[n] * runs[None][n]).sum() for n in grads)  # Σ⟨G, Δ⟩ (Δ unclipped)
    nu = min(1.0, (1e-6 / (lr**2 * vg)).sqrt().item())
    assert nu < 0.1  # the bound is active
    for n in grads:
        torch.testing.assert_close(runs[1e-6][n], nu * runs[None][n], **tolerance(torch.float64))


# --- torch.compile ---------------------------------------------------------------------------


def test_compiled_model_matches_eager() -> None:
    batches = data(5)
    eager = run_plain(batches)
    model = net()
    compiled = torch.compile(model, backend="aot_eager")
    optim = SINGD(model, **HYPER)
    for X, y in batches:
        optim.zero_grad()
        nn.functional.cross_entropy(compiled(X), y).backward()
        optim.step()
    assert_params_close(params_of(model), eager, torch.float32)
