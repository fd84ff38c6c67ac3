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

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.optim.fallback import register_fallback
from tests.conftest import HAS_CUDA
from tests.tolerances import COMPILED_BF16_DIFFERING, assert_close

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


def _counting_backend() -> Any:
    """``aot_eager`` counting what it compiles (``frame_count``, ``graphs``)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("aot_eager")


def _graphs(backend: Any) -> int:
    """The graphs with operations ``backend`` compiled (Dynamo also hands it empty ones)."""
    return sum(1 for graph in backend.graphs if len(graph.graph.nodes))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_has_one_graph_per_kind_and_equals_eager(name: str) -> None:
    data = _data(8)
    eager_model, eager = _setup(name)
    _train(eager_model, eager, data)
    torch_dynamo.reset()
    model, optim = _setup(name)
    backend = _counting_backend()
    optim.compile(backend=backend)  # type: ignore[attr-defined]
    # warm-up: the first refresh step (no momenta yet), the first plain step, a
    # refresh step with momenta
    _train(model, optim, data[:4])
    warm = backend.frame_count
    assert 1 <= _graphs(backend) <= 3
    _train(model, optim, data[4:])
    assert backend.frame_count == warm, "recompiled after the warm-up"
    for got, want in zip(_state(model, optim), _state(eager_model, eager), strict=True):
        assert_close(got, want)


def _train_live(
    model: nn.Module,
    optim: Any,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    inf_at: int | None = None,
) -> None:
    """Steps of two micro-batches each (gradient accumulation) through ``scaler``,
    with ``scheduler`` stepped after each; at batch ``inf_at`` a gradient is inf (the
    scaler skips the step and halves its scale)."""
    for i, (X, y) in enumerate(data):
        optim.zero_grad()
        for X_part, y_part in zip(X.chunk(2), y.chunk(2), strict=True):
            loss = nn.functional.cross_entropy(model(X_part), y_part) / 2
            scaler.scale(loss).backward()
        if i == inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")  # type: ignore[index]
        scaler.step(optim)
        scaler.update()
        scheduler.step()


def _decayed_sign_sgd(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: Any, config: Any, lr: Any
) -> None:
    """A fallback rule of the user's, written for a float ``lr`` (the guide's sign SGD,
    with decoupled weight decay): arithmetic of ``lr`` and ``alpha=lr``."""
    for p, g in zip(params, grads, strict=True):
        p.mul_(1 - lr * config.weight_decay)
        p.add_(g.sign(), alpha=-lr)


@pytest.mark.parametrize(
    ("name", "fallback"), [("diagonal", "adamw"), ("ingd", "sgd"), ("diagonal", "registered")]
)
def test_schedules_and_a_changing_grad_scale_do_not_recompile(name: str, fallback: str) -> None:
    """An LR scheduler, an ``lr_cov`` schedule and a ``GradScaler`` whose scale doubles
    every step (``growth_interval=1``) and halves at an inf step change ``lr``,
    β₁, the gradient scale and :math:`u` at every step; they enter the compiled step
    as device scalars, so after the warm-up nothing recompiles, and the run (two
    micro-batches per step, a LayerNorm trained by the fallback rule: AdamW, SGD, or
    one registered with ``register_fallback``, which gets the tensor ``lr`` too)
    equals eager."""
    if fallback == "registered":  # (removed after the test: tests/conftest.py)
        register_fallback(fallback, _decayed_sign_sgd)

    def setup() -> tuple[nn.Module, Any, torch.amp.GradScaler, Any]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        ).double()
        cls, kwargs = CONFIGS[name]
        optim = cls(  # type: ignore[call-arg]
            model,
            T=2,
            lr=0.1,
            lr_cov=lambda step: 0.1 / (1 + step),
            momentum=0.5,
            weight_decay=1e-2,
            fallback=fallback,
            **kwargs,
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        return model, optim, scaler, torch.optim.lr_scheduler.StepLR(optim, 1, gamma=0.8)

    data = _data(8)
    eager_model, eager, eager_scaler, eager_scheduler = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the inf step's warning)
        _train_live(eager_model, eager, data, eager_scaler, eager_scheduler, inf_at=5)
    torch_dynamo.reset()
    model, optim, scaler, scheduler = setup()
    backend = _counting_backend()
    optim.compile(backend=backend)
    _train_live(model, optim, data[:4], scaler, scheduler)  # warm-up
    warm = backend.frame_count
    assert 1 <= _graphs(backend) <= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_live(model, optim, data[4:], scaler, scheduler, inf_at=1)
    assert backend.frame_count == warm, "recompiled after the warm-up"
    assert scaler.get_scale() == eager_scaler.get_scale() == 2.0**16  # (7 growths, 1 halving)
    assert optim.steps == eager.steps == 7
    assert optim.param_groups[0]["lr"] == eager.param_groups[0]["lr"] != 0.1
    for got, want in zip(_all_state(model, optim), _all_state(eager_model, eager), strict=True):
        assert_close(got, want)


def test_a_rule_registered_for_a_float_lr_gets_a_float_when_compiled() -> None:
    """A rule that needs ``lr`` as a Python float is registered with ``tensor_lr=False``;
    the compiled step passes it the group's float (recompiling as ``lr`` changes) and
    equals eager."""

    def sqrt_sgd(
        params: list[torch.Tensor], grads: list[torch.Tensor], states: Any, config: Any, lr: Any
    ) -> None:
        assert isinstance(lr, float), type(lr)  # (checked while Dynamo traces the rule)
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=-math.sqrt(lr))

    register_fallback("sqrt-sgd", sqrt_sgd, tensor_lr=False)

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        model = model.double()
        optim: Any = SINGD(
            model, structures=("diagonal", "diagonal"), T=2, lr=0.1, fallback="sqrt-sgd"
        )
        if compiled:
            torch_dynamo.reset()
            optim.compile(backend="aot_eager")
        scheduler = torch.optim.lr_scheduler.StepLR(optim, 1, gamma=0.8)
        for X, y in _data(3):
            optim.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            optim.step()
            scheduler.step()
        return _all_state(model, optim)

    for got, want in zip(run(compiled=True), run(compiled=False), strict=True):
        assert_close(got, want)


@pytest.mark.parametrize(("name", "fallback"), [("diagonal", "sgd"), ("diagonal", "adamw")])
def test_bf16_parameters_round_as_eager(name: str, fallback: str) -> None:
    """bfloat16 parameters, ``lr`` scheduled: the compiled step's tensor η rounds μ − ηΔ
    as eager's ``alpha=η`` does (:func:`singd.functional.scalars.minus_scaled`), for the
    Kronecker layers and the fallback rule (SGD: the same function; AdamW: float32
    arithmetic), within :data:`~tests.tolerances.COMPILED_BF16_DIFFERING` and the
    bfloat16 round-off of the table."""

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(  # (every tensor a multiple of 64 elements: the tolerance)
            nn.Linear(8, 64),
            nn.LayerNorm(64),
            nn.Tanh(),
            nn.Linear(64, 64),
            nn.Tanh(),
            nn.Linear(64, 64),
        ).to(torch.bfloat16)
        cls, kwargs = CONFIGS[name]
        optim: Any = cls(  # type: ignore[call-arg]
            model,
            T=2,
            lr=0.05,
            lr_cov=0.05,
            momentum=0.5,
            weight_decay=1e-2,
            fallback=fallback,
            **kwargs,
        )
        if compiled:
            torch_dynamo.reset()
            optim.compile(backend="aot_eager")
        scheduler = torch.optim.lr_scheduler.StepLR(optim, 1, gamma=0.8)
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):  # refresh, plain, refresh with momenta, plain
            X = torch.randn(32, 8, generator=generator).to(torch.bfloat16)
            y = torch.randint(64, (32,), generator=generator)
            optim.zero_grad()
            nn.functional.cross_entropy(model(X).float(), y).backward()
            optim.step()
            scheduler.step()
        return _all_state(model, optim)

    got, want = run(compiled=True), run(compiled=False)
    differing = sum(int((a != b).sum()) for a, b in zip(got, want, strict=True))
    assert differing <= COMPILED_BF16_DIFFERING * sum(t.numel() for t in want)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


def _all_state(model: nn.Module, optim: Any) -> list[torch.Tensor]:
    """Parameters, factors and every per-parameter state tensor (momenta, AdamW's)."""
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [
        t.clone() for pre in optim.preconditioners.values() for t in pre.state_dict().values()
    ]
    return tensors + [
        t.clone() for p in model.parameters() for t in optim.state[p].values() if torch.is_tensor(t)
    ]


def _ddp_worker(rank: int, init: str, out: str) -> None:
    """One of 2 gloo ranks: the same 4 steps behind ``DistributedDataParallel``
    eagerly and compiled (float64, each rank half of every batch); then
    ``compile()`` with sharded factors, which must refuse."""
    import torch.distributed as dist

    from tests.test_distributed import WORLD, Net, batch, loss_fn, params, shard

    torch.set_num_threads(1)  # (two ranks share the machine's cores)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        results = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            model = nn.parallel.DistributedDataParallel(Net().double())
            cls, kwargs = CONFIGS["ingd"]
            optim: Any = cls(model, T=2, lr=0.05, momentum=0.5, lr_cov=0.05, **kwargs)  # type: ignore[call-arg]
            if compiled:
                torch_dynamo.reset()
                optim.compile(backend=_counting_backend())
            scheduler = torch.optim.lr_scheduler.StepLR(optim, 1, gamma=0.8)
            for step in range(4):
                X, y = batch(step)
                optim.zero_grad()
                loss_fn(model(shard(X, rank).double()), shard(y, rank), "batch").backward()
                optim.step()
                scheduler.step()
            results[compiled] = params(model)
        sharded = SINGD(Net().double(), distributed="sharded")
        try:
            sharded.compile(backend="aot_eager")
            refused = ""
        except ValueError as error:
            refused = str(error)
        torch.save(
            {"eager": results[False], "compiled": results[True], "refused": refused},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_compiled_step_on_two_ddp_ranks_equals_eager(tmp_path: Path) -> None:
    """Behind ``DistributedDataParallel`` (replicated factors: the reductions run
    before the graph) the compiled step equals the eager one on every rank; sharded
    factors, whose step communicates inside the graph, are refused with a clear error."""
    import torch.multiprocessing as mp

    from tests.test_distributed import WORLD, free_port

    mp.spawn(_ddp_worker, args=(f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["eager"].keys() == saved["compiled"].keys()
        for name, want in saved["eager"].items():
            assert_close(saved["compiled"][name], want)
        assert "compile() does not support the Sharded distribution strategy" in saved["refused"]


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
