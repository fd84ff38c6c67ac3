r"""A dense float64 transcription of SINGD/IKFAC and KFAC: the test oracle.

Written from the spec (§1.2–1.6, §3.3, §4), **not** from the library: nothing here
imports ``singd``. Every quantity is a plain dense ``float64`` tensor; a structure is
only its projection :math:`\hat\Pi` (spec §3.3: a mask of free entries, where an
entry whose mirror is not free absorbs the mirror; Toeplitz diagonals are averaged),
and K stays in its pattern by group closure. One call of :meth:`Oracle.step` is one
optimizer step: forward/backward with plain hooks, the statistics :math:`A, G_m`, the
factor refresh when ``t % T == 0`` (whose *new* factors precondition this step's
gradient), then :math:`\mu \leftarrow \mu - \beta_2 m_\mu`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Hyper-parameters, named as the optimizer arguments (paper symbol in comments)."""

    lr: float = 1e-2  # β₂
    momentum: float = 0.0  # α₂
    damping: float = 1e-3  # λ
    alpha1: float = 0.0  # α₁
    weight_decay: float = 0.0  # γ
    T: int = 1
    lr_cov: float | Callable[[int], float] = 1e-2  # β₁
    loss_average: str | None = "batch"
    kfac_approx: str = "expand"
    kfac_like: bool = False
    normalize_lr_cov: bool = False
    structures: tuple[str, str] = ("dense", "dense")


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """The supported layers (spec §1.1: Linear and Conv2d), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def conv_padding(conv: nn.Conv2d) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim; "same" puts the odd element on the right."""
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    if conv.padding == "valid":
        return [(0, 0), (0, 0)]
    return [(p, p) for p in conv.padding]


def conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``[B, O1·O2, c·k1·k2]`` patches of the group-averaged input via ``F.unfold``."""
    B, C_in = x.shape[:2]
    x = x.reshape(B, conv.groups, C_in // conv.groups, *x.shape[2:]).mean(1)
    (top, bottom), (left, right) = conv_padding(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, [left, right, top, bottom], mode=mode)
    return F.unfold(x, conv.kernel_size, conv.dilation, 0, conv.stride).transpose(1, 2)


def shared(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs ``[B, R, d_in]`` and output gradients ``[B, R, d_o]`` (R shared positions)."""
    if isinstance(module, nn.Conv2d):
        return conv_patches(module, x), g.flatten(2).transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])


def statistics(module: nn.Module, x: Tensor, g: Tensor, hp: Hyper) -> tuple[Tensor, Tensor]:
    """Spec §4: ``A`` (÷√rows, ones column for a bias) and ``G_m`` (×√#loss terms)."""
    a, g = shared(module, x, g)
    B, R = g.shape[:2]
    if hp.kfac_approx == "expand":
        a, g = a.flatten(0, 1), g.flatten(0, 1)
    else:
        a, g = a.mean(1), g.sum(1)
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    n_terms = {None: 1, "batch": B, "batch+sequence": B * R}[hp.loss_average]
    return a / math.sqrt(a.shape[0]), g * math.sqrt(n_terms)


def capture(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``loss_fn(model).backward()`` (grads accumulate); per layer ``(input, output grad)``."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for name, m in layers(model).items():

        def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            out.retain_grad()
            seen[name] = (args[0].detach(), out)

        handles.append(m.register_forward_hook(hook))
    loss_fn(model).backward()
    for h in handles:
        h.remove()
    return {n: (x, out.grad) for n, (x, out) in seen.items()}


def grad_matrix(m: nn.Module) -> Tensor:
    """``[∇W flattened | ∇b]``, shape ``[d_o, d_K]``."""
    G = m.weight.grad.flatten(1)
    return G if m.bias is None else torch.cat([G, m.bias.grad[:, None]], 1)


def pattern(structure: str, d: int) -> Tensor:
    """Boolean ``[d, d]`` mask of the free entries (spec §3.4–3.8; k rows/columns)."""
    name, _, args = structure.partition("(")
    k = [int(a) for a in args.rstrip(")").split(",") if a.strip()]
    i, j = torch.arange(d)[:, None], torch.arange(d)[None, :]
    if name == "hierarchical":  # [[A, B1, B2], [0, diag C, 0], [0, D, E]]
        a = min(k[0], d)
        e = min(k[1], d - a)
        return (i < a) | (i == j) | ((i >= d - e) & (j >= a))
    masks = {
        "dense": lambda: i >= 0 * j,
        "diagonal": lambda: i == j,
        "block_diagonal": lambda: i // k[0] == j // k[0],
        "tril_top_left": lambda: (i == j) | ((i >= d - k[0]) & (j <= i)),  # [[D,0],[B,L]]
        "tril_bottom_right": lambda: (i == j) | ((j < k[0]) & (j <= i)),  # [[L,0],[B,D]]
        "triu_top_left": lambda: (i == j) | ((j >= d - k[0]) & (i <= j)),  # [[D,B],[0,U]]
        "triu_bottom_right": lambda: (i == j) | ((i < k[0]) & (i <= j)),  # [[U,B],[0,D]]
    }
    return masks[name]()


def project(M: Tensor, structure: str) -> Tensor:
    r""":math:`\hat\Pi(M)` of a symmetric ``M`` (spec §3.3)."""
    d = M.shape[0]
    if structure in ("tril_toeplitz", "triu_toeplitz"):  # t_k: mean of diagonal k (+ mirror)
        T = torch.trace(M) / d * torch.eye(d, dtype=M.dtype)
        for k in range(1, d):
            t = (M.diagonal(-k).sum() + M.diagonal(k).sum()) / (d - k)
            T = T + t * torch.diag(torch.ones(d - k, dtype=M.dtype), -k)
        return T if structure == "tril_toeplitz" else T.T
    P = pattern(structure, d)
    lonely = P & ~P.T  # free, but its mirror is not: it absorbs the mirror's value
    return torch.where(P, M + torch.where(lonely, M.T, torch.zeros_like(M)), torch.zeros_like(M))


def avg_tr(M: Tensor) -> Tensor:
    """Tr(M) / dim."""
    return torch.trace(M) / M.shape[0]


class Oracle:
    """Shared step skeleton: statistics, refresh when due, precondition, momentum."""

    def __init__(self, model: nn.Module, hp: Hyper) -> None:
        self.model, self.hp, self.t = model, hp, 0
        self.buf: dict[nn.Parameter, Tensor] = {}

    def beta1(self) -> float:
        """β₁ at the current step."""
        return self.hp.lr_cov(self.t) if callable(self.hp.lr_cov) else self.hp.lr_cov

    def refresh(self, name: str, U: Tensor, G: Tensor) -> None:
        """Update the layer's preconditioner from ``U = AᵀA`` and ``G = G_mᵀG_m``."""
        raise NotImplementedError

    def precondition(self, name: str, Ghat: Tensor) -> Tensor:
        """The natural gradient of ``Ghat``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, *loss_fns: Callable[[nn.Module], Tensor]) -> None:
        """One optimizer step on the loss ``loss_fn(model)`` (summed over micro-batches).

        Gradients and the statistics U, G of several ``loss_fns`` add up (spec §1.6).
        """
        self.model.zero_grad()
        with torch.enable_grad():
            captured = [capture(self.model, f) for f in loss_fns]
        hp = self.hp
        for name, m in layers(self.model).items():
            if self.t % hp.T == 0:
                stats = [statistics(m, *c[name], hp) for c in captured]
                U, G = (sum(A.T @ A for A, _ in stats), sum(Gm.T @ Gm for _, Gm in stats))
                self.refresh(name, U, G)
            N = self.precondition(name, grad_matrix(m))
            pairs = [(m.weight, N[:, : m.weight[0].numel()])]
            if m.bias is not None:
                pairs.append((m.bias, N[:, -1]))
            for p, n in pairs:
                d = n.reshape(p.shape) + hp.weight_decay * p
                if hp.momentum != 0:
                    d = self.buf[p] = hp.momentum * self.buf.get(p, torch.zeros_like(p)) + d
                p -= hp.lr * d
        self.t += 1


class DenseSINGD(Oracle):
    """IKFAC (``kfac_like``) and INGD/SINGD with dense or diagonal K, C (spec §1.3–1.6)."""

    def __init__(self, model: nn.Module, hp: Hyper) -> None:
        super().__init__(model, hp)
        self.K: dict[str, Tensor] = {}
        self.C: dict[str, Tensor] = {}
        self.m_K: dict[str, Tensor] = {}
        self.m_C: dict[str, Tensor] = {}
        for name, m in layers(model).items():
            d_K = m.weight[0].numel() + (m.bias is not None)
            d_C = m.weight.shape[0]
            self.K[name] = torch.eye(d_K, dtype=torch.float64)
            self.C[name] = torch.eye(d_C, dtype=torch.float64)
            self.m_K[name] = torch.zeros(d_K, d_K, dtype=torch.float64)
            self.m_C[name] = torch.zeros(d_C, d_C, dtype=torch.float64)

    def refresh(self, name: str, U: Tensor, G: Tensor) -> None:
        hp, (sK, sC) = self.hp, self.hp.structures
        K, C = self.K[name], self.C[name]
        H_K, H_C = project(K.T @ U @ K, sK), project(C.T @ G @ C, sC)
        KtK, CtC = project(K.T @ K, sK), project(C.T @ C, sC)
        I_K, I_C = torch.eye(len(K), dtype=K.dtype), torch.eye(len(C), dtype=C.dtype)
        if hp.kfac_like:  # IKFAC: no trace coupling, constant damping
            new_K = H_K + hp.damping * KtK - I_K
            new_C = H_C + hp.damping * CtC - I_C
        else:  # INGD/SINGD: Tr̄-coupled curvature and adaptive damping
            new_K = avg_tr(H_C) * H_K + hp.damping * avg_tr(C.T @ C) * KtK - I_K
            new_C = avg_tr(H_K) * H_C + hp.damping * avg_tr(K.T @ K) * CtC - I_C
        alpha1 = 0.0 if hp.kfac_like else hp.alpha1
        scale = 0.5 * (1 - alpha1) if hp.normalize_lr_cov else 0.5
        m_K = self.m_K[name] = alpha1 * self.m_K[name] + scale * new_K
        m_C = self.m_C[name] = alpha1 * self.m_C[name] + scale * new_C
        b_K = b_C = self.beta1()
        if hp.normalize_lr_cov:
            b_K, b_C = (
                b_K / max(1.0, m_K.abs().max().item()),
                b_C / max(1.0, m_C.abs().max().item()),
            )
        self.K[name] = K @ (I_K - b_K * m_K)
        self.C[name] = C @ (I_C - b_C * m_C)

    def precondition(self, name: str, Ghat: Tensor) -> Tensor:
        K, C = self.K[name], self.C[name]
        return C @ C.T @ Ghat @ K @ K.T


class DenseKFAC(Oracle):
    """KFAC (spec §1.2): S starts at I, EMA weight β₁, :math:`P = (S + \\lambda I)^{-1}`."""

    def __init__(self, model: nn.Module, hp: Hyper) -> None:
        super().__init__(model, hp)
        self.S: dict[str, list[Tensor]] = {}
        for name, m in layers(model).items():
            dims = (m.weight[0].numel() + (m.bias is not None), m.weight.shape[0])
            self.S[name] = [torch.eye(d, dtype=torch.float64) for d in dims]

    def P(self, name: str) -> tuple[Tensor, Tensor]:
        """The damped inverses ``(P_K, P_C)``."""
        P_K, P_C = (
            torch.linalg.inv(S + self.hp.damping * torch.eye(len(S), dtype=S.dtype))
            for S in self.S[name]
        )
        return P_K, P_C

    def refresh(self, name: str, U: Tensor, G: Tensor) -> None:
        b = self.beta1()
        S_K, S_C = self.S[name]
        self.S[name] = [(1 - b) * S_K + b * U, (1 - b) * S_C + b * G]

    def precondition(self, name: str, Ghat: Tensor) -> Tensor:
        P_K, P_C = self.P(name)
        return P_C @ Ghat @ P_K
