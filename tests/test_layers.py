"""Every parameter of real models is trained: layer types, the fallback rule, the report."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from singd import KFAC, SINGD
from tests.helpers import TransformerBlock
from tests.tolerances import TRAJECTORY_FLOAT32, tolerance


def token_loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(0, 30, (4, 7), generator=gen)
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def image_loss(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(8, *shape, generator=gen)
    return nn.functional.cross_entropy(model(X), torch.randint(0, 5, (8,), generator=gen))


MODELS = {
    "transformer": (TransformerBlock, token_loss),
    "cnn-batchnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 5),
        ),
        lambda m, g: image_loss(m, (3, 6, 6), g),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3, stride=2, padding="valid", dilation=1),
            nn.ReLU(),
            nn.Conv1d(4, 4, 3, padding="same", groups=2),
            nn.Flatten(),
            nn.Linear(4 * 5, 5),
        ),
        lambda m, g: image_loss(m, (3, 11), g),
    ),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), nn.Flatten(), nn.LazyLinear(5)
        ),
        lambda m, g: image_loss(m, (2, 4, 4, 4), g),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_trains_with_defaults(name: str) -> None:
    build, loss_fn = MODELS[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build()
    loss_fn(model, gen)  # materialise lazy layers
    optim = SINGD(model, T=2, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        # only the transformer's attention projection is demoted (tested below)
        warnings.filterwarnings("ignore", message=".*forward hook never fired")
        for _ in range(3):
            optim.zero_grad()
            loss_fn(model, gen).backward()
            optim.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), f"{n} was not trained"


def test_transformer_registration_report() -> None:
    model = TransformerBlock()
    optim = SINGD(model, structures=("dense", "diagonal"))
    with pytest.warns(UserWarning, match=r"'attn\.out_proj'.*forward hook never fired"):
        optim.zero_grad()
        token_loss(model, torch.Generator().manual_seed(0)).backward()
        optim.step()
    rows = {line.split()[0]: " ".join(line.split()) for line in optim.describe().splitlines()}
    assert rows["mlp.0"].startswith("mlp.0 Linear weight, bias K: dense 17 float32, C: diagonal 32")
    assert rows["embed.weight"].startswith("embed.weight fallback adamw shared by layers 'embed'")
    assert rows["attn.in_proj_weight"].startswith(
        "attn.in_proj_weight fallback adamw MultiheadAttention has no Kronecker adapter"
    )
    assert "forward hook never fired" in rows["attn.out_proj.weight"]
    assert rows["norm1.weight"].startswith("norm1.weight fallback adamw LayerNorm")
    assert "head" not in rows  # its only parameter is the tied embedding
    report = optim.describe()
    assert "total optimizer state:" in report
    assert repr(optim).startswith("SINGD(\n")


def test_checkpoint_resume_with_fallback_and_demoted_layer() -> None:
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = TransformerBlock()
    optim = SINGD(model, T=2)
    with pytest.warns(UserWarning, match="out_proj"):
        for _ in range(3):
            optim.zero_grad()
            token_loss(model, gen_a).backward()
            optim.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = TransformerBlock()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optim = SINGD(resumed, T=2)
    resumed_optim.load_state_dict(checkpoint["optim"])
    gen_b.set_state(gen_a.get_state())
    for m, o, g in ((model, optim, gen_a), (resumed, resumed_optim, gen_b)):
        for _ in range(3):
            o.zero_grad()
            token_loss(m, g).backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_no_supported_layer_equals_adamw() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(6), nn.PReLU(), nn.BatchNorm1d(6))
    reference = nn.Sequential(nn.LayerNorm(6), nn.PReLU(), nn.BatchNorm1d(6))
    reference.load_state_dict(model.state_dict())
    kw = {"lr": 1e-2, "weight_decay": 1e-2}
    ours = SINGD(model, fallback_betas=(0.8, 0.99), fallback_eps=1e-6, **kw)
    theirs = torch.optim.AdamW(reference.parameters(), betas=(0.8, 0.99), eps=1e-6, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        X = torch.randn(16, 6, generator=gen)
        for m, o in ((model, ours), (reference, theirs)):
            o.zero_grad()
            m(X).sin().sum().backward()
            o.step()
    rtol, atol = TRAJECTORY_FLOAT32
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def test_sgd_fallback_equals_torch_sgd() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(6))
    reference = nn.Sequential(nn.LayerNorm(6))
    reference.load_state_dict(model.state_dict())
    kw = {"lr": 1e-2, "weight_decay": 1e-2, "momentum": 0.9}
    ours = SINGD(model, fallback="sgd", **kw)
    theirs = torch.optim.SGD(reference.parameters(), **kw)
    for _ in range(10):
        X = torch.randn(4, 6)
        for m, o in ((model, ours), (reference, theirs)):
            o.zero_grad()
            m(X).sin().sum().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance(torch.float32))


def test_embedding_equals_linear_on_one_hot_inputs() -> None:
    """An Embedding is a bias-free Linear on one-hot inputs with a diagonal K."""
    vocab, dim = 12, 5
    torch.manual_seed(0)
    embedding = nn.Embedding(vocab, dim, padding_idx=3).double()
    linear = nn.Linear(vocab, dim, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(embedding.weight.T)
    gen = torch.Generator().manual_seed(0)
    kw = {"structures": ("diagonal", "dense"), "T": 1, "lr": 0.1, "lr_cov": 0.1, "alpha1": 0.3}
    for approx in ("expand", "reduce"):
        emb_opt = SINGD(embedding, kfac_approx=approx, **kw)
        lin_opt = SINGD(linear, kfac_approx=approx, **kw)
        for _ in range(4):
            tokens = torch.randint(0, vocab, (6, 4), generator=gen)
            one_hot = nn.functional.one_hot(tokens, vocab).double()
            one_hot[tokens == 3] = 0.0  # the padding token contributes no statistics
            target = torch.randn(6, 4, dim, generator=gen, dtype=torch.float64)
            for module, opt, inputs in ((embedding, emb_opt, tokens), (linear, lin_opt, one_hot)):
                opt.zero_grad()
                # the padding row is zero and gets no gradient, so both outputs agree
                nn.functional.mse_loss(module(inputs), target).backward()
                opt.step()
        torch.testing.assert_close(embedding.weight.T, linear.weight, **tolerance(torch.float64))
        K_emb, K_lin = emb_opt.factors("").K, lin_opt.factors("").K
        torch.testing.assert_close(K_emb.to_dense(), K_lin.to_dense(), **tolerance(torch.float64))


def test_embedding_input_factor_is_always_diagonal() -> None:
    model = nn.Sequential(nn.Embedding(100, 4), nn.Linear(4, 2))
    optim = SINGD(model, structures=("dense", "dense"))
    model(torch.randint(0, 100, (3, 5))).sum().backward()
    optim.step()
    assert str(optim.factors("0").K.structure) == "diagonal"
    assert str(optim.factors("1").K.structure) == "dense"


def test_sparse_embedding_is_refused() -> None:
    with pytest.raises(ValueError, match="sparse=True"):
        SINGD(nn.Embedding(10, 3, sparse=True))


def test_kfac_sends_embeddings_to_the_fallback() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    optim = KFAC(model)
    assert "KFAC keeps dense factors; Embedding needs a diagonal input factor" in optim.describe()
    before = model[0].weight.detach().clone()
    model(torch.randint(0, 10, (3, 5))).sum().backward()
    optim.step()
    assert not torch.equal(before, model[0].weight)


def test_fallback_parameters_follow_param_groups_and_schedulers() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optim = SINGD(
        model,
        params=[
            {"params": list(model[0].parameters())},
            {"params": list(model[1].parameters()), "lr": 0.0, "fallback": "sgd"},
        ],
    )
    frozen = model[1].weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    optim.step()
    assert torch.equal(model[1].weight, frozen)  # its group's lr is 0


def test_each_layer_has_its_own_adapter_bound_to_its_module() -> None:
    """Adapters are registered as classes and bound to one module each."""
    from singd.layers import ConvAdapter, Layer, LinearAdapter
    from singd.optim.layer_registry import Layer as ReExported

    assert ReExported is Layer  # the old import path keeps working
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3), nn.Linear(3, 2))
    optim = SINGD(model)
    layers = optim.layers
    assert isinstance(layers["0"].adapter, ConvAdapter)
    assert isinstance(layers["2"].adapter, LinearAdapter)
    for name, layer in layers.items():
        assert isinstance(layer, Layer)
        assert layer.module is model.get_submodule(name)
        assert layer.adapter.module is layer.module
    assert layers["2"].adapter is not layers["3"].adapter
    assert layers["2"].adapter.factor_dims() == (9, 3)


def test_registering_an_adapter_instance_or_a_non_adapter_is_refused() -> None:
    from singd.layers import LinearAdapter, register_adapter, register_adapter_by_name

    with pytest.raises(TypeError, match=r"class, not an instance.*LinearAdapter"):
        register_adapter(nn.Linear, LinearAdapter(nn.Linear(2, 2)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LayerAdapter subclass"):
        register_adapter(nn.Linear, nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_adapter(int, LinearAdapter)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="class, not an instance"):
        register_adapter_by_name("pkg.mod.Layer", LinearAdapter(nn.Linear(2, 2)))  # type: ignore[arg-type]
