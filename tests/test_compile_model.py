"""A ``torch.compile``d model with SINGD attached: one graph, no recompiles, eager's result.

The capture hooks are traced into the model's graph (``singd.capture``): the refresh
schedule is decided in the compiled backward, not by a guard, so refresh and plain
steps run the same graph. The model is a tiny ResNet (BatchNorm, residual adds,
``ReLU(inplace=True)``, adaptive pooling, a linear head) in float64; its parameters after
six steps (one group refreshed every step, the other every second) must match the eager
run at the float32 tolerance. A capture that lost the statistics (the backward op
eliminated as dead code, a hook not traced) would fail ``step()`` or be off by O(1e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from singd import SINGD
from singd.cli.models import resnet
from tests.tolerances import tolerance

STEPS = 6


def tiny_resnet() -> nn.Sequential:
    """Two stages of one block each (the second with a downsampling shortcut), 16×16 inputs."""
    torch.manual_seed(0)
    return resnet(widths=(4, 8), blocks=(1, 1), num_classes=5, imagenet_stem=False).double()


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 3, 16, 16, generator=gen, dtype=torch.float64),
            torch.randint(0, 5, (8,), generator=gen),
        )
        for _ in range(steps)
    ]


def optimizer(model: nn.Sequential) -> SINGD:
    """The head is refreshed at every step (T=1), the rest at every second one (T=2)."""
    head = list(model[-1].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    return SINGD(
        model,
        params=[{"params": rest, "T": 2}, {"params": head, "T": 1}],
        lr=1e-2,
        lr_cov=1e-2,
        structures=("diagonal", "diagonal"),
    )


def train(model: nn.Module, forward: nn.Module, data, after_first=None) -> SINGD:
    optim = optimizer(model)  # type: ignore[arg-type]
    for i, (X, y) in enumerate(data):
        optim.zero_grad()
        nn.functional.cross_entropy(forward(X), y).backward()
        optim.step()
        if i == 0 and after_first is not None:
            after_first()
    return optim


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_resnet_one_graph_no_recompiles_matches_eager(fresh_dynamo) -> None:
    data = batches()
    initial = tiny_resnet()
    eager = copy.deepcopy(initial)
    train(eager, eager, data)

    model = copy.deepcopy(initial)
    compiled = torch.compile(model)  # inductor, fullgraph=False
    warm: dict[str, int] = {}
    optim = train(model, compiled, data, after_first=lambda: warm.update(counters["stats"]))
    # No layer demoted to the fallback for a forward hook that never fired:
    assert set(optim.layers) == set(eager_layers(initial))
    assert dict(counters["graph_break"]) == {}, "singd's hooks broke the graph"
    assert warm["unique_graphs"] == 1
    assert dict(counters["stats"])["unique_graphs"] == 1, "a later step recompiled"
    for (name, p), q, p0 in zip(
        model.named_parameters(), eager.parameters(), initial.parameters(), strict=True
    ):
        assert not torch.equal(p, p0), name
        torch.testing.assert_close(p, q, **tolerance(torch.float32), msg=name)


def eager_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


class SequenceNet(nn.Module):
    """Linear layers on ``[B, T, d]`` inputs (their outputs are views) with in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h[h > 0.3] = 0.5  # index_put_ on the view
        return self.second(h).relu_()


def test_compiled_inplace_ops_on_view_outputs_match_eager(fresh_dynamo) -> None:
    """Also: a compiled forward under no_grad captures nothing."""
    torch.manual_seed(0)
    initial = SequenceNet().double()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(4)]

    def run(model: nn.Module, forward: nn.Module) -> SINGD:
        optim = SINGD(model, lr=0.05, lr_cov=0.05, alpha1=0.3, T=2, structures=("diagonal",) * 2)
        for x in data:
            optim.zero_grad()
            forward(x).square().mean().backward()
            optim.step()
        return optim

    eager = copy.deepcopy(initial)
    run(eager, eager)
    model = copy.deepcopy(initial)
    compiled = torch.compile(model, backend="aot_eager")
    first = run(model, compiled)
    assert dict(counters["graph_break"]) == {}
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float64))

    with torch.no_grad():
        compiled(data[0])
    assert not any(pre.has_statistics() for pre in first._preconditioners.values())
    compiled(data[0]).sum().backward()
    assert all(pre.has_statistics() for pre in first._preconditioners.values())
