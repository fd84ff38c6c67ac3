"""Nothing a user trains is lost (issue 14): the optimizer-level guarantees.

Whole-or-nothing steps, validated checkpoint loads, layers unused in a step, every
trainable parameter trained, float16 factors that do not overflow the update.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from singd import KFAC, SINGD
from singd.functional import kfac_natural_gradient, natural_gradient
from singd.structures import parse_structure

F64 = torch.float64


def test_float16_factors_do_not_overflow_the_natural_gradient() -> None:
    """CCᵀ G KKᵀ above float16's 65504 (the issue's 95 631) comes out finite and right."""
    torch.manual_seed(0)
    d_o, d_K = 4, 6
    G = 25.0 * torch.rand(d_o, d_K)  # gradients ≤ 25
    for name in ("dense", "diagonal"):
        structure = parse_structure(name)
        K = structure.from_dense(20.0 * torch.eye(d_K) + 0.5).to(torch.float16)
        C = structure.from_dense(3.0 * torch.eye(d_o) + 0.2).to(torch.float16)
        N = natural_gradient(K, C, G)
        K64, C64 = K.to_dense().to(F64), C.to_dense().to(F64)
        exact = C64 @ C64.T @ G.to(F64) @ K64 @ K64.T
        assert exact.abs().max() > 65504  # would overflow in float16
        assert torch.isfinite(N).all()
        torch.testing.assert_close(N.to(F64), exact, rtol=1e-5, atol=0)
    P_K = (400.0 * torch.eye(d_K)).to(torch.float16)
    P_C = (20.0 * torch.eye(d_o)).to(torch.float16)
    N = kfac_natural_gradient(P_K, P_C, G)
    assert torch.isfinite(N).all() and N.abs().max() > 65504


# --- a step happens whole or not at all (items 1 and 10) --------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def batches(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(n)
    ]


COMMON = {"lr": 0.05, "lr_cov": 0.1, "damping": 0.1}
DIAGONAL = {"structures": ("diagonal", "diagonal")}
OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "SINGD-dense": lambda m, **kw: SINGD(m, **{**COMMON, **kw}),
    "SINGD-diagonal": lambda m, **kw: SINGD(m, **{**COMMON, **DIAGONAL, **kw}),
    "KFAC": lambda m, **kw: KFAC(m, **{**COMMON, **kw}),
}


def snapshot(model: nn.Module, optim: Any) -> tuple[list[Tensor], dict[str, Any], int]:
    return (
        [p.detach().clone() for p in model.parameters()],
        copy.deepcopy(optim.state_dict()),
        optim.steps,
    )


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), (path, a, b)


def nan_input(X: Tensor, y: Tensor, model: nn.Module) -> None:
    X = X.clone()
    X[3, 2] = math.nan
    nn.functional.cross_entropy(model(X), y).backward()


def inf_input(X: Tensor, y: Tensor, model: nn.Module) -> None:
    X = X.clone()
    X[0, 0] = math.inf
    nn.functional.cross_entropy(model(X), y).backward()


def nan_grad(X: Tensor, y: Tensor, model: nn.Module) -> None:
    nn.functional.cross_entropy(model(X), y).backward()
    model[3].weight.grad[0, 0] = math.nan


def huge_loss(X: Tensor, y: Tensor, model: nn.Module) -> None:
    (1e30 * nn.functional.cross_entropy(model(X), y)).backward()


def huge_inputs(X: Tensor, y: Tensor, model: nn.Module) -> None:
    nn.functional.cross_entropy(model(X * 1e20), y).backward()


CORRUPTIONS = [nan_input, inf_input, nan_grad, huge_loss, huge_inputs]


def clean(X: Tensor, y: Tensor, model: nn.Module) -> None:
    nn.functional.cross_entropy(model(X), y).backward()


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_non_finite_step_changes_nothing_and_training_goes_on(
    name: str, corrupt: Callable[..., None], T: int
) -> None:
    """Without a GradScaler. The bad step (2: not a refresh step for T = 3) is skipped
    whole with a warning naming it; afterwards the run is exactly the run that never saw
    the bad batch. (Inputs ×1e20 saturate the tanh, so only the curvature statistics,
    formed at refresh steps, see them: for T = 3 they come at step 3.)"""
    bad = 3 if corrupt is huge_inputs and T == 3 else 2
    data = batches(5)
    reference_model = mlp()
    reference = OPTIMIZERS[name](reference_model, T=T)
    for X, y in data:
        reference.zero_grad()
        clean(X, y, reference_model)
        reference.step()

    model = mlp()
    optim = OPTIMIZERS[name](model, T=T)
    for i, (X, y) in enumerate(data):
        if i == bad:
            optim.zero_grad()
            corrupt(X, y, model)
            before = snapshot(model, optim)
            match = rf"Step {bad} skipped: inf/NaN in (layer|parameter) '"
            with pytest.warns(UserWarning, match=match) as record:
                optim.step()
            assert len(record) == 1
            assert_same(before, snapshot(model, optim))
        optim.zero_grad()
        clean(X, y, model)
        optim.step()
    assert optim.steps == reference.steps == len(data)
    for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same(optim.state_dict(), reference.state_dict())


def test_the_warning_names_the_layers_with_inf_nan() -> None:
    model = mlp()
    optim = SINGD(model, T=1)
    X, y = batches(1)[0]
    nn.functional.cross_entropy(model(X), y).backward()
    model[2].weight.grad[0] = math.nan  # the LayerNorm: a fallback parameter
    with pytest.warns(UserWarning, match=r"Step 0 skipped: inf/NaN in parameter '2\.weight'\."):
        optim.step()
    assert optim.wait_for_verdicts() == [(0, ["parameter '2.weight'"])]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_exception_inside_step_changes_nothing(name: str) -> None:
    """A raising lr_cov schedule (after the first steps): a retry is the same step."""
    data = batches(3)
    fail = {"now": False}

    def schedule(step: int) -> float:
        if fail["now"]:
            raise RuntimeError("schedule broke")
        return 0.1

    runs = []
    for inject in (False, True):
        model = mlp()
        optim = OPTIMIZERS[name](model, T=1, lr_cov=schedule)
        for i, (X, y) in enumerate(data):
            optim.zero_grad()
            clean(X, y, model)
            if inject and i == 1:
                fail["now"] = True
                before = snapshot(model, optim)
                with pytest.raises(RuntimeError, match="schedule broke"):
                    optim.step()
                assert_same(before, snapshot(model, optim))
                fail["now"] = False
            optim.step()  # (the retry uses the same gradients and statistics)
        runs.append((model, optim))
    (m0, o0), (m1, o1) = runs
    for p, q in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same(o0.state_dict(), o1.state_dict())


def test_grad_scaler_found_inf_and_a_finite_huge_loss_are_both_skipped() -> None:
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optim = SINGD(model, T=2, grad_scaler=scaler)
    for i, (X, y) in enumerate(batches(4)):
        optim.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y) * (1e30 if i == 1 else 1.0)
        scaler.scale(loss).backward()
        if i == 1:  # a finite but huge loss: found_inf or not, the step must not go in
            before = snapshot(model, optim)
            with pytest.warns(UserWarning, match="Step 1 skipped"):
                scaler.step(optim)
            assert_same(before, snapshot(model, optim))
        else:
            scaler.step(optim)
        scaler.update()
    assert optim.steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- load_state_dict checks everything before it changes anything (items 3 and 7) -------


def trained(name: str = "SINGD-dense", steps: int = 2) -> tuple[nn.Module, Any]:
    model = mlp()
    optim = OPTIMIZERS[name](model, T=1)
    for X, y in batches(steps):
        optim.zero_grad()
        clean(X, y, model)
        optim.step()
    return model, optim


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(sd: dict[str, Any]) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value

    return tamper


def _drop(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def tamper(sd: dict[str, Any]) -> None:
        target = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return tamper


NAN = float("nan")
TAMPERED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("lr -1", _set(("param_groups", 0, "lr"), -1.0), r"Param group 0 .*lr \(β₂\) must be .* ≥ 0"),
    (
        "width",
        _set(("singd", "layers", "3", "K.mat"), torch.eye(7)),
        r"Layer '3', K\.mat: expected shape \(9, 9\), found \(7, 7\)",
    ),
    ("missing m_K", _drop(("singd", "layers", "0", "m_K.mat")), r"Layer '0'.*missing m_K\.mat"),
    (
        "NaN factor",
        _set(("singd", "layers", "0", "C.mat"), lambda t: t * NAN),
        r"Layer '0', C\.mat: 64 of its 64 entries are inf/NaN",
    ),
    (
        "NaN momentum buffer",
        _set(("state", 0, "momentum_buffer"), lambda t: t * NAN),
        r"parameter '0\.weight', 'momentum_buffer': .* inf/NaN",
    ),
    (
        "momentum buffer shape",
        _set(("state", 0, "momentum_buffer"), torch.zeros(3)),
        r"parameter '0\.weight', 'momentum_buffer': expected shape \(8, 5\), found \(3,\)",
    ),
    ("steps", _set(("singd", "steps"), "two"), r"'steps' must be a int, found 'two'"),
    ("layer missing", _drop(("singd", "layers", "3")), r"missing: \['3'\]"),
    ("group count", _set(("param_groups",), lambda g: g + g), r"2 param groups, this optimizer 1"),
    ("AdamW moment", _set(("state", 2, "exp_avg_sq"), lambda t: t * NAN), r"'2\.weight'"),
]


@pytest.mark.parametrize(("what", "tamper", "message"), TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_refused_checkpoint_leaves_the_optimizer_as_it_was(
    what: str, tamper: Callable[[dict[str, Any]], None], message: str
) -> None:
    model, optim = trained()
    sd = copy.deepcopy(optim.state_dict())
    tamper(sd)
    before = snapshot(model, optim)
    with pytest.raises(ValueError, match=message):
        optim.load_state_dict(sd)
    assert_same(before, snapshot(model, optim))
    X, y = batches(1)[0]  # and it trains on as before
    optim.zero_grad()
    clean(X, y, model)
    optim.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_checkpoint_shapes_are_checked() -> None:
    _, optim = trained("KFAC")
    sd = copy.deepcopy(optim.state_dict())
    sd["kfac"]["layers"]["0"]["S_K"] = torch.eye(4)
    with pytest.raises(
        ValueError, match=r"Layer '0', S_K: expected shape \(6, 6\), found \(4, 4\)"
    ):
        optim.load_state_dict(sd)


# --- layers unused in a step keep their factors (item 2) ----------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 2)])

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](torch.tanh(self.trunk(x)))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_head_unused_in_a_step_keeps_its_factors_and_its_factors(set_to_none: bool) -> None:
    model = TwoHeads()
    optim = SINGD(model, T=1, lr_cov=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        task = step % 2
        X = torch.randn(8, 5, generator=gen)
        optim.zero_grad(set_to_none=set_to_none)
        idle = f"heads.{1 - task}"
        before = optim.factors(idle).K.to_dense().clone() if step >= 2 else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no demotion warning
            model(X, task).square().mean().backward()
            optim.step()
        if before is not None:
            assert torch.equal(optim.factors(idle).K.to_dense(), before)  # kept, not refreshed
    assert set(optim.preconditioners) == {"trunk", "heads.0", "heads.1"}  # none demoted
    assert "fallback_layers" in optim.state_dict()["singd"]
    assert not optim.state_dict()["singd"]["fallback_layers"]


def test_a_layer_whose_hook_never_fires_is_still_moved_to_the_fallback() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optim = SINGD(model, T=1)
    X = torch.randn(3, 4)
    (model[0](X) @ model[1].weight.T).sum().backward()  # '1' used without calling it
    with pytest.warns(UserWarning, match="'1' .*forward hook never fired"):
        optim.step()
    assert set(optim.preconditioners) == {"0"}


# --- verdicts read late, as on an accelerator --------------------------------------------


class LateEvent:
    """A device event that completes one query late: the verdict of a step reaches the
    host only at the next ``step()``, as on a busy accelerator."""

    def __init__(self) -> None:
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.queries > 1

    def synchronize(self) -> None:
        self.queries = 2


@pytest.fixture
def late_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    from singd.optim.guard import StepGuard

    original = StepGuard.verdict

    def late(self: StepGuard, step: int) -> Any:
        verdict = original(self, step)
        verdict.event = LateEvent()  # type: ignore[assignment]
        return verdict

    monkeypatch.setattr(StepGuard, "verdict", late)


@pytest.mark.usefixtures("late_verdicts")
@pytest.mark.parametrize("bad", [3, 2], ids=["non-refresh step", "refresh step"])
def test_a_skip_found_one_step_late_corrects_the_counter(bad: int) -> None:
    """The skip of step ``bad`` is found at the next step(): the counter is corrected
    before that step is numbered. After a bad non-refresh step the run is exactly the
    run without the bad batch (the statistics captured under the provisional schedule
    are dropped); after a bad refresh step that refresh is lost (the next one is at
    the next multiple of T), and the counter is still right."""
    T, data = 2, batches(7)
    reference_model = mlp()
    reference = SINGD(reference_model, T=T, lr_cov=0.1, damping=0.1)
    model = mlp()
    optim = SINGD(model, T=T, lr_cov=0.1, damping=0.1)
    for i, (X, y) in enumerate(data):
        reference.zero_grad()
        clean(X, y, reference_model)
        reference.step()
        if i == bad:
            optim.zero_grad()
            nan_input(X, y, model)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # not known yet
                optim.step()
            assert optim.steps == bad + 1  # (provisional)
            optim.zero_grad()
            clean(X, y, model)
            with pytest.warns(UserWarning, match=f"Step {bad} skipped"):
                optim.step()  # finds the skip first, then runs as step `bad`
            assert optim.steps == bad + 1
            continue
        optim.zero_grad()
        clean(X, y, model)
        optim.step()
    assert [step for step, _ in optim.wait_for_verdicts()] == [bad]
    assert optim.steps == reference.steps == len(data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pairs = zip(model.parameters(), reference_model.parameters(), strict=True)
    same = all(torch.equal(p, q) for p, q in pairs)
    assert same == (bad % T != 0)


# --- every trainable parameter is trained, and print(optim) says so (item 4) -------------


def train_steps(model: nn.Module, optim: Any, steps: int) -> None:
    for i in range(steps):
        X, y = batches(steps)[i]
        optim.zero_grad()
        clean(X, y, model)
        optim.step()


def untrained(model: nn.Module, before: dict[str, Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]


def copies(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["SINGD-dense", "KFAC"])
def test_the_bias_of_a_frozen_weight_is_trained_by_the_fallback(name: str) -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    optim = OPTIMIZERS[name](model, T=1)
    before = copies(model)
    train_steps(model, optim, 3)
    assert untrained(model, before) == []
    assert torch.equal(model[0].weight, before["0.weight"])
    row = next(line for line in repr(optim).splitlines() if line.startswith("0 "))
    assert "weight (frozen), bias (adamw while the weight is frozen)" in row


def test_with_fallback_none_the_untrained_bias_is_named() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    optim = SINGD(model, fallback=None, warn_unsupported=False)
    assert "not trained by this optimizer: 0.bias, 2.weight, 2.bias" in repr(optim)


@pytest.mark.parametrize("name", ["SINGD-dense", "KFAC"])
def test_a_layer_frozen_at_construction_and_unfrozen_later_is_trained(name: str) -> None:
    model = mlp()
    for p in model[3].parameters():
        p.requires_grad_(False)
    optim = OPTIMIZERS[name](model, T=1)
    assert "weight (frozen), bias (frozen)" in repr(optim)
    train_steps(model, optim, 1)
    for p in model[3].parameters():
        p.requires_grad_(True)
    before = copies(model)
    train_steps(model, optim, 2)
    assert untrained(model, before) == []
    assert "3" in optim.preconditioners and optim.preconditioners["3"].state_dict()


@pytest.mark.parametrize("name", ["SINGD-dense", "KFAC"])
def test_a_layer_added_to_the_model_later_joins_with_add_param_group(name: str) -> None:
    model = mlp()
    optim = OPTIMIZERS[name](model, T=1)
    train_steps(model, optim, 1)
    model.append(nn.Linear(3, 3))
    optim.add_param_group({"params": list(model[4].parameters())})
    assert "4" in optim.preconditioners
    before = copies(model)
    train_steps(model, optim, 2)
    assert untrained(model, before) == []
    assert any(line.startswith("4 ") and "Linear" in line for line in repr(optim).splitlines())


@pytest.mark.parametrize("name", ["SINGD-dense", "KFAC"])
def test_an_optimizer_built_on_a_meta_model_trains_the_materialised_one(name: str) -> None:
    with torch.device("meta"):
        model = mlp()
    optim = OPTIMIZERS[name](model, T=1)
    X = batches(1)[0][0]
    with pytest.raises(RuntimeError, match=r"on the meta device .*model\.to_empty"):
        model(X.to("meta")).sum().backward()
        optim.step()
    optim.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    before = copies(model)
    train_steps(model, optim, 2)
    assert untrained(model, before) == []  # the LayerNorm (fallback) too
    assert all(
        p in {q for g in optim.param_groups for q in g["params"]} for p in model.parameters()
    )
