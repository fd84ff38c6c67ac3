"""Options as data: str-Enums, group configurations validated once, layer plans,
per-layer preconditioner objects and the fallback-rule registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from singd.config import Fallback, KFACApprox, KFACConfig, LayerPlan, LossAverage, SINGDConfig
from singd.optim.fallback import available_fallbacks, register_fallback, scoped_registration
from singd.preconditioners import KFACPreconditioner, SINGDPreconditioner
from singd.structures import Diagonal


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


def run(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        X, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        optim.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optim.step()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_enum_members_and_plain_strings_give_the_same_trajectory() -> None:
    kwargs = {"T": 1, "loss_average": None, "kfac_approx": "reduce", "fallback": "sgd"}
    enums = {
        "T": 1,
        "loss_average": None,
        "kfac_approx": KFACApprox.REDUCE,
        "fallback": Fallback.SGD,
    }
    a, b = mlp(), mlp()
    oa, ob = SINGD(a, **kwargs), SINGD(b, **enums)
    run(a, oa)
    run(b, ob)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    # the groups (and so the checkpoints) hold the plain values
    group = ob.param_groups[0]
    assert type(group["kfac_approx"]) is str and type(group["fallback"]) is str
    assert ob.state_dict()["param_groups"][0]["kfac_approx"] == "reduce"


def test_group_is_validated_once_into_a_frozen_config() -> None:
    optim = SINGD(mlp(), structures=("diagonal", "dense"), loss_average="batch+sequence")
    config = optim._config(0)
    assert isinstance(config, SINGDConfig)
    assert config.loss_average is LossAverage.BATCH_SEQUENCE
    assert config.structures[0] == Diagonal()
    with pytest.raises(AttributeError):
        config.damping = 1.0  # type: ignore[misc]
    assert optim._config(0) is config  # not re-parsed while the group is unchanged
    assert isinstance(KFAC(mlp())._config(0), KFACConfig)


def test_each_layer_gets_its_plan_and_preconditioner_at_registration() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    optim = SINGD(model, structures=("dense", "diagonal"), preconditioner_dtype=("float64", None))
    pre = optim.preconditioners["0"]
    assert isinstance(pre, SINGDPreconditioner)
    plan = pre.plan
    assert isinstance(plan, LayerPlan)
    # the embedding's K is diagonal whatever the group asks for
    assert str(plan.structure_K) == "diagonal" and str(plan.structure_C) == "diagonal"
    assert (plan.d_K, plan.d_C, plan.dtype_K, plan.dtype_C) == (10, 4, torch.float64, None)
    assert pre.dtype_C == torch.float32  # None: the weight's dtype
    assert str(optim.preconditioners["2"].plan.structure_K) == "dense"
    kfac = KFAC(nn.Sequential(nn.Linear(4, 3)))
    assert isinstance(kfac.preconditioners["0"], KFACPreconditioner)


def test_an_edited_group_takes_effect_at_the_next_step() -> None:
    """Options other than lr and lr_cov are cached, but editing the dict is honoured
    (torch.optim convention: e.g. OneCycleLR cycles ``momentum``)."""
    a, b = mlp(), mlp()
    edited, fresh = SINGD(a, momentum=0.9, T=1), SINGD(b, momentum=0.5, damping=1e-2, T=1)
    edited.param_groups[0]["momentum"] = 0.5
    edited.param_groups[0]["damping"] = 1e-2
    run(a, edited)
    run(b, fresh)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert edited._config(0).momentum == 0.5


def test_an_invalid_edit_is_rejected_with_the_valid_choices() -> None:
    model = mlp()
    optim = SINGD(model)
    optim.param_groups[0]["kfac_approx"] = "sideways"
    with pytest.raises(ValueError, match=r"Valid: \('expand', 'reduce'\)"):
        run(model, optim, steps=1)


def test_preconditioners_are_dropped_with_their_layer_and_checkpointed_by_name() -> None:
    model = mlp()
    optim = SINGD(model, T=1)
    run(model, optim, steps=2)
    pre = optim.preconditioners["3"]
    assert not pre.has_statistics()  # consumed by the refresh
    assert set(pre.state_dict()) == {"K.mat", "C.mat", "m_K.mat", "m_C.mat"}
    saved = copy.deepcopy(optim.state_dict())
    assert saved["singd"]["layers"]["3"].keys() == pre.state_dict().keys()
    optim._demote("3", "test")
    assert (
        "3" not in optim.preconditioners and "3" in optim.state_dict()["singd"]["fallback_layers"]
    )


def sign_sgd(params, grads, states, config, lr) -> None:
    for p, g in zip(params, grads, strict=True):
        p.add_(g.sign(), alpha=-lr)


def test_a_registered_fallback_rule_trains_the_parameters_without_factors() -> None:
    with scoped_registration():
        register_fallback("signsgd", sign_sgd)
        assert "signsgd" in available_fallbacks()
        model = mlp()
        optim = SINGD(model, fallback="signsgd", lr=0.1)
        norm = model[1].weight
        before = norm.detach().clone()
        run(model, optim, steps=1)
        assert norm.grad is not None
        torch.testing.assert_close(norm.detach(), before - 0.1 * norm.grad.sign())
    assert "signsgd" not in available_fallbacks()
    with pytest.raises(ValueError, match=r"Invalid fallback 'signsgd'\. Valid: \('adamw', 'sgd'"):
        SINGD(mlp(), fallback="signsgd")
    with pytest.raises(TypeError, match="callable"):
        register_fallback("broken", None)  # type: ignore[arg-type]


def test_scoped_registration_restores_a_replaced_adapter() -> None:
    from singd.layers import LinearAdapter, adapter_class, find_adapter, register_adapter
    from singd.layers import scoped_registration as scoped_adapters

    class Replacement(LinearAdapter):
        pass

    assert adapter_class(nn.Linear) is LinearAdapter
    with scoped_adapters():
        register_adapter(nn.Linear, Replacement)
        assert adapter_class(nn.Linear) is Replacement
        assert type(find_adapter(nn.Linear(2, 2))) is Replacement
    assert adapter_class(nn.Linear) is LinearAdapter


#: The published SINGD's constructor defaults (the poster's code relies on them).
PUBLISHED_SINGD_DEFAULTS = {
    "lr": 0.001,
    "momentum": 0.9,
    "damping": 0.001,
    "alpha1": 0.5,
    "weight_decay": 0.0,
    "T": 10,
    "loss_average": "batch",
    "lr_cov": 1e-2,
    "structures": ("dense", "dense"),
    "kfac_approx": "expand",
    "warn_unsupported": True,
    "kfac_like": False,
    "preconditioner_dtype": (None, None),
    "init_grad_scale": 1.0,
    "normalize_lr_cov": False,
}


def test_constructors_show_every_option_with_its_default_and_docs() -> None:
    """The shared options are defined once, yet both signatures list every keyword."""
    import inspect

    from singd.optim.options import SHARED_OPTIONS

    signatures = {cls: inspect.signature(cls).parameters for cls in (SINGD, KFAC)}
    for cls, params in signatures.items():
        assert list(params)[:2] == ["model", "params"]
        assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[2:])
        for name, (default, _) in SHARED_OPTIONS.items():
            assert params[name].default == default, (cls, name)
        for name in list(params)[2:]:  # every keyword has an Args entry
            assert f"\n        {name}: " in (cls.__doc__ or ""), (cls, name)
        assert "<shared options>" not in (cls.__doc__ or "")
    for name, default in PUBLISHED_SINGD_DEFAULTS.items():
        assert signatures[SINGD][name].default == default, name
    assert signatures[KFAC]["inverse_dtype"].default is torch.float32
    assert "lr: 'float' = 0.001" in str(inspect.signature(SINGD))


def test_every_keyword_reaches_the_group_or_the_optimizer() -> None:
    from singd.optim import optimizer

    optim = optimizer.SINGD(mlp(), kfac_like=False, structures=("dense", "diagonal"))
    assert optim.defaults["structures"] == ("dense", "diagonal")
    kw = {"lr": 0.05, "momentum": 0.5, "damping": 0.01, "weight_decay": 1e-3, "T": 3}
    kw |= {"loss_average": None, "lr_cov": 0.02, "kfac_approx": "reduce", "kl_clip": 0.1}
    kw |= {"fallback": "sgd", "fallback_betas": (0.8, 0.9), "fallback_eps": 1e-6}
    for cls, own in ((SINGD, {"alpha1": 0.1, "normalize_lr_cov": True}), (KFAC, {})):
        optim = cls(mlp(), warn_unsupported=False, init_grad_scale=4.0, **kw, **own)
        group = optim.param_groups[0]
        for name, value in {**kw, **own}.items():
            assert group[name] == value, (cls, name)
        assert "warn_unsupported" not in group and "distributed" not in group


def test_an_unknown_keyword_names_the_valid_options() -> None:
    with pytest.raises(TypeError, match=r"'lrr'; its options are: lr, momentum, .*alpha1"):
        SINGD(mlp(), lrr=0.1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"its options are: .*factor_dtype, inverse_dtype"):
        KFAC(mlp(), alpha1=0.1)  # type: ignore[call-arg]


def test_no_source_file_outside_the_cli_is_above_400_lines() -> None:
    """The house rule that keeps each file about one idea (issue 16)."""
    from pathlib import Path

    import singd

    root = Path(singd.__file__).parent
    long = {
        str(path.relative_to(root)): n
        for path in root.rglob("*.py")
        if "cli" not in path.relative_to(root).parts
        and (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, long
