"""The optimizer as torch.optim users meet it: conventions, checkpoints and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.helpers import assert_same_params, batches, cnn, train, twin_cnns

HYPER = {"lr": 5e-3, "damping": 1e-3, "weight_decay": 1e-2, "lr_cov": 1e-2, "T": 1}


def test_poster_snippet_runs_and_trains() -> None:
    torch.manual_seed(0)
    model, loss_func = cnn(), nn.CrossEntropyLoss()
    X, y = batches(1, 32)[0]
    optim = SINGD(model, kfac_like=False, structures=("dense", "diagonal"))
    before = [p.detach().clone() for p in model.parameters()]
    optim.zero_grad()
    loss_func(model(X), y).backward()
    optim.step()
    for p, q in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p, q)
        assert torch.isfinite(p).all()


def test_import_paths() -> None:
    import singd
    from singd.optim import optimizer

    assert singd.SINGD is optimizer.SINGD


def test_checkpoint_is_keyed_by_module_names() -> None:
    model = cnn()
    optim = SINGD(model, T=1)
    train(model, optim, batches(1))
    layers = optim.state_dict()["singd"]["layers"]
    assert set(layers) == {"0", "3", "5"}
    assert set(layers["3"]) == {"K.mat", "C.mat", "m_K.mat", "m_C.mat"}


def test_published_attribute_names_view_the_factors() -> None:
    model = cnn()
    optim = SINGD(model, T=1, structures=("dense", "diagonal"))
    train(model, optim, batches(1))
    assert set(optim.Ks) == set(optim.Cs) == set(optim.m_Ks) == set(optim.m_Cs) == {"0", "3", "5"}
    assert optim.Ks["3"] is optim.factors("3").K
    assert optim.Cs["3"].to_dense().shape == (20, 20)
    assert not SINGD(cnn(), kfac_like=True, alpha1=0.0).m_Ks


def test_checkpoint_with_other_structures_is_refused() -> None:
    model = cnn()
    optim = SINGD(model, T=1)
    train(model, optim, batches(1))
    other = SINGD(cnn(), structures=("diagonal", "dense"))
    with pytest.raises(ValueError, match="structures"):
        other.load_state_dict(optim.state_dict())
    with pytest.raises(ValueError, match="not saved by SINGD"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=1.0).state_dict())


def test_inplace_activations_match_out_of_place() -> None:
    data = batches(8)
    torch.manual_seed(0)
    plain, inplace = cnn(), cnn(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    train(plain, SINGD(plain, **HYPER), data)
    train(inplace, SINGD(inplace, **HYPER), data)
    assert_same_params(plain, inplace, exact=True)


def test_no_grad_forward_is_ignored() -> None:
    data = batches(4)
    a, b = twin_cnns()
    train(a, SINGD(a, **HYPER), data)
    optim = SINGD(b, **HYPER)
    for X, y in data:
        optim.zero_grad()
        with torch.no_grad():
            b(torch.randn_like(X))  # e.g. an evaluation pass: must not add statistics
        nn.functional.cross_entropy(b(X), y).backward()
        optim.step()
    assert_same_params(a, b, exact=True)


def test_add_param_group_registers_new_layers() -> None:
    model = cnn()
    optim = SINGD(model, params=list(model[0].parameters()), T=1)
    optim.add_param_group(
        {"params": list(model[3].parameters()), "structures": ("diagonal", "dense")}
    )
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optim, batches(2))
    changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)]
    assert changed == [True, True, True, True, False, False]  # layer 5 is in no group
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.add_param_group({"params": [model[3].weight, model[3].bias]})


def test_kfac_like_forces_alpha1_to_zero_without_momentum_buffers() -> None:
    model = cnn()
    with pytest.warns(UserWarning, match="alpha1"):
        optim = SINGD(model, kfac_like=True, alpha1=0.5, T=1)
    train(model, optim, batches(2))
    state = optim.factors("3")
    assert state.m_K is None and state.m_C is None


def test_unsupported_parameters_warn() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.BatchNorm1d(4)), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"will not train: 1\.0\.weight \(BatchNorm1d has no"):
        SINGD(model, fallback=None)


def test_kfac_trains() -> None:
    torch.manual_seed(0)
    model = cnn()
    optim = KFAC(model, lr=2e-2, T=2, damping=1e-1, lr_cov=0.3)
    data = batches(1, 64) * 30
    X, y = data[0]
    first = nn.functional.cross_entropy(model(X), y).item()
    train(model, optim, data)
    assert nn.functional.cross_entropy(model(X), y).item() < 0.5 * first


# --- errors -------------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[dict[str, object], type[Exception], str]] = [
    (
        {"structures": ("dense", "triangle")},
        ValueError,
        r"Unknown structure 'triangle'.*dense.*diagonal",
    ),
    ({"structures": "dense"}, ValueError, "pair"),
    ({"kfac_approx": "expanded"}, ValueError, r"kfac_approx.*'expand', 'reduce'"),
    ({"loss_average": "mean"}, ValueError, r"loss_average.*None, 'batch', 'batch\+sequence'"),
    ({"lr": -1.0}, ValueError, r"lr \(β₂\) must be a number ≥ 0, got -1.0"),
    ({"damping": math.nan}, ValueError, r"damping \(λ\) must be a number > 0, got nan"),
    ({"momentum": math.inf}, ValueError, r"momentum \(α₂\) must be a number in \[0, 1\)"),
    ({"alpha1": -0.5}, ValueError, "alpha1"),
    ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
    ({"lr_cov": -1e-2}, ValueError, "lr_cov"),
    ({"T": 0}, ValueError, "T must be an integer ≥ 1, got 0"),
    ({"T": 2.5}, TypeError, "T must be an integer ≥ 1, got 2.5"),
    ({"lr": "fast"}, TypeError, r"lr \(β₂\) must be a number ≥ 0, got 'fast'"),
    ({"preconditioner_dtype": (torch.int32, None)}, ValueError, "preconditioner_dtype.*float32"),
    ({"init_grad_scale": 0.0}, ValueError, "init_grad_scale"),
    ({"kfac_like": "yes"}, TypeError, "kfac_like must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_invalid_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SINGD(cnn(), **kwargs)


def test_invalid_argument_in_a_param_group() -> None:
    model = cnn()
    with pytest.raises(ValueError, match="kfac_approx"):
        SINGD(model, params=[{"params": list(model.parameters()), "kfac_approx": "bogus"}])


def test_layer_split_across_groups() -> None:
    model = cnn()
    with pytest.raises(ValueError, match="same param group"):
        SINGD(model, params=[{"params": [model[0].weight]}, {"params": [model[0].bias]}])


def test_parameter_of_unsupported_layer() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"'1\.weight' cannot get Kronecker factors \(LayerNorm"):
        SINGD(model, params=list(model.parameters()), fallback=None)
    with pytest.raises(ValueError, match=r"Invalid fallback 'adam'.*'adamw', 'sgd', None"):
        SINGD(model, fallback="adam")


def test_wrapped_model_is_refused() -> None:
    with pytest.raises(TypeError, match="DataParallel is not supported"):
        SINGD(nn.DataParallel(cnn()))


def test_step_without_backward_at_refresh_step() -> None:
    model = cnn()
    optim = SINGD(model, T=1)
    train(model, optim, batches(1))
    with pytest.raises(RuntimeError, match="no backward pass ran"):
        optim.step()  # the gradients are stale: no statistics since the last step


def test_step_with_gradients_from_before_the_optimizer() -> None:
    model = cnn()
    X, y = batches(1)[0]
    nn.functional.cross_entropy(model(X), y).backward()
    optim = SINGD(model, T=1)
    with pytest.raises(RuntimeError, match="no backward pass ran"):
        optim.step()


def test_bypassed_layer_moves_to_fallback_with_one_warning() -> None:
    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.bypassed = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x) @ self.bypassed.weight.T  # weight used without calling the layer

    model = Bypass()
    optim = SINGD(model, T=1)
    before = model.bypassed.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'bypassed' \(Linear\).*forward hook never fired"):
        model(torch.randn(8, 4)).square().sum().backward()
        optim.step()
    assert not torch.equal(model.bypassed.weight, before)
    assert "bypassed.weight  fallback  adamw" in optim.describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again
        optim.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        optim.step()
