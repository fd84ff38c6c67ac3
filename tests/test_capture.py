"""Statistics capture where models do unusual things: in-place ops on views, copies, pickles."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from singd import SINGD, register_adapter
from singd.layers import LinearAdapter
from tests.tolerances import tolerance


def with_statistics(optim: SINGD) -> set[str]:
    """The layers holding captured curvature statistics (not yet used by a step)."""
    return {name for name, pre in optim._preconditioners.items() if pre.has_statistics()}


HYPER = {"lr": 0.05, "lr_cov": 0.05, "alpha1": 0.3, "T": 1, "weight_decay": 1e-2}


class TransposedLinear(nn.Linear):
    """A Linear applied along dim 0 of ``[T, B, d]``: its output is a transposed view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(0, 1)).transpose(0, 1)


class TransposedAdapter(LinearAdapter):
    def shared_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)

    def shared_grad_outputs(self, g: torch.Tensor) -> torch.Tensor:
        return g.transpose(0, 1)


@pytest.fixture
def transposed_linear() -> type[TransposedLinear]:
    """TransposedLinear with its adapter registered (for this test only: conftest
    restores the registry)."""
    register_adapter(TransposedLinear, TransposedAdapter)
    return TransposedLinear


class SequenceNet(nn.Module):
    """Linear layers on ``[B, T, d]`` inputs (their outputs are views), then an activation."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 5)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.activation(self.first(x)))


def relu_(h: torch.Tensor) -> torch.Tensor:
    return h.relu_()


def masked_fill_inplace(h: torch.Tensor) -> torch.Tensor:
    h[h > 0.3] = 0.5  # index_put_ on the view (SpecAugment-style masking)
    return h


def masked_fill(h: torch.Tensor) -> torch.Tensor:
    return torch.where(h > 0.3, torch.full_like(h, 0.5), h)


def run(model: nn.Module, steps: int = 4, shape: tuple[int, ...] = (3, 5, 4)) -> SINGD:
    optim = SINGD(model, **HYPER)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        optim.zero_grad()
        model(x).square().mean().backward()
        optim.step()
    return optim


@pytest.mark.parametrize(
    ("inplace", "out_of_place"),
    [
        (relu_, torch.relu),
        (nn.ReLU(inplace=True), nn.ReLU()),
        (masked_fill_inplace, masked_fill),
    ],
    ids=["relu_", "ReLU(inplace=True)", "index_put_"],
)
def test_inplace_op_on_a_view_output_keeps_the_statistics(inplace, out_of_place) -> None:
    """nn.Linear on 3-d inputs returns a view; an in-place op on it rebases its history."""
    torch.manual_seed(0)
    a = SequenceNet(out_of_place).double()
    b = copy.deepcopy(a)
    b.activation = inplace
    assert a.first(torch.randn(2, 3, 4, dtype=torch.float64))._is_view()
    run(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layer must not be demoted to the fallback
        optim = run(b)
    assert set(optim.layers) == {"first", "second"}
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float64))


def test_inplace_op_on_a_partial_view_output_keeps_the_statistics(
    transposed_linear: type[TransposedLinear],
) -> None:
    """An output that is not its base reshaped (a transposed view) is captured on a copy."""
    torch.manual_seed(0)
    a = nn.Sequential(transposed_linear(4, 6), nn.ReLU(), transposed_linear(6, 5)).double()
    b = copy.deepcopy(a)
    b[1] = nn.ReLU(inplace=True)
    assert not a[0](torch.randn(5, 3, 4, dtype=torch.float64)).is_contiguous()
    optim_a = run(a, shape=(5, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optim_b = run(b, shape=(5, 3, 4))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float64))
    for name in ("0", "2"):
        torch.testing.assert_close(
            optim_a.factors(name).C.to_dense(), optim_b.factors(name).C.to_dense()
        )


def capture_hook_count(model: nn.Module) -> int:
    return sum(
        type(hook).__name__ in ("_CaptureHook", "_RemovedHook")
        for module in model.modules()
        for hook in module._forward_hooks.values()
    )


def test_model_pickles_and_deep_copies_without_the_optimizer() -> None:
    torch.manual_seed(0)
    model = SequenceNet(torch.relu)
    optim = SINGD(model, T=1)
    assert capture_hook_count(model) == 2
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a closure or the optimizer in the hooks would not pickle
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    for other in (loaded, twin):
        assert capture_hook_count(other) == 0
        other(torch.randn(2, 3, 4)).sum().backward()  # must not reach the optimizer
    assert not with_statistics(optim), "a copy's backward pass added statistics to the original"
    model(torch.randn(2, 3, 4)).sum().backward()  # the original still captures
    assert with_statistics(optim) == {"first", "second"}
    optim.step()


def test_copy_of_a_module_with_its_own_hooks_drops_the_capture_hook() -> None:
    """The user's hooks and their handles stay intact; the copy's capture hook goes away."""
    torch.manual_seed(0)
    model = SequenceNet(torch.relu)
    calls: list[str] = []
    handle = model.first.register_forward_hook(lambda *_: calls.append("user"))
    optim = SINGD(model, T=1)
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 3, 4)).sum().backward()
    assert calls == ["user"]  # the user's hook was copied and ran
    assert capture_hook_count(twin) == 0  # the placeholder removed itself
    assert not with_statistics(optim)
    handle.remove()
    model(torch.randn(2, 3, 4)).sum().backward()
    assert calls == ["user"]  # the handle still removes the user's hook
    assert with_statistics(optim) == {"first", "second"}
