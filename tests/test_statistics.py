r"""The Kronecker statistics :math:`A`, :math:`G_m` against independent references (spec §4, §8).

1. **Exactness for deep linear networks with a squared-error loss.** There the
   layer-wise GGN is exactly Kronecker, so :math:`G \otimes U` from the library's
   :math:`A` and :math:`G_m` must equal the GGN block computed from per-sample
   Jacobians (``torch.func.vmap(jacrev)``), bias column included (Bernacchia et al.
   2018; Eschenhagen et al. 2023): KFAC-expand when every position is a loss term,
   KFAC-reduce when the model averages over positions before the loss, for summed
   and averaged losses. The output gradients are those of *pseudo-losses* whose
   per-term residual is replaced by a column of the loss Hessian's square root,
   reduced like the loss (the scaling the library expects from real gradients).
2. **Convolution patches** of ``ConvAdapter`` against ``F.unfold`` (Conv2d, also
   for Conv1d as a Conv2d with a unit dimension) and explicit loops (Conv3d), with
   groups, stride, dilation, asymmetric ``"same"`` padding and padding modes; the
   references first prove that they reproduce the layer's own output.
3. ``input_matrix`` / ``grad_output_matrix`` / ``input_diagonal`` against the
   oracle's transcription of spec §4.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from singd import KFAC
from singd.layers import find_adapter, grad_output_matrix, input_matrix
from tests.reference.dense_singd import Hyper, conv_patches, statistics
from tests.tolerances import assert_close

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


# --- 1. exactness on deep linear networks -------------------------------------------
class ToPositions(nn.Module):
    """``[B, C, H, W]`` → ``[B, H·W, C]``: conv output locations become positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


class MeanOver(nn.Module):
    """Average over the given dimensions (weight sharing collapsed before the loss)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(self.dims)


@dataclasses.dataclass(frozen=True)
class LinearProblem:
    """A linear network, its per-sample input shape, and the matching KFAC flavour.

    ``positions`` tells whether the model output has a position axis whose entries
    are separate loss terms (then ``"batch+sequence"`` averages over them).
    """

    make: Callable[[bool], nn.Module]
    input_shape: tuple[int, ...]
    approx: str
    positions: bool


LINEAR_PROBLEMS = {
    "single-linear": LinearProblem(lambda b: nn.Linear(4, 3, bias=b), (4,), "expand", False),
    "single-linear-reduce": LinearProblem(lambda b: nn.Linear(4, 3, bias=b), (4,), "reduce", False),
    "deep-linear": LinearProblem(
        lambda b: nn.Sequential(
            nn.Linear(4, 5, bias=b), nn.Linear(5, 3, bias=b), nn.Linear(3, 2, bias=b)
        ),
        (4,),
        "expand",
        False,
    ),
    "sequence-expand": LinearProblem(
        lambda b: nn.Sequential(
            nn.Linear(4, 5, bias=b), nn.Linear(5, 3, bias=b), nn.Linear(3, 2, bias=b)
        ),
        (3, 4),
        "expand",
        True,
    ),
    "sequence-reduce": LinearProblem(
        lambda b: nn.Sequential(
            nn.Linear(4, 5, bias=b), nn.Linear(5, 3, bias=b), MeanOver(1), nn.Linear(3, 2, bias=b)
        ),
        (3, 4),
        "reduce",
        False,
    ),
    "conv-linear-expand": LinearProblem(
        lambda b: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=b), ToPositions(), nn.Linear(3, 2, bias=b)
        ),
        (2, 5, 4),
        "expand",
        True,
    ),
    "conv-linear-reduce": LinearProblem(
        lambda b: nn.Sequential(
            nn.Conv2d(2, 3, (2, 3), dilation=(2, 1), padding=1, bias=b),
            MeanOver(2, 3),
            nn.Linear(3, 2, bias=b),
        ),
        (2, 5, 4),
        "reduce",
        False,
    ),
}


def loss_averages(problem: LinearProblem) -> list[str | None]:
    """The loss reductions KFAC is exact for: sum, mean over batch, (mean over all terms)."""
    return [None, "batch", "batch+sequence"] if problem.positions else [None, "batch"]


EXACT_CASES = [
    pytest.param(name, loss_average, bias, id=f"{name}-{loss_average}-bias{int(bias)}")
    for name, problem in LINEAR_PROBLEMS.items()
    for loss_average in loss_averages(problem)
    for bias in (True, False)
]


def num_terms(out: Tensor, loss_average: str | None) -> int:
    """What the loss divides by: 1, the batch size, or every (sample, position) term."""
    return {None: 1, "batch": out.shape[0], "batch+sequence": out[..., 0].numel()}[loss_average]


def kron_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers with Kronecker factors."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def exact_ggn_blocks(model: nn.Module, X: Tensor, loss_average: str | None) -> dict[str, Tensor]:
    r"""Per layer, the GGN of :math:`L = \frac1N\sum_\text{terms}\|f - y\|^2` w.r.t. ``[W|b]``.

    The Hessian of :math:`L` w.r.t. the output is :math:`(2/N) I`, so the block is
    :math:`\frac2N \sum_n J_n^\top J_n` with per-sample Jacobians :math:`J_n`; columns
    follow the row-major flattening of :math:`[W \,|\, b]`.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    divisor = num_terms(model(X), loss_average)

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, X)  # name -> [B, *out, *param]
    blocks = {}
    for name, m in kron_layers(model).items():
        J_W = jac[f"{name}.weight" if name else "weight"]
        n_out = J_W[0].numel() // m.weight.numel()
        J = J_W.reshape(X.shape[0], n_out, m.weight.shape[0], -1)
        if m.bias is not None:
            J_b = jac[f"{name}.bias" if name else "bias"].reshape(*J.shape[:3], 1)
            J = torch.cat([J, J_b], dim=3)
        J = J.flatten(2)  # [B, n_out, d_o·d_i], row-major [W | b]
        blocks[name] = 2.0 / divisor * torch.einsum("bop,boq->pq", J, J)
    return blocks


def library_kronecker(
    model: nn.Module, X: Tensor, approx: str, loss_average: str | None
) -> dict[str, tuple[Tensor, Tensor]]:
    r"""``(U, G)`` per layer from the library's ``input_matrix`` / ``grad_output_matrix``.

    :math:`G` sums over the output dimensions :math:`c` the statistics of the
    pseudo-loss :math:`\frac1N\sum_\text{terms}\sqrt2 f_c` (residual replaced by the
    column :math:`\sqrt2 e_c` of the Hessian square root of :math:`\|f-y\|^2`).
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []
    for name, m in kron_layers(model).items():

        def hook(m: nn.Module, args: tuple[Tensor], out: Tensor, name: str = name) -> None:
            inputs[name], outputs[name] = args[0].detach(), out

        handles.append(m.register_forward_hook(hook))
    out = model(X)
    for h in handles:
        h.remove()
    divisor = num_terms(out, loss_average)
    names = list(outputs)
    G = {name: 0.0 for name in names}
    for c in range(out.shape[-1]):
        pseudo_loss = math.sqrt(2.0) * out[..., c].sum() / divisor
        grads = torch.autograd.grad(pseudo_loss, [outputs[n] for n in names], retain_graph=True)
        for name, g in zip(names, grads, strict=True):
            module = dict(model.named_modules())[name]
            Gm = grad_output_matrix(find_adapter(module), g, approx, loss_average)
            G[name] = G[name] + Gm.T @ Gm
    result = {}
    for name in names:
        module = dict(model.named_modules())[name]
        A = input_matrix(find_adapter(module), inputs[name], approx)
        result[name] = (A.T @ A, G[name])
    return result


@pytest.mark.parametrize(("problem", "loss_average", "bias"), EXACT_CASES)
def test_kronecker_equals_exact_ggn(problem: str, loss_average: str | None, bias: bool) -> None:
    """:math:`G \\otimes U` equals the exact GGN block of every layer."""
    prob = LINEAR_PROBLEMS[problem]
    torch.manual_seed(0)
    model = prob.make(bias).double()
    X = torch.randn(4, *prob.input_shape, dtype=F64)
    exact = exact_ggn_blocks(model, X, loss_average)
    for name, (U, G) in library_kronecker(model, X, prob.approx, loss_average).items():
        assert_close(torch.kron(G, U), exact[name], msg=f"layer {name!r}")


def test_exactness_needs_the_matching_flavour() -> None:
    """The check discriminates: KFAC-expand is *not* exact when positions are averaged."""
    prob = LINEAR_PROBLEMS["sequence-reduce"]
    torch.manual_seed(0)
    model = prob.make(True).double()
    X = torch.randn(4, *prob.input_shape, dtype=F64)
    exact = exact_ggn_blocks(model, X, "batch")
    U, G = library_kronecker(model, X, "expand", "batch")["0"]
    error = (torch.kron(G, U) - exact["0"]).norm() / exact["0"].norm()
    assert error > 1e-2


@pytest.mark.parametrize(
    ("problem", "loss_average"),
    [("deep-linear", "batch"), ("sequence-expand", "batch+sequence"), ("conv-linear-reduce", None)],
)
def test_kfac_optimizer_statistics_are_exact(problem: str, loss_average: str | None) -> None:
    """The optimizer's own hooks: with β₁ = 1 one KFAC refresh sets S_K = U, S_C = G.

    With a single output, one backward pass of the pseudo-loss yields the whole G,
    so ``S_C ⊗ S_K`` must be the exact GGN block.
    """
    prob = LINEAR_PROBLEMS[problem]
    torch.manual_seed(0)
    model = prob.make(True)
    last = list(kron_layers(model).values())[-1]
    last.out_features = 1  # one output: shrink the last layer
    last.weight = nn.Parameter(last.weight[:1].detach().clone())
    last.bias = nn.Parameter(last.bias[:1].detach().clone())
    model = model.double()
    X = torch.randn(4, *prob.input_shape, dtype=F64)
    exact = exact_ggn_blocks(model, X, loss_average)
    opt = KFAC(
        model, lr=0.0, lr_cov=1.0, T=1, kfac_approx=prob.approx, loss_average=loss_average,
        inverse_dtype=F64,
    )  # fmt: skip
    out = model(X)
    (math.sqrt(2.0) * out.sum() / num_terms(out, loss_average)).backward()
    opt.step()
    for name in kron_layers(model):
        state = opt.layer_state(name)
        assert_close(torch.kron(state["S_C"], state["S_K"]), exact[name], msg=f"layer {name!r}")


# --- 2. convolution patches ------------------------------------------------------------
def reproduces_output(module: nn.Module, patches: Tensor, x: Tensor) -> None:
    """The reference patches (groups=1) give the layer's output as ``W @ patch + b``."""
    y = patches @ module.weight.flatten(1).T
    if module.bias is not None:
        y = y + module.bias
    expected = module(x).flatten(2).transpose(1, 2)
    assert_close(y, expected, msg="reference patches do not reproduce the convolution")


CONV2D_CONFIGS = {
    "stride-int-padding": {"kernel_size": 3, "stride": 2, "padding": 1},
    "tuple-dilation-stride": {
        "kernel_size": (2, 3),
        "dilation": (2, 1),
        "padding": (1, 0),
        "stride": (1, 2),
    },
    "same-even-kernel": {"kernel_size": 4, "padding": "same"},
    "same-asymmetric-dilated": {"kernel_size": (2, 3), "padding": "same", "dilation": (3, 1)},
    "valid-dilated": {"kernel_size": 3, "padding": "valid", "dilation": 2},
    "reflect": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    "circular": {"kernel_size": 3, "padding": 2, "stride": 2, "padding_mode": "circular"},
    "same-circular": {"kernel_size": (4, 2), "padding": "same", "padding_mode": "circular"},
    "replicate-no-bias": {
        "kernel_size": 2,
        "padding": (1, 2),
        "padding_mode": "replicate",
        "bias": False,
    },
}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("config", list(CONV2D_CONFIGS))
def test_conv2d_patches(config: str, groups: int) -> None:
    """Expand patches = ``F.unfold``; reduce = their mean over output locations."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, groups=groups, **CONV2D_CONFIGS[config]).double()
    x = torch.randn(2, 4, 7, 6, dtype=F64)
    reference = conv_patches(conv, x)
    if groups == 1:
        reproduces_output(conv, reference, x)
    else:  # group-averaged channels = mean of the per-group patches
        c = 4 // groups
        single = nn.Conv2d(c, 6, **CONV2D_CONFIGS[config]).double()
        parts = [conv_patches(single, x[:, j * c : (j + 1) * c]) for j in range(groups)]
        assert_close(reference, torch.stack(parts).mean(0))
    adapter = find_adapter(conv)
    assert_close(adapter.shared_inputs(x), reference)
    assert_close(adapter.reduced_inputs(x), reference.mean(1))


def conv1d_as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The same layer as a Conv2d over ``[B, C, 1, L]``."""
    padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
    conv2d = nn.Conv2d(
        conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]), stride=(1, conv.stride[0]),
        padding=padding, dilation=(1, conv.dilation[0]), groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    ).double()  # fmt: skip
    with torch.no_grad():
        conv2d.weight.copy_(conv.weight.unsqueeze(2))
        if conv.bias is not None:
            conv2d.bias.copy_(conv.bias)
    return conv2d


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": 4, "padding": "same", "groups": 2},
        {"kernel_size": 2, "dilation": 3, "padding": "same", "padding_mode": "reflect"},
        {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "groups": 2, "bias": False},
    ],
    ids=["stride", "same-even-groups", "same-dilated-reflect", "circular-groups"],
)
def test_conv1d_patches(kwargs: dict[str, Any]) -> None:
    """Conv1d patches = those of the equivalent Conv2d with a unit height."""
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, **kwargs).double()
    x = torch.randn(2, 4, 9, dtype=F64)
    conv2d = conv1d_as_conv2d(conv)
    assert_close(conv2d(x.unsqueeze(2)).squeeze(2), conv(x), msg="not the same layer")
    reference = conv_patches(conv2d, x.unsqueeze(2))
    adapter = find_adapter(conv)
    assert_close(adapter.shared_inputs(x), reference)
    assert_close(adapter.reduced_inputs(x), reference.mean(1))


def conv3d_patches_by_loops(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``[B, O1·O2·O3, c·k1·k2·k3]`` by explicit loops (channel-major, offsets row-major)."""
    if isinstance(conv.padding, str):
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        pads = [(t // 2, t - t // 2) if conv.padding == "same" else (0, 0) for t in totals]
    else:
        pads = [(p, p) for p in conv.padding]
    B, C_in = x.shape[:2]
    x = x.reshape(B, conv.groups, C_in // conv.groups, *x.shape[2:]).mean(1)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, [p for pair in reversed(pads) for p in pair], mode=mode)
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    outs = [(x.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    rows = []
    for o in itertools.product(*(range(n) for n in outs)):
        patch = [
            x[:, ch, o[0] * s[0] + i * d[0], o[1] * s[1] + j * d[1], o[2] * s[2] + m * d[2]]
            for ch in range(x.shape[1])
            for i, j, m in itertools.product(*(range(n) for n in k))
        ]
        rows.append(torch.stack(patch, dim=1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": (2, 3, 2), "stride": (1, 2, 1), "padding": (1, 0, 1)},
        {"kernel_size": 2, "padding": "same", "dilation": (1, 2, 1), "groups": 2},
        {"kernel_size": (3, 2, 2), "padding": 1, "padding_mode": "circular", "bias": False},
    ],
    ids=["tuple-stride", "same-groups", "circular"],
)
def test_conv3d_patches(kwargs: dict[str, Any]) -> None:
    """Conv3d patches = explicit loops (which reproduce the output for groups=1)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 4, **kwargs).double()
    x = torch.randn(2, 2, 4, 5, 4, dtype=F64)
    reference = conv3d_patches_by_loops(conv, x)
    if conv.groups == 1:
        reproduces_output(conv, reference, x)
    adapter = find_adapter(conv)
    assert_close(adapter.shared_inputs(x), reference)
    assert_close(adapter.reduced_inputs(x), reference.mean(1))


# --- 3. processing (expand/reduce, bias column, scaling) against the oracle -------------
PROCESSING_LAYERS = {
    "linear-2-shared-dims": (lambda b: nn.Linear(3, 4, bias=b), (2, 3, 5, 3), (2, 3, 5, 4)),
    "linear-no-shared-dims": (lambda b: nn.Linear(3, 4, bias=b), (5, 3), (5, 4)),
    "conv2d-groups": (
        lambda b: nn.Conv2d(4, 6, 3, stride=2, padding="valid", groups=2, bias=b),
        (3, 4, 7, 6),
        (3, 6, 3, 2),
    ),
    # more channels than output columns: the channels-last branch of the patch matrix
    "conv2d-many-channels": (
        lambda b: nn.Conv2d(5, 3, 2, padding=1, bias=b),
        (2, 5, 3, 3),
        (2, 3, 4, 4),
    ),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("layer", list(PROCESSING_LAYERS))
def test_processing_matches_oracle(
    layer: str, approx: str, loss_average: str | None, bias: bool
) -> None:
    """``input_matrix``, ``grad_output_matrix`` and ``input_diagonal`` vs spec §4."""
    make, x_shape, g_shape = PROCESSING_LAYERS[layer]
    torch.manual_seed(0)
    module = make(bias).double()
    x, g = torch.randn(x_shape, dtype=F64), torch.randn(g_shape, dtype=F64)
    A, Gm = statistics(module, x, g, Hyper(kfac_approx=approx, loss_average=loss_average))
    adapter = find_adapter(module)
    assert_close(input_matrix(adapter, x, approx), A)
    assert_close(grad_output_matrix(adapter, g, approx, loss_average), Gm)
    assert_close(adapter.input_diagonal(x, approx), (A * A).sum(0))
