"""``optimizer.compile()``: the device side of ``step()`` as one graph per kind of step.

``compile()`` wraps it in ``torch.compile(fullgraph=True)``, which raises on any graph
break, so a run that finishes had none. After a warm-up (the first refresh step and
the first plain step compile one graph each) no step recompiles, and the parameters,
momenta and factors equal eager ones (float64). A non-finite batch is still skipped
whole under compilation (the verdict is read on the host, outside the graph).
``backend="aot_eager"`` traces through Dynamo and AOTAutograd like Inductor does, but
skips code generation (minutes on a 2-core CPU); ``benchmarks/compile_step.py`` runs
Inductor.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.conftest import HAS_CUDA
from tests.tolerances import assert_close

torch_dynamo = pytest.importorskip("torch._dynamo")

#: One configuration per code path the trace goes through: batched diagonal layers,
#: stacked equal layers of dense factors (INGD), arrow structures (hierarchical:
#: remembered pieces; rank-1 triangular: joined rows), IKFAC, and KFAC (inverses,
#: non-contiguous state).
CONFIGS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "diagonal": (SINGD, {"structures": ("diagonal", "diagonal")}),
    "ingd": (SINGD, {"structures": ("dense", "dense")}),
    "hierarchical": (SINGD, {"structures": ("hierarchical(2,2)", "hierarchical(2,2)")}),
    "triangular": (SINGD, {"structures": ("triu_top_left(1)", "tril_bottom_right(1)")}),
    "ikfac": (SINGD, {"structures": ("dense", "dense"), "kfac_like": True}),
    "kfac": (KFAC, {}),
}


def _setup(name: str, device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    # two equal layers: batched (diagonal) or stacked (every other structure), traced
    # through torch.vmap
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    model = model.to(device=device, dtype=torch.float64)
    cls, kwargs = CONFIGS[name]
    return model, cls(model, T=2, lr=0.1, lr_cov=0.1, **kwargs)  # type: ignore[call-arg]


def _data(steps: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 6, dtype=torch.float64, generator=generator).to(device),
            torch.randint(3, (16,), generator=generator).to(device),
        )
        for _ in range(steps)
    ]


def _train(
    model: nn.Module, optim: torch.optim.Optimizer, data: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for X, y in data:
        optim.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optim.step()


def _state(model: nn.Module, optim: Any) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [
        t.clone() for pre in optim.preconditioners.values() for t in pre.state_dict().values()
    ]
    return tensors + [optim.state[p]["momentum_buffer"].clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_has_one_graph_per_kind_and_equals_eager(name: str) -> None:
    from torch._dynamo.utils import counters

    data = _data(8)
    eager_model, eager = _setup(name)
    _train(eager_model, eager, data)
    torch_dynamo.reset()
    model, optim = _setup(name)
    optim.compile(backend="aot_eager")  # type: ignore[attr-defined]
    _train(model, optim, data[:4])  # warm-up: a refresh step and a plain step compile
    counters.clear()
    _train(model, optim, data[4:])
    assert not counters["frames"], f"recompiled after warm-up: {dict(counters['frames'])}"
    assert not counters["graph_break"]
    for got, want in zip(_state(model, optim), _state(eager_model, eager), strict=True):
        assert_close(got, want)


def test_a_compiled_step_with_inf_nan_changes_nothing() -> None:
    torch_dynamo.reset()
    model, optim = _setup("diagonal")
    optim.compile(backend="aot_eager")  # type: ignore[attr-defined]
    data = _data(3)
    _train(model, optim, data[:2])
    before = _state(model, optim)
    X, y = data[2]
    optim.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")  # type: ignore[index]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optim.step()
    assert any("Step 2 skipped" in str(w.message) for w in caught)
    assert optim.steps == 2  # type: ignore[attr-defined]
    for got, want in zip(_state(model, optim), before, strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_compiled_step_is_capturable_in_cuda_graphs() -> None:
    """``mode="reduce-overhead"``: Inductor records the step into a CUDA graph."""
    data = _data(8, "cuda")
    eager_model, eager = _setup("diagonal", "cuda")
    _train(eager_model, eager, data)
    torch_dynamo.reset()
    model, optim = _setup("diagonal", "cuda")
    optim.compile(mode="reduce-overhead")  # type: ignore[attr-defined]
    _train(model, optim, data)
    for got, want in zip(_state(model, optim), _state(eager_model, eager), strict=True):
        assert_close(got, want)
