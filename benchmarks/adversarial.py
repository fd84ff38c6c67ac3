"""Adversarial run (issue 14): many bad inputs, and what the library made of each.

Every input is one case; each case ends in exactly one outcome:

* ``clear error`` — refused with a ``TypeError``/``ValueError``/``RuntimeError`` (or, for
  the command, exit status 2 without a traceback) whose message names what was wrong;
* ``handled`` — accepted and dealt with as documented: a non-finite step skipped whole
  with a warning, a valid edge value that trains, an unused layer that keeps its factors,
  a parameter that trains;
* ``unclear error`` — refused, but the message does not name the problem (or a traceback);
* ``silent failure`` — accepted without a word, and wrong (NaN, untrained, no warning);
* ``half-changed`` — refused or raised, but the optimizer's state changed;
* ``lost data`` — parameters, momenta or factors end up non-finite, or a trainable
  parameter was never trained.

Usage::

    python benchmarks/adversarial.py            # all cases, a table of counts
    python benchmarks/adversarial.py --list     # one line per case
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import math
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from singd import KFAC, SINGD

OUTCOMES = (
    "clear error",
    "handled",
    "unclear error",
    "silent failure",
    "half-changed",
    "lost data",
)


# --- models, data, state ---------------------------------------------------------------


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).to(dtype)


def batch(i: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 5, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)


def state_of(model: nn.Module, optim: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            [p.detach().clone() for p in model.parameters()],
            copy.deepcopy(optim.state_dict()),
        )


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)


def finite(model: nn.Module, optim: Any) -> bool:
    tensors = [p for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = optim.state_dict()

    def walk(x: Any) -> Iterator[Tensor]:
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from walk(v)

    tensors += [t for t in walk(sd) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def train(model: nn.Module, optim: Any, steps: int, dtype: torch.dtype = torch.float32) -> None:
    for i in range(steps):
        X, y = batch(i, dtype)
        optim.zero_grad()
        nn.functional.cross_entropy(model(X).float(), y).backward()
        optim.step()


def refused(error: BaseException, pattern: str) -> str:
    clear = isinstance(error, (TypeError, ValueError, RuntimeError)) and re.search(
        pattern, str(error)
    )
    return "clear error" if clear else "unclear error"


# --- cases ---------------------------------------------------------------------------------

Case = tuple[str, str, Callable[[], str]]  # (category, description, run → outcome)
CASES: list[Case] = []


def case(category: str, description: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(run: Callable[[], str]) -> Callable[[], str]:
        CASES.append((category, description, run))
        return run

    return register


# 1. hyper-parameters: refused with a message naming the argument, or trained finite.
BAD_VALUES: list[Any] = [-1.0, -1e-3, math.nan, math.inf, -math.inf, 1e30, 2.0, 1.5, 1.0, 0.0]
BAD_VALUES += ["1", None, True, [0.1]]
HYPER = {
    SINGD: ("lr", "momentum", "weight_decay", "damping", "lr_cov", "alpha1", "T", "kl_clip"),
    KFAC: ("lr", "momentum", "weight_decay", "damping", "lr_cov", "T", "kl_clip"),
}
HYPER_EXTRA = ("fallback_eps", "init_grad_scale")


def hyper_case(cls: type, name: str, value: Any) -> Callable[[], str]:
    def run() -> str:
        model = mlp()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optim = cls(model, T=1, **{name: value}) if name != "T" else cls(model, T=value)
        except Exception as error:  # refused: fine if the message names the argument
            return refused(error, re.escape(name))
        before = [p.detach().clone() for p in model.parameters()]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(model, optim, 30)
        except Exception as error:
            return refused(error, re.escape(name))
        if not finite(model, optim):
            return "silent failure"  # accepted, then NaN
        changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)]
        lr = value if name == "lr" else 1.0
        if not all(changed) and lr != 0:
            return "silent failure"  # accepted, trains nothing
        return "handled"

    return run


for cls, names in HYPER.items():
    for name in (*names, *HYPER_EXTRA):
        for value in BAD_VALUES:
            CASES.append(
                (
                    "hyper-parameters",
                    f"{cls.__name__}({name}={value!r})",
                    hyper_case(cls, name, value),
                )
            )


def _item9(kwargs: dict[str, Any], pattern: str) -> Callable[[], str]:
    def run() -> str:
        try:
            SINGD(mlp(), **kwargs)
        except Exception as error:
            return refused(error, pattern)
        return "silent failure"

    return run


for kwargs, pattern in [
    ({"grad_scaler": object()}, "grad_scaler must be None or a torch.amp.GradScaler"),
    ({"grad_scaler": "scaler"}, "grad_scaler"),
    ({"structures": None}, "structures must be a pair"),
    ({"structures": ("dense",)}, "structures must be a pair"),
    ({"structures": ("dense", "triangle")}, "Unknown structure"),
    ({"warn_unsupported": "no"}, "warn_unsupported must be True or False"),
    ({"kfac_like": "yes"}, "kfac_like"),
    ({"fallback": "adam"}, "fallback"),
    ({"fallback_betas": (0.9,)}, "fallback_betas"),
    ({"loss_average": "mean"}, "loss_average"),
    ({"kfac_approx": "expanded"}, "kfac_approx"),
    ({"preconditioner_dtype": (torch.int32, None)}, "preconditioner_dtype"),
    ({"damping": 1000.0}, r"β₁\(λ − 1\)"),
]:
    CASES.append(("hyper-parameters", f"SINGD({kwargs})", _item9(kwargs, pattern)))


def _schedule_case(
    schedule: Callable[[int], Any], pattern: str, own: type[BaseException] | None = None
) -> Callable[[], str]:
    """``own``: the schedule's own exception, which must reach the caller unchanged."""

    def run() -> str:
        model = mlp()
        optim = SINGD(model, T=1, lr_cov=schedule)
        X, y = batch(0)
        nn.functional.cross_entropy(model(X), y).backward()
        before = state_of(model, optim)
        try:
            optim.step()
        except Exception as error:
            if not same(before, state_of(model, optim)):
                return "half-changed"
            if own is not None and isinstance(error, own):
                return "clear error"  # (the user's exception, passed on as it is)
            return refused(error, pattern)
        return "silent failure"

    return run


for label, schedule, pattern, *own in [
    ("returns a string", lambda s: "fast", "returned by the lr_cov schedule at step 0"),
    ("returns -1", lambda s: -1.0, "returned by the lr_cov schedule"),
    ("returns NaN", lambda s: math.nan, "returned by the lr_cov schedule"),
    ("raises", lambda s: 1 / 0, "division by zero", ZeroDivisionError),
]:
    CASES.append(
        ("hyper-parameters", f"lr_cov schedule {label}", _schedule_case(schedule, pattern, *own))
    )


@case("hyper-parameters", "a model on the meta device, stepped")
def _meta() -> str:
    with torch.device("meta"):
        model = mlp()
    try:
        optim = SINGD(model)
        X = torch.randn(4, 5, device="meta")
        model(X).sum().backward()
        optim.step()
    except Exception as error:
        return refused(error, "meta")
    return "silent failure"


# 2. bad data: the step is skipped whole (with a warning), training goes on.
def poison(kind: str, X: Tensor, y: Tensor, model: nn.Module, scale: float = 1.0) -> None:
    X = X.clone()
    loss_scale = scale
    if kind == "nan input":
        X[3, 2] = math.nan
    elif kind == "inf input":
        X[0, 0] = math.inf
    elif kind == "inputs x1e20":
        X = X * 1e20
    elif kind == "loss x1e30":
        loss_scale *= 1e30
    (loss_scale * nn.functional.cross_entropy(model(X).float(), y)).backward()
    if kind == "nan grad":
        model[3].weight.grad[0, 0] = math.nan
    elif kind == "inf grad (fallback)":
        model[2].weight.grad[1] = math.inf


POISONS = (
    "nan input",
    "inf input",
    "inputs x1e20",
    "loss x1e30",
    "nan grad",
    "inf grad (fallback)",
)
MAKERS: dict[str, Callable[..., Any]] = {
    "SINGD": lambda m, **kw: SINGD(m, lr=0.05, lr_cov=0.1, damping=0.1, **kw),
    "SINGD-diag": lambda m, **kw: SINGD(
        m, lr=0.05, lr_cov=0.1, damping=0.1, structures=("diagonal", "diagonal"), **kw
    ),
    "KFAC": lambda m, **kw: KFAC(m, lr=0.05, lr_cov=0.1, damping=0.1, **kw),
}


def data_case(
    maker: str, kind: str, T: int, bad: int, dtype: torch.dtype, scaler: bool
) -> Callable[[], str]:
    def run() -> str:
        model = mlp(dtype)
        grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
        optim = MAKERS[maker](model, T=T, grad_scaler=grad_scaler)
        for i in range(bad + 4):
            X, y = batch(i, dtype)
            optim.zero_grad()
            if i != bad:
                loss = nn.functional.cross_entropy(model(X).float(), y)
                (grad_scaler.scale(loss) if grad_scaler else loss).backward()
                grad_scaler.step(optim) if grad_scaler else optim.step()
                if grad_scaler:
                    grad_scaler.update()
                continue
            poison(kind, X, y, model, grad_scaler.get_scale() if grad_scaler else 1.0)
            before = state_of(model, optim)
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                grad_scaler.step(optim) if grad_scaler else optim.step()
                if grad_scaler:
                    grad_scaler.update()
            warned = any(f"Step {bad} skipped" in str(w.message) for w in record)
            unchanged = same(before, state_of(model, optim))
            if warned and not unchanged:
                return "half-changed"
            if not warned and not unchanged and not finite(model, optim):
                return "silent failure"
        if not finite(model, optim):
            return "lost data"
        return "handled"

    return run


for maker in MAKERS:
    for kind in POISONS:
        for T, bad in ((1, 2), (5, 2), (5, 5)):
            CASES.append(
                (
                    "bad data",
                    f"{maker} T={T}, {kind} at step {bad}",
                    data_case(maker, kind, T, bad, torch.float32, False),
                )
            )
    for kind in ("nan input", "loss x1e30", "inf input"):
        CASES.append(
            (
                "bad data",
                f"{maker} + GradScaler, {kind} at step 2",
                data_case(maker, kind, 1, 2, torch.float32, True),
            )
        )
        CASES.append(
            (
                "bad data",
                f"{maker} bfloat16 model, {kind} at step 2",
                data_case(maker, kind, 1, 2, torch.bfloat16, False),
            )
        )


@case("bad data", "float16 factors, inputs x100")
def _fp16() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 3))
    optim = SINGD(model, T=1, lr=1e-3, preconditioner_dtype=(torch.float16, torch.float16))
    for i in range(5):
        X, y = batch(i)
        optim.zero_grad()
        (25 * nn.functional.cross_entropy(model(100 * X), y)).backward()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            optim.step()
        if any("skipped" in str(w.message) for w in record):
            return "lost data"  # (every step skipped would be training lost)
    return "handled" if finite(model, optim) else "silent failure"


# 3. tampered checkpoints: refused, the optimizer as it was.
def tamper_case(
    maker: str, what: str, tamper: Callable[[dict[str, Any]], None]
) -> Callable[[], str]:
    def run() -> str:
        model = mlp()
        optim = MAKERS[maker](model, T=1)
        train(model, optim, 2)
        sd = copy.deepcopy(optim.state_dict())
        try:
            tamper(sd)
        except (KeyError, IndexError):
            return "handled"  # (nothing to tamper with in this optimizer)
        before = state_of(model, optim)
        try:
            optim.load_state_dict(sd)
        except Exception as error:
            if not same(before, state_of(model, optim)):
                return "half-changed"
            return refused(
                error,
                r"Layer '|[Pp]aram group|parameter '|layers|steps|grad scale|not saved|groups",
            )
        return "silent failure"

    return run


def _path_set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def tamper(sd: dict[str, Any]) -> None:
        target: Any = sd
        for key in path[:-1]:
            target = target[key]
        old = target[path[-1]]
        target[path[-1]] = value(old) if callable(value) else value

    return tamper


def _path_del(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def tamper(sd: dict[str, Any]) -> None:
        target: Any = sd
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return tamper


def _first_key(layer: str, key: str | None = None) -> Callable[[dict[str, Any]], tuple[str, str]]:
    def find(sd: dict[str, Any]) -> tuple[str, str]:
        own = next(k for k in sd if k not in ("state", "param_groups"))
        names = list(sd[own]["layers"][layer])
        return own, key if key is not None else names[0]

    return find


def _layer_tamper(
    layer: str, change: Callable[[Tensor], Any], pick: int = 0
) -> Callable[[dict[str, Any]], None]:
    def tamper(sd: dict[str, Any]) -> None:
        own = next(k for k in sd if k not in ("state", "param_groups"))
        names = sorted(sd[own]["layers"][layer])
        sd[own]["layers"][layer][names[pick]] = change(sd[own]["layers"][layer][names[pick]])

    return tamper


def _own(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def tamper(sd: dict[str, Any]) -> None:
        own = next(k for k in sd if k not in ("state", "param_groups"))
        change(sd[own])

    return tamper


NAN = math.nan
TAMPERINGS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("lr=-1", _path_set(("param_groups", 0, "lr"), -1.0)),
    ("momentum=1.5", _path_set(("param_groups", 0, "momentum"), 1.5)),
    ("damping=nan", _path_set(("param_groups", 0, "damping"), NAN)),
    ("T=0", _path_set(("param_groups", 0, "T"), 0)),
    ("lr_cov='x'", _path_set(("param_groups", 0, "lr_cov"), "x")),
    ("kfac_approx='bogus'", _path_set(("param_groups", 0, "kfac_approx"), "bogus")),
    ("two param groups", _path_set(("param_groups",), lambda g: g + g)),
    (
        "a param group short of a parameter",
        _path_set(("param_groups", 0, "params"), lambda p: p[:-1]),
    ),
    (
        "width mismatch (first tensor of layer 3)",
        _layer_tamper("3", lambda t: torch.zeros(*(d + 1 for d in t.shape))),
    ),
    ("NaN factor (layer 0)", _layer_tamper("0", lambda t: t * NAN)),
    ("inf factor (layer 3, last tensor)", _layer_tamper("3", lambda t: t + math.inf, pick=-1)),
    ("factor not a tensor", _layer_tamper("0", lambda t: t.tolist())),
    (
        "missing factor entry (layer 0)",
        _own(lambda own: own["layers"]["0"].pop(sorted(own["layers"]["0"])[-1])),
    ),
    (
        "unexpected factor entry",
        _own(lambda own: own["layers"]["0"].__setitem__("X.mat", torch.eye(2))),
    ),
    ("missing layer", _own(lambda own: own["layers"].pop("3"))),
    ("extra layer", _own(lambda own: own["layers"].__setitem__("9", {}))),
    ("steps='two'", _own(lambda own: own.__setitem__("steps", "two"))),
    ("steps=-1", _own(lambda own: own.__setitem__("steps", -1))),
    ("grad scale 0", _own(lambda own: own["grad_scales"].__setitem__(0, 0.0))),
    ("NaN momentum buffer", _path_set(("state", 0, "momentum_buffer"), lambda t: t * NAN)),
    (
        "momentum buffer of the wrong shape",
        _path_set(("state", 0, "momentum_buffer"), torch.zeros(3)),
    ),
    ("NaN AdamW moment", _path_set(("state", 2, "exp_avg_sq"), lambda t: t * NAN)),
    ("AdamW step 'x'", _path_set(("state", 2, "step"), "x")),
    ("not an optimizer checkpoint", lambda sd: sd.clear()),
]
for maker in ("SINGD", "SINGD-diag", "KFAC"):
    for what, tamper in TAMPERINGS:
        CASES.append(("tampered checkpoints", f"{maker}: {what}", tamper_case(maker, what, tamper)))


# 4. the command: exit status 2 with a message, no traceback, nothing trained first.
def cli_case(
    argv: list[str], pattern: str, setup: Callable[[Path], None] | None = None
) -> Callable[[], str]:
    def run() -> str:
        from singd.cli import main

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "file").write_text("")
            if setup is not None:
                setup(root)
            args = [a.replace("{tmp}", tmp) for a in argv]
            err, out = io.StringIO(), io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                    status = main(args)
            except SystemExit as exit_info:
                status = exit_info.code  # type: ignore[assignment]
            except Exception:
                return "unclear error"  # a traceback
            text = err.getvalue()
            if status == 0:
                return "silent failure"
            if "Traceback" in text or not re.search(pattern, text):
                return "unclear error"
            if re.search(r"epoch \d", out.getvalue()):
                return "half-changed"  # trained before refusing
            leftovers = [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]
            return "lost data" if leftovers else "clear error"

    return run


def _write_checkpoint(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    from singd.cli import main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        main(["train", *FAST, "--epochs", "1", "--save", str(root / "run.pt")])
    ckpt = torch.load(root / "run.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, root / "run.pt")


FAST = ["--batch-size", "512", "--threads", "1", "--no-progress", "--device", "cpu"]
CLI: list[tuple[list[str], str, Callable[[Path], None] | None]] = [
    (["train", "--lr", "-1"], r"lr \(β₂\) must be", None),
    (["train", "--momentum", "1.5"], r"momentum \(α₂\) must be a number in \[0, 1\)", None),
    (["train", "--alpha1", "2"], r"alpha1", None),
    (["train", "--damping", "0"], r"damping", None),
    (["train", "--lr-cov", "1e30"], r"lr_cov", None),
    (["train", "--T", "0"], r"T must be", None),
    (["train", "--lr", "nan"], r"lr \(β₂\)", None),
    (["train", *FAST, "--damping", "1000"], r"β₁\(λ − 1\)", None),
    (["train", *FAST, "--optimizer", "kfac", "--lr-cov", "1.5"], r"lr_cov", None),
    (["train", "--seed", str(2**70)], r"seed", None),
    (["train", "--seed", "-1"], r"seed", None),
    (["train", "--epochs", "0"], r"positive integer", None),
    (["train", "--optimizer", "lbfgs"], r"invalid choice", None),
    (["train", "--structure", "nonsense"], r"unknown structure", None),
    (["train", "--device", "tpu"], r"unknown device", None),
    (["train", *FAST, "--save", "{tmp}"], r"is a folder", None),
    (["train", *FAST, "--save", "{tmp}/file/run.pt"], r"is a file, not a folder", None),
    (["train", *FAST, "--save", "/proc/singd-none/run.pt"], r"cannot be written", None),
    (["compare", *FAST, "--out", "/proc/singd-none"], r"cannot be used as a folder", None),
    (["compare", *FAST, "--out", "{tmp}/file"], r"cannot be used as a folder", None),
    (["train", *FAST, "--resume", "{tmp}/missing.pt"], r"no checkpoint", None),
    (["train", *FAST, "--resume", "{tmp}/file"], r"cannot read", None),
    (["train", *FAST, "--dataset", "cifar10"], r"cifar10", None),
    (["train", *FAST, "--dataset", "cifar10", "--data-dir", "{tmp}"], r"not found", None),
    (["train", *FAST, "--optimizer", "sgd", "--damping", "0.1"], r"does not take damping", None),
    (
        ["train", *FAST, "--epochs", "2", "--resume", "{tmp}/run.pt"],
        r"setting 'optimizer'",
        lambda r: _write_checkpoint(r, lambda c: c["settings"].__setitem__("optimizer", "lbfgs")),
    ),
    (
        ["train", *FAST, "--epochs", "2", "--resume", "{tmp}/run.pt"],
        r"lr \(β₂\)",
        lambda r: _write_checkpoint(
            r, lambda c: c["optimizer"]["param_groups"][0].__setitem__("lr", -1.0)
        ),
    ),
    (
        ["train", *FAST, "--epochs", "2", "--resume", "{tmp}/run.pt"],
        r"inf/NaN",
        lambda r: _write_checkpoint(
            r,
            lambda c: c["model"].__setitem__(
                next(iter(c["model"])), c["model"][next(iter(c["model"]))] * NAN
            ),
        ),
    ),
    (
        ["train", *FAST, "--epochs", "2", "--resume", "{tmp}/run.pt"],
        r"'epoch' must be",
        lambda r: _write_checkpoint(r, lambda c: c.__setitem__("epoch", "one")),
    ),
    (
        ["train", *FAST, "--epochs", "2", "--resume", "{tmp}/run.pt"],
        r"layers .* missing",
        lambda r: _write_checkpoint(r, lambda c: c["optimizer"]["singd"]["layers"].popitem()),
    ),
    (["frobnicate"], r"invalid choice", None),
]
for argv, pattern, setup in CLI:
    CASES.append(
        ("command", " ".join(a for a in argv if a not in FAST), cli_case(argv, pattern, setup))
    )


# 5. exceptions inside step(), unused layers, untrained parameters.
@case("exceptions in step()", "lr_cov schedule raising after 2 steps, then retried")
def _raise_then_retry() -> str:
    fail = {"now": False}

    def schedule(step: int) -> float:
        if fail["now"]:
            raise RuntimeError("boom")
        return 0.1

    model = mlp()
    optim = SINGD(model, T=1, lr_cov=schedule)
    train(model, optim, 2)
    X, y = batch(5)
    optim.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    before = state_of(model, optim)
    fail["now"] = True
    with contextlib.suppress(RuntimeError):
        optim.step()
    if not same(before, state_of(model, optim)):
        return "half-changed"
    fail["now"] = False
    optim.step()
    return "handled" if finite(model, optim) and optim.steps == 3 else "lost data"


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3)])

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.heads[task](torch.tanh(self.trunk(x)))


def heads_case(set_to_none: bool, T: int) -> Callable[[], str]:
    def run() -> str:
        model = Heads()
        optim = SINGD(model, T=T)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for i in range(6):
                X, y = batch(i)
                optim.zero_grad(set_to_none=set_to_none)
                nn.functional.cross_entropy(model(X, i % 2), y).backward()
                optim.step()
        if set(optim.preconditioners) != {"trunk", "heads.0", "heads.1"} or record:
            return "silent failure" if not record else "unclear error"
        return "handled"

    return run


for set_to_none in (True, False):
    for T in (1, 2):
        CASES.append(
            (
                "unused layers",
                f"alternating heads, zero_grad(set_to_none={set_to_none}), T={T}",
                heads_case(set_to_none, T),
            )
        )


def trains_everything(model: nn.Module, optim: Any, run: Callable[[], None]) -> str:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run()
    untrained = [
        n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])
    ]
    return "lost data" if untrained else "handled"


def _frozen_weight(cls: type) -> Callable[[], str]:
    def run() -> str:
        model = mlp()
        model[0].weight.requires_grad_(False)
        optim = cls(model, T=1)
        return trains_everything(model, optim, lambda: train(model, optim, 3))

    return run


def _unfrozen_later(cls: type) -> Callable[[], str]:
    def run() -> str:
        model = mlp()
        for p in model[3].parameters():
            p.requires_grad_(False)
        optim = cls(model, T=1)
        train(model, optim, 1)
        for p in model[3].parameters():
            p.requires_grad_(True)
        return trains_everything(model, optim, lambda: train(model, optim, 3))

    return run


def _added_later(cls: type) -> Callable[[], str]:
    def run() -> str:
        model = mlp()
        optim = cls(model, T=1)
        train(model, optim, 1)
        model.append(nn.Linear(3, 3))
        try:
            optim.add_param_group({"params": list(model[4].parameters())})
        except Exception as error:
            return refused(error, "xxx-should-not-refuse")
        return trains_everything(model, optim, lambda: train(model, optim, 3))

    return run


def _deferred(cls: type) -> Callable[[], str]:
    def run() -> str:
        with torch.device("meta"):
            model = mlp()
        try:
            optim = cls(model, T=1)
            model.to_empty(device="cpu")
            torch.manual_seed(0)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return trains_everything(model, optim, lambda: train(model, optim, 3))
        except Exception as error:
            return refused(error, "meta")

    return run


for cls in (SINGD, KFAC):
    CASES.append(
        ("untrained parameters", f"{cls.__name__}: bias of a frozen weight", _frozen_weight(cls))
    )
    CASES.append(
        (
            "untrained parameters",
            f"{cls.__name__}: layer unfrozen after construction",
            _unfrozen_later(cls),
        )
    )
    CASES.append(
        (
            "untrained parameters",
            f"{cls.__name__}: layer added via add_param_group",
            _added_later(cls),
        )
    )
    CASES.append(("untrained parameters", f"{cls.__name__}: deferred init on meta", _deferred(cls)))


# --- run -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print every case and its outcome")
    parser.add_argument("--only", help="run only the categories whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    bad: list[str] = []
    for category, description, run in CASES:
        if args.only and args.only not in category:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcome = run()
        except Exception as error:  # the case itself crashed: an unclear error
            outcome = "unclear error"
            description += f" [{type(error).__name__}: {error}]"
        counts[category][outcome] += 1
        if args.list or outcome not in ("clear error", "handled"):
            line = f"{outcome:14s}  {category}: {description}"
            (bad if outcome not in ("clear error", "handled") else []).append(line)
            if args.list:
                print(line)
    total = collections.Counter[str]()
    for c in counts.values():
        total.update(c)
    print("\n| category | inputs | " + " | ".join(OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(OUTCOMES))
    for category, c in [*counts.items(), ("**all**", total)]:
        print(
            f"| {category} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |"
        )
    if bad and not args.list:
        print("\nNot clear or not handled:")
        print("\n".join(bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
