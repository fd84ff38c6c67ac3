"""torch.optim contracts, each over every configuration of ``tests/cases.py`` that
supports it, on every device (``tests/conftest.py``)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from tests.cases import OptimizerCase, cases
from tests.helpers import assert_same_params, data, net, params_of, train

STEPS = 4


def twins(device: torch.device) -> tuple[nn.Module, nn.Module]:
    return net(device), net(device)


@pytest.mark.parametrize("case", cases("checkpoint"))
def test_checkpoint_weights_only_and_bit_identical_resume(
    case: OptimizerCase, device: torch.device
) -> None:
    batches = data(2 * STEPS, device)
    model = net(device)
    optim = case.make(model)
    train(model, optim, batches[:STEPS])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = net(device)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optim = case.make(resumed)
    resumed_optim.load_state_dict(checkpoint["optim"])
    train(model, optim, batches[STEPS:])
    train(resumed, resumed_optim, batches[STEPS:])
    assert_same_params(model, resumed, exact=True)
    assert resumed_optim.steps == optim.steps == 2 * STEPS  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", cases("closure"))
def test_closure_matches_explicit_loop(case: OptimizerCase, device: torch.device) -> None:
    a, b = twins(device)
    train(a, case.make(a), data(STEPS, device))
    optim = case.make(b)
    for X, y in data(STEPS, device):

        def closure(X: torch.Tensor = X, y: torch.Tensor = y) -> torch.Tensor:
            optim.zero_grad()
            loss = nn.functional.cross_entropy(b(X), y)
            loss.backward()
            return loss

        loss = optim.step(closure)  # type: ignore[func-returns-value]
        assert torch.isfinite(loss)
    assert_same_params(a, b, exact=True)


@pytest.mark.parametrize("case", cases("param_groups"))
def test_param_groups_equal_separate_optimizers(case: OptimizerCase, device: torch.device) -> None:
    """Group 1: the convolution with the case's options; group 2: the rest (two linear
    layers and a LayerNorm for the fallback) with another T and lr."""
    one, two = twins(device)
    other = {"T": case.options.get("T", 10) + 1, "lr": 2 * case.options["lr"]}
    grouped = case.make(
        one,
        params=[
            {"params": list(one[0].parameters())},
            {"params": [p for m in list(one)[1:] for p in m.parameters()], **other},
        ],
    )
    separate = [
        case.make(two, params=list(two[0].parameters())),
        case.make(two, params=[p for m in list(two)[1:] for p in m.parameters()], **other),
    ]
    for X, y in data(STEPS, device):
        for opt in (grouped, *separate):
            opt.zero_grad()
        nn.functional.cross_entropy(one(X), y).backward()
        nn.functional.cross_entropy(two(X), y).backward()
        for opt in (grouped, *separate):
            opt.step()
    assert_same_params(one, two, exact=True)


@pytest.mark.parametrize("case", cases("scheduler"))
def test_lr_scheduler_drives_lr(case: OptimizerCase, device: torch.device) -> None:
    model = net(device)
    optim = case.make(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda epoch: 1.0 if epoch == 0 else 0.0)
    batches = data(3, device)
    before = params_of(model)
    train(model, optim, batches[:1])
    assert any(not torch.equal(p, q) for p, q in zip(params_of(model), before, strict=True))
    scheduler.step()
    assert optim.param_groups[0]["lr"] == 0.0
    frozen = params_of(model)
    train(model, optim, batches[1:])
    for p, q in zip(model.parameters(), frozen, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", cases("grad_scaler"))
def test_grad_scaler_tracks_the_unscaled_run(case: OptimizerCase, device: torch.device) -> None:
    """Power-of-two scales that change every other step cancel (to float32 round-off)."""
    batches = data(6, device)
    reference = net(device)
    train(reference, case.make(reference), batches)
    model = net(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    optim = case.make(model, grad_scaler=scaler)
    scales = []
    for X, y in batches:
        optim.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
        scales.append(scaler.get_scale())
        scaler.step(optim)
        scaler.update()
    assert len(set(scales)) > 2  # the scale really changed
    assert_same_params(model, reference)


@pytest.mark.parametrize("case", cases("accumulation"))
def test_gradient_accumulation_equals_big_batch(case: OptimizerCase, device: torch.device) -> None:
    """3 micro-batches of 4, each loss scaled by 4/12, equal one batch of 12."""
    batches = data(STEPS, device)
    big, small = twins(device)
    train(big, case.make(big), batches)
    optim = case.make(small)
    for X, y in batches:
        optim.zero_grad()
        for Xm, ym in zip(X.split(4), y.split(4), strict=True):
            (nn.functional.cross_entropy(small(Xm), ym) * 4 / 12).backward()
        optim.step()
    assert_same_params(big, small)


def test_every_case_is_in_some_suite_and_ids_are_unique() -> None:
    from tests.cases import OPTIMIZER_CASES, ORACLE_PROBLEMS, SUITES

    ids = [c.id for c in OPTIMIZER_CASES]
    assert len(ids) == len(set(ids))
    for case in OPTIMIZER_CASES:
        assert case.supports and case.supports <= SUITES, case.id
        assert ("oracle" in case.supports) == (case.problem in ORACLE_PROBLEMS), case.id
        copy.deepcopy(case.options)  # plain, copyable options (no module state)
