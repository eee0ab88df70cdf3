"""The batched toy model x' = ReLU(W^T W x + b) and its training (Elhage et al. 2022).

Source: Elhage et al. 2022, "Toy Models of Superposition", transformer-circuits.pub/2022/toy_model.
I instances are one tensor program: W [I, m, n], b [I, n], inputs [B, I, n]; the loss is
the sum over instances of each instance's loss, so the gradient of instance i's parameters
is that of its own loss alone and the instances train independently (one Adam for all:
Adam is elementwise, so this is also exactly per-instance Adam).

Per instance, with importance I_f and batch x (tti_dist.data.toy):

    h = W x                               (hidden, [m])
    x' = ReLU(W^T h + b)                  (or ReLU(W^T topk(h) + b) with topk_hidden = k)
    L_rec = (1 / (B n)) sum_b sum_f I_f (x_bf - x'_bf)^2
    L = L_rec + l1_hidden * L1(h) + orthogonality * O(W)     (tti_dist.toy.penalties)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from tti_dist.data.toy import importance_weights, sparse_feature_batch
from tti_dist.toy import penalties
from tti_dist.toy.config import ToyConfig

logger = logging.getLogger(__name__)


class ToyModel(nn.Module):
    """I toy models at once: parameters W [I, m, n] and b [I, n].

    Initialisation: each W[i] is Xavier-normal for an m x n matrix, N(0, 2 / (m + n)); b = 0
    (the paper's notebook uses xavier_normal_ and zero bias).
    """

    def __init__(self, num_instances: int, num_features: int, num_hidden: int, topk_hidden: int = 0,
                 *, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        std = math.sqrt(2.0 / (num_hidden + num_features))
        W = torch.randn((num_instances, num_hidden, num_features), generator=generator, device=device, dtype=dtype)
        self.W = nn.Parameter(W * std)
        self.b = nn.Parameter(torch.zeros((num_instances, num_features), device=device, dtype=dtype))
        self.topk_hidden = topk_hidden

    def forward(self, x_BIN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x' [B, I, n], h [B, I, m]) for inputs x [B, I, n]; h is before any top-k."""
        h = torch.einsum("bin,imn->bim", x_BIN, self.W)
        kept = h * topk_abs_mask(h, self.topk_hidden) if self.topk_hidden else h
        out = torch.einsum("bim,imn->bin", kept, self.W) + self.b
        return torch.relu(out), h


@torch.no_grad()
def topk_abs_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (h's shape and dtype, 0/1) keeping the k entries of largest |h| along the last dim.

    The k-sparse activation of Makhzani & Frey 2013 ("k-Sparse Autoencoders") by magnitude, as
    the project's top-k MLP with `by="abs"` (tti_dist/models/sparsity.py, which is not imported
    here because it pulls in megatron). The mask is a constant of the forward pass: gradients
    flow through the kept entries only. Ties are broken by torch.topk.
    """
    index = h.abs().topk(k, dim=-1).indices
    return torch.zeros_like(h).scatter_(-1, index, 1.0)


def reconstruction_loss(x_BIN: torch.Tensor, out_BIN: torch.Tensor, importance_N: torch.Tensor) -> torch.Tensor:
    """Importance-weighted MSE per instance, (1 / (B n)) sum_b sum_f I_f (x_bf - x'_bf)^2: [I].

    importance: [n] shared by all instances or [I, n] per instance (both broadcast over B)."""
    return (importance_N * (x_BIN - out_BIN) ** 2).mean(dim=(0, 2))


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the peak learning rate at `step` (0-based) of `steps`."""
    if schedule == "constant":
        return 1.0
    frac = step / steps
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")


@dataclass
class ToyResult:
    """A trained sweep (tensors on the CPU, float32)."""

    W: torch.Tensor
    """Weights [I, m, n]."""
    b: torch.Tensor
    """Biases [I, n]."""
    sparsity: list[float]
    """Sparsity of each instance."""
    repeat: list[int]
    """Repeat index of each instance within its sparsity."""
    importance: torch.Tensor
    """Feature importances: [n] shared by all instances, or [I, n] one row per instance."""
    loss: torch.Tensor
    """Final importance-weighted reconstruction loss per instance [I] on a fresh eval batch
    (without regularizer terms)."""
    penalties: dict[str, torch.Tensor]
    """Final regularizer values per instance ([I] each) on the eval batch, for the enabled ones."""
    seconds: float
    """Wall time of the training loop."""


def _losses(model: ToyModel, x: torch.Tensor, importance: torch.Tensor, cfg: ToyConfig):
    out, h = model(x)
    rec = reconstruction_loss(x, out, importance)
    terms: dict[str, torch.Tensor] = {}
    if cfg.l1_hidden:
        terms["l1_hidden"] = penalties.l1_hidden(h)
    if cfg.orthogonality:
        terms["orthogonality"] = penalties.orthogonality(model.W)
    return rec, terms


def train_toy(cfg: ToyConfig, importance: torch.Tensor | None = None) -> ToyResult:
    """Train every instance of the config in one batched program; deterministic given cfg.seed
    (and the thread count: reductions may round differently with other thread counts).

    `importance` replaces the shared importances decay ** i by one row per instance
    ([num_instances, n]; the phase diagram's [1, r] rows); None keeps decay ** i.
    """
    previous = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg, importance)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: ToyConfig, importance: torch.Tensor | None) -> ToyResult:
    device = torch.device(cfg.device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    num = cfg.num_instances
    model = ToyModel(num, cfg.num_features, cfg.num_hidden, cfg.topk_hidden, generator=gen, device=device)
    if importance is None:
        importance = importance_weights(cfg.num_features, cfg.importance_decay, device=device)
    else:
        if tuple(importance.shape) != (num, cfg.num_features):
            raise ValueError(f"importance must have shape [{num}, {cfg.num_features}], got {list(importance.shape)}")
        importance = importance.to(device=device, dtype=torch.float32)
    sparsity = cfg.instance_sparsities()
    prob = 1.0 - torch.tensor(sparsity, dtype=torch.float64)
    prob = prob.to(device=device, dtype=torch.float32)
    coef = {"l1_hidden": cfg.l1_hidden, "orthogonality": cfg.orthogonality}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.lr_schedule, s, cfg.steps))
    start = time.perf_counter()
    for step in range(cfg.steps):
        x = sparse_feature_batch(cfg.batch_size, cfg.num_features, prob, generator=gen)
        rec, terms = _losses(model, x, importance, cfg)
        per_instance = rec
        for name, value in terms.items():
            per_instance = per_instance + coef[name] * value
        loss = per_instance.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            logger.info("step %d/%d: loss summed over %d instances %.6g", step + 1, cfg.steps, num, loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        x = sparse_feature_batch(cfg.eval_batch_size, cfg.num_features, prob, generator=gen)
        rec, terms = _losses(model, x, importance, cfg)
    return ToyResult(
        W=model.W.detach().float().cpu(), b=model.b.detach().float().cpu(), sparsity=sparsity,
        repeat=[i % cfg.instances_per_sparsity for i in range(num)], importance=importance.float().cpu(),
        loss=rec.float().cpu(), penalties={k: v.float().cpu() for k, v in terms.items()}, seconds=seconds,
    )
