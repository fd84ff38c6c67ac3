"""What SINGD(model) covers: parametrized layers, the coverage warning, the state it will take."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from singd import KFAC, SINGD


class Symmetric(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu() + X.triu(1).T


def weight_norm_old(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in use
        return torch.nn.utils.weight_norm(module)


PARAMETRIZATIONS = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "register_parametrization": lambda m: parametrize.register_parametrization(
        m, "weight", Symmetric()
    ),
    "hook-based weight_norm": weight_norm_old,
}


@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
def test_parametrized_layer_trains_its_tensors_with_the_fallback(kind: str) -> None:
    """Factors precondition a weight matrix; a parametrized layer trains other tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    PARAMETRIZATIONS[kind](model[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the coverage warning (2/3 fallback)
        optim = SINGD(model, T=1)
    assert list(optim.layers) == ["2"]
    raw = list(model[0].parameters())
    assert raw and all(p in optim._registry.fallback_group for p in raw)
    assert "has a parametrized weight" in optim.describe()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optim.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optim.step()
    for p, q in zip(before, model.parameters(), strict=True):
        assert not torch.equal(p, q)


def test_one_warning_when_most_parameters_get_no_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(16, 2), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"Kronecker factors to 26\.2% of the 1,116") as caught:
        SINGD(model)
    (message,) = [str(w.message) for w in caught if "Kronecker factors to" in str(w.message)]
    assert "'1' (816 parameters: MultiheadAttention has no Kronecker adapter)" in message
    assert message.index("'1'") < message.index("'2'")  # biggest first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SINGD(model, warn_unsupported=False)
        SINGD(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))  # 72 of 88: covered


def total_bytes(optim: torch.optim.Optimizer) -> int:
    return int(re.search(r"total optimizer state: (\d+) bytes", optim.describe()).group(1))


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SINGD, {}),
        (SINGD, {"momentum": 0.0, "fallback": "sgd", "structures": ("diagonal", "dense")}),
        (SINGD, {"fallback": "sgd", "alpha1": 0.0}),
        (KFAC, {}),
    ],
)
def test_described_state_before_the_first_step_is_the_state_after_it(cls, kwargs) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    )
    optim = cls(model, T=1, **kwargs)
    before = total_bytes(optim)
    nn.functional.cross_entropy(
        model(torch.randn(4, 3, 6, 6)), torch.randint(0, 5, (4,))
    ).backward()
    optim.step()
    assert before == total_bytes(optim)
