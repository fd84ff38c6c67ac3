"""The step guard (:mod:`singd.optim.guard`): device-side finiteness, branch-free commit."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from benchmarks.op_count import OpCounter
from singd.optim.branch_free import STACKED_COMMIT_MAX_NUMEL, STACKED_COMMIT_MIN_TENSORS
from singd.optim.guard import StepGuard
from singd.optim.verdicts import Verdict, VerdictQueue
from singd.structures import _linalg

CPU = torch.device("cpu")


def guarded_update(
    new_values: dict[str, torch.Tensor],
) -> tuple[StepGuard, dict[str, torch.Tensor]]:
    """Targets (ones) and a guard that checked ``new_values`` and committed them."""
    targets = {name: torch.ones_like(v) for name, v in new_values.items()}
    guard = StepGuard(CPU)
    for name, value in new_values.items():
        guard.check(name, [value])
    guard.commit_(list(targets.values()), list(new_values.values()))
    return guard, targets


def test_a_finite_step_is_committed_whole() -> None:
    new = {"a": torch.full((3,), 2.0), "b": torch.full((2, 2), -1e38)}  # large, finite
    guard, targets = guarded_update(new)
    assert bool(guard.ok)
    for name in new:
        assert torch.equal(targets[name], new[name])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_non_finite_element_leaves_every_target_as_it_was(bad: float) -> None:
    b = torch.full((5,), 3.0)
    b[2] = bad
    guard, targets = guarded_update({"a": torch.full((3,), 2.0), "b": b, "c": torch.zeros(0)})
    assert not bool(guard.ok)
    assert all(torch.equal(t, torch.ones_like(t)) for t in targets.values())
    assert guard.verdict(step=7).failed() == ["b"]


@pytest.fixture
def branch_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit that accelerators take (``torch.where``, no host read of ``ok``)."""
    monkeypatch.setattr(_linalg, "splits_work", lambda X: False)


def _commit_candidates() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(old, new): enough equal small tensors for one stacked ``where``, one of another
    shape, one above the stacking limit, one of another dtype."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3)] * STACKED_COMMIT_MIN_TENSORS + [(5,), (STACKED_COMMIT_MAX_NUMEL + 1,)]
    new = [torch.randn(shape, generator=g) for shape in shapes]
    new.append(torch.randn(4, 3, generator=g, dtype=torch.float64))
    old = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in new]
    return old, new


@pytest.mark.parametrize("bad", [None, 0, STACKED_COMMIT_MIN_TENSORS - 1, -2, -1])
@pytest.mark.parametrize("method", ["commit_", "select_"])
def test_branch_free_commit_selects_equal_small_tensors_together(
    branch_free: None, bad: int | None, method: str
) -> None:
    """Every tensor ends up exactly new (a finite step) or exactly old (a NaN anywhere),
    with one ``where`` for the equal small tensors and one for each other tensor."""
    old, new = _commit_candidates()
    if bad is not None:
        new[bad].view(-1)[1] = math.nan
    guard = StepGuard(CPU)
    guard.check("layer", new)
    with OpCounter() as counter:
        if method == "commit_":
            targets = [t.clone() for t in old]
            guard.commit_(targets, new)
        else:
            targets = [t.clone() for t in new]
            guard.select_(targets, old)
    expected = old if bad is not None else new
    assert all(torch.equal(t, e) for t, e in zip(targets, expected, strict=True))
    assert counter.by_name["where"] == 1 + 3


def test_half_precision_values_are_checked_in_their_own_range() -> None:
    finite = torch.full((4,), 60000.0, dtype=torch.float16)
    overflow = finite * 2  # inf in float16
    guard, _ = guarded_update({"finite": finite, "overflow": overflow})
    assert guard.verdict(0).failed() == ["overflow"]


def test_found_inf_vetoes_the_step() -> None:
    guard = StepGuard(CPU)
    guard.check("layer", [torch.ones(2)])
    guard.require_zero("found_inf (GradScaler)", torch.tensor([1.0]))
    target = torch.zeros(2)
    guard.commit_([target], [torch.ones(2)])
    assert torch.equal(target, torch.zeros(2))
    assert guard.verdict(0).failed() == ["found_inf (GradScaler)"]


def test_select_keeps_the_old_values_in_the_new_tensors() -> None:
    old, new = torch.zeros(3), torch.tensor([1.0, math.nan, 2.0])
    guard = StepGuard(CPU)
    guard.check("K", [new])
    guard.select_([new], [old])
    assert torch.equal(new, old)


def test_checks_must_come_before_the_verdict() -> None:
    guard = StepGuard(CPU)
    assert bool(guard.ok)  # nothing checked: ok
    with pytest.raises(RuntimeError, match="before ok is read"):
        guard.check("late", [torch.ones(1)])


def test_queue_warns_once_per_failed_step_naming_it_and_undoes_bookkeeping() -> None:
    counter = {"steps": 0}

    def describe(verdict: Verdict, labels: list[str]) -> str:
        return f"step {verdict.step} skipped: {', '.join(labels)}"

    queue = VerdictQueue(describe)
    for step, value in enumerate([1.0, math.nan, 2.0]):
        guard = StepGuard(CPU)
        guard.check("fc1", [torch.tensor([value])])
        counter["steps"] += 1
        guard.on_skip(lambda: counter.__setitem__("steps", counter["steps"] - 1))
        queue.push(guard.verdict(step))
    assert len(queue) == 3
    with pytest.warns(UserWarning, match="step 1 skipped: fc1") as record:
        failed = queue.poll()  # CPU: every verdict is ready at once
    assert len(record) == 1 and [v.step for v in failed] == [1]
    assert counter["steps"] == 2 and len(queue) == 0
    assert queue.skipped == [(1, ["fc1"])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_guard_never_synchronises_with_the_device() -> None:
    """Checking, committing and starting the verdict run with sync debugging set to error."""
    device = torch.device("cuda")
    targets = [torch.ones(100, device=device) for _ in range(3)]
    new = [torch.full((100,), 2.0, device=device) for _ in range(3)]
    new[1][5] = math.nan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # (the second time with the cached label index)
            guard = StepGuard(device)
            for i, value in enumerate(new):
                guard.check(f"layer{i}", [value])
            guard.require_zero("found_inf", torch.zeros(1, device=device))
            guard.commit_(targets, new)
            verdict = guard.verdict(step=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert verdict.failed() == ["layer1"]
    assert all(torch.equal(t, torch.ones_like(t)) for t in targets)


def test_an_in_place_rule_is_undone_unless_the_step_is_ok() -> None:
    """guard_in_place: AdamW (which writes in place and creates its state) on a NaN gradient."""
    from singd.functional.first_order import adamw_step

    for grad, ok in ((torch.ones(3), True), (torch.tensor([1.0, math.nan, 1.0]), False)):
        p = torch.full((3,), 0.5)
        state: dict[str, torch.Tensor] = {}
        guard = StepGuard(CPU)

        def update(p: torch.Tensor = p, grad: torch.Tensor = grad, state: dict = state) -> None:
            adamw_step([p], [grad], [state], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)

        guard.guard_in_place(["bias"], [p], [state], update)
        guard.finish()
        assert bool(guard.ok) == ok
        if ok:
            assert not torch.equal(p, torch.full((3,), 0.5)) and float(state["step"]) == 1
        else:  # as if AdamW never ran: parameter unchanged, moments and count zero
            assert torch.equal(p, torch.full((3,), 0.5))
            assert all(not t.any() for t in state.values())
            assert guard.verdict(0).failed() == ["bias"]


# --- CPUs: the parameter step written in place at the commit --------------------------


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    # (two equal layers: their directions come from a batch)
    return nn.Sequential(
        nn.Linear(5, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )


def _optimizer(make: str, model: torch.nn.Module) -> Any:
    """SINGD with ``make`` factors, or KFAC (with KL clipping): momentum, weight decay."""
    from singd import KFAC, SINGD

    settings = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2, "T": 2}
    if make == "KFAC":
        return KFAC(model, **settings, kl_clip=1e-3)
    return SINGD(model, **settings, structures=(make, make))


def _train(
    make: str, steps: int, corrupt_at: int | None = None
) -> tuple[torch.nn.Module, dict, int]:
    """A few steps of ``make`` (SINGD dense/diagonal or KFAC, momentum and weight decay;
    the LayerNorm on the fallback); returns (model, state_dict, out-of-place steps).
    At ``corrupt_at`` the LayerNorm's weight gradient (a fallback parameter) gets a NaN."""
    from singd.optim import phases

    model = _mlp()
    optim = _optimizer(make, model)
    calls = 0
    original = phases.parameter_step

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    gen = torch.Generator().manual_seed(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(phases, "parameter_step", counted)
        for t in range(steps):
            X, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            optim.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            if t == corrupt_at:
                model[6].weight.grad[1] = math.nan
                with pytest.warns(UserWarning, match="parameter '6.weight'"):
                    optim.step()
            else:
                optim.step()
    return model, optim.state_dict(), calls


@pytest.mark.parametrize("make", ["dense", "diagonal", "KFAC"])
def test_cpu_steps_in_place_give_the_out_of_place_values_exactly(
    make: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eagerly on a CPU a parameter step proven finite is written in place at the commit:
    the same parameters and momenta, bit for bit, as computing it out of place and
    copying (the guard's general path, forced here), and the out-of-place step is not
    used at all."""
    model, state, calls = _train(make, steps=5)
    assert calls == 0
    monkeypatch.setattr(StepGuard, "writes_in_place", lambda self, tensors: False)
    reference, reference_state, reference_calls = _train(make, steps=5)
    assert reference_calls > 0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    for key, value in state["state"].items():
        for name, t in value.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, reference_state["state"][key][name]), (key, name)


@pytest.mark.parametrize("make", ["dense", "KFAC"])
def test_a_nan_in_a_fallback_gradient_also_stops_the_in_place_steps(make: str) -> None:
    """The in-place steps of the Kronecker layers run at the commit, after the fallback
    rule's verdict: a NaN gradient of the LayerNorm (fallback) leaves every parameter
    as it was; the run then equals one that never saw that step's batch's update."""
    skipped, _, _ = _train(make, steps=4, corrupt_at=2)
    model = _mlp()
    optim = _optimizer(make, model)
    gen = torch.Generator().manual_seed(1)
    for t in range(4):
        X, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        if t == 2:
            continue  # (the skipped step: same data drawn, no step counted)
        optim.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optim.step()
    for p, q in zip(skipped.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_step_not_proven_finite_is_computed_out_of_place_and_checked() -> None:
    """Huge (finite) parameters and momenta: the bound does not prove the step finite
    (also where it would be: 1e38), so nothing is registered for the commit and the step
    is left to the out-of-place path, whose results the guard checks (the skips of
    tests/test_reliability.py)."""
    from singd.optim.in_place import step_at_commit

    for scale, proven in ((1.0, True), (1e38, False), (3e38, False)):
        p = torch.tensor([-1.0, 1.0]) * scale
        buffer = torch.tensor([1.0, -1.0]) * scale
        d = torch.tensor([0.25, -0.5])
        expected_p, expected_b = p - (0.9 * buffer + d), 0.9 * buffer + d
        guard = StepGuard(CPU)
        registered = step_at_commit(
            guard, [p], [d.clone()], [buffer], lr=1.0, momentum=0.9, weight_decay=0.0
        )
        assert registered == proven
        assert torch.isfinite(expected_p).all() == (scale < 3e38)
        guard.commit_([], [])
        if proven:  # written at the commit
            assert torch.equal(p, expected_p) and torch.equal(buffer, expected_b)
        else:  # untouched: not registered
            assert torch.equal(p, torch.tensor([-1.0, 1.0]) * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_finiteness_bound_is_sound_near_the_largest_value(dtype: torch.dtype) -> None:
    """Wherever parameter_step_stays_finite says finite, the rounded step is finite: random
    magnitudes up to twice the largest value / 4, each kind of step; and it does say
    finite for ordinary magnitudes. (A bound without its rounding margin fails here.)"""
    from singd.functional import parameter_step_, parameter_step_stays_finite

    largest = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(0)
    proven = 0
    for trial in range(400):
        scales = (torch.rand(3, generator=gen) * largest / 2).tolist()
        lr = float(torch.rand((), generator=gen)) * 2
        momentum, weight_decay = (0.9, 0.5) if trial % 2 else (0.0, 0.0)
        if trial % 4 < 2:  # random signs and sizes
            p, d, b = (
                ((torch.rand(64, generator=gen) * 2 - 1) * s).to(dtype).clamp(-largest, largest)
                for s in scales
            )
        else:  # the tight case: every magnitude at its maximum, all adding up
            p, d, b = (
                torch.full((64,), sign * s).to(dtype)
                for sign, s in zip((1, -1, -1), scales, strict=True)
            )
        maxima = [float(t.abs().max()) for t in (p, d, b)]
        if not parameter_step_stays_finite(
            *maxima, lr=lr, momentum=momentum, weight_decay=weight_decay, largest=largest
        ):
            continue
        proven += 1
        parameter_step_([p], [d], [b], lr=lr, momentum=momentum, weight_decay=weight_decay)
        assert torch.isfinite(p).all() and torch.isfinite(b).all() and torch.isfinite(d).all()
    assert proven > 20
    assert parameter_step_stays_finite(
        1.0, 1e3, 10.0, lr=0.1, momentum=0.9, weight_decay=1e-2, largest=largest
    )
    for bad in (math.inf, math.nan):
        assert not parameter_step_stays_finite(
            1.0, bad, 1.0, lr=0.1, momentum=0.9, weight_decay=0.0, largest=largest
        )
