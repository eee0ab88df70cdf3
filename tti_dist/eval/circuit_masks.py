"""Node masks and the pruning search of `tti circuit`: the smallest set of nodes that keeps a
task's loss under a target (Gao et al. 2025, "Weight-sparse transformers have interpretable
circuits", arXiv:2511.13653, section "Pruning"; openai/circuit_sparsity).

Nodes (`node_sites`), one learnable logit tau_i each:
- `mlp`: every hidden unit of every dense MLP (hookpoint `blocks.{i}.mlp.act`);
- `attn`: every attention head (`blocks.{i}.attn.z`, the head's head_dim channels together);
- `resid`: every residual-stream channel at each block's input (`blocks.{i}.resid_pre`, one
  set per block) and at the stream the unembedding reads (`blocks.{L-1}.resid_post`).
  Masking a channel at `resid_pre` of block i replaces its value there, so block i and
  everything after it see the replaced value (later blocks still add their own writes).

Masking (forward hooks on the hookpoints; the model's code and weights are untouched):

    x_i  ->  m_i * x_i + (1 - m_i) * mu_i,    m_i = H(tau_i)  (Heaviside: 1 kept, 0 pruned)

mu_i is the node's mean activation over every position of the task's windows in the
unmasked model (mean ablation, as the paper freezes pruned nodes at their mean), or 0
(`ablation="zero"`). Gradients reach tau through the straight-through estimator with the
sigmoid's derivative as the surrogate, as in the paper: forward H(tau), backward
dH/dtau := sigma'(tau) (`ste_gate`). Only the taus train; the model is frozen.

Objective for one penalty lambda (Adam on tau, one task batch per step):

    L(tau) = L_task(H(tau)) + lambda * sum_i H(tau_i) / N            (N: nodes in total)

The penalty is the fraction of nodes kept, so lambda is in nats per "whole model" and
means the same at every model size.

Discretisation and circuit size: after training, the nodes are ranked by tau (descending)
and the smallest k such that keeping the top k nodes gives L_task <= target is found by
bisection (`smallest_circuit`), starting from the trained mask's own size (tau > 0). The
paper's reported circuit size is likewise the number of nodes kept at a fixed target task
loss. Bisection assumes the loss falls as k grows along the ranking; where it does not,
the k found still meets the target, but a smaller one may exist. Over several lambdas the
smallest circuit reaching the target is reported.

Edges: the paper also counts a circuit's weights between kept nodes; `tti circuit` counts
them for the nodes kept here (tti_dist.eval.circuit_edges) but does not prune edges
separately (a kept node keeps all its weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
from tti_dist.eval.circuit_plan import NODE_KINDS
from tti_dist.eval.circuit_tasks import TaskExamples, task_loss


@dataclass(frozen=True)
class NodeSite:
    """One hookpoint whose channels are grouped into maskable nodes."""

    name: str
    """Hookpoint, e.g. blocks.0.mlp.act."""
    kind: str
    """One of NODE_KINDS."""
    num_nodes: int
    """Nodes at this site."""
    group: int
    """Channels per node (head_dim for attention heads, else 1)."""
    module: nn.Module
    """The HookPoint module the mask hooks onto."""


def node_sites(model: nn.Module, kinds: tuple[str, ...] = NODE_KINDS) -> list[NodeSite]:
    """The maskable sites of a GPT built at TP=1, in forward order, restricted to `kinds`.
    MoE blocks have no `mlp.act` and contribute no MLP nodes."""
    cfg = model.cfg
    head_dim = cfg.hidden_size // cfg.num_heads
    last_post = f"blocks.{cfg.num_layers - 1}.resid_post"
    sites = []
    for hp in list_hookpoints(model):
        if hp.name.endswith(".mlp.act") and "mlp" in kinds:
            sites.append(NodeSite(hp.name, "mlp", hp.global_dim, 1, hp.module))
        elif hp.name.endswith(".attn.z") and "attn" in kinds:
            sites.append(NodeSite(hp.name, "attn", cfg.num_heads, head_dim, hp.module))
        elif (hp.name.endswith(".resid_pre") or hp.name == last_post) and "resid" in kinds:
            sites.append(NodeSite(hp.name, "resid", hp.global_dim, 1, hp.module))
    return sites


def ste_gate(tau: torch.Tensor) -> torch.Tensor:
    """H(tau) in the forward pass, sigma'(tau) as its derivative in backward (straight-through)."""
    soft = torch.sigmoid(tau)
    return (tau > 0).to(tau.dtype) + soft - soft.detach()


class NodeMasker:
    """Context manager: while open, every site's output is gate * x + (1 - gate) * mu, with
    `gates[site]` ([num_nodes], set before each forward; None leaves the site alone)."""

    def __init__(self, sites: list[NodeSite], means: dict[str, torch.Tensor]):
        self.sites = sites
        self.means = means
        self.gates: dict[str, torch.Tensor | None] = {s.name: None for s in sites}
        self._handles = []

    def __enter__(self) -> NodeMasker:
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(self._hook(site)))
        return self

    def _hook(self, site: NodeSite):
        def hook(_module, _inputs, out: torch.Tensor):
            gate = self.gates[site.name]
            if gate is None:
                return None
            if site.group > 1:
                gate = gate.repeat_interleave(site.group)
            gate = gate.to(out.dtype)
            # x * g + mu * (1 - g), not mu + g * (x - mu): a kept node (g = 1) passes exactly.
            return out * gate + self.means[site.name] * (1 - gate)

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def site_means(model: nn.Module, sites: list[NodeSite], tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean activation of every channel of every site over all positions of `tokens`'
    windows (inputs [B, T]), in the unmasked model."""
    sums = {s.name: 0.0 for s in sites}
    count = 0
    hps = [hp for hp in list_hookpoints(model) if hp.name in sums]
    with ActivationCapture(hps) as cap:
        for x in tokens:
            model(x)
            for name in sums:
                a = cap.captured[name].float()
                sums[name] = sums[name] + a.reshape(-1, a.shape[-1]).sum(0)
            count += x.numel()
            cap.clear()
    return {k: v / count for k, v in sums.items()}


@dataclass
class TaskData:
    """The batches a search runs on: model inputs and the task's examples of each."""

    inputs: list[torch.Tensor]
    """[B, T] int64 per batch (tokens[:, :-1]), on the model's device."""
    examples: list[TaskExamples]
    """The task's examples of each batch (on the same device)."""

    @property
    def num_examples(self) -> int:
        return sum(len(e) for e in self.examples)


def evaluate(model: nn.Module, masker: NodeMasker, data: TaskData,
             gates: dict[str, torch.Tensor] | None) -> tuple[float, float]:
    """(mean task loss, accuracy) with the sites gated by `gates` (None: the full model)."""
    for site in masker.sites:
        masker.gates[site.name] = None if gates is None else gates[site.name]
    loss, correct = 0.0, 0
    with torch.no_grad():
        for x, ex in zip(data.inputs, data.examples):
            if len(ex) == 0:
                continue
            lsum, c = task_loss(model(x), ex)
            loss += float(lsum)
            correct += int(c)
    n = max(data.num_examples, 1)
    return loss / n, correct / n


def train_masks(model: nn.Module, masker: NodeMasker, data: TaskData, lam: float, steps: int, lr: float,
                init: float = 1.0) -> dict[str, torch.Tensor]:
    """Mask logits tau after `steps` Adam steps on L_task(H(tau)) + lam * sum H(tau) / N,
    one batch per step (cycling); every node starts kept (tau = init > 0)."""
    device = data.inputs[0].device
    taus = {s.name: torch.full((s.num_nodes,), float(init), device=device, requires_grad=True)
            for s in masker.sites}
    total = sum(s.num_nodes for s in masker.sites)
    opt = torch.optim.Adam(taus.values(), lr=lr)
    batches = [i for i, ex in enumerate(data.examples) if len(ex) > 0]
    for step in range(steps):
        b = batches[step % len(batches)]
        gates = {name: ste_gate(t) for name, t in taus.items()}
        masker.gates.update(gates)
        lsum, _ = task_loss(model(data.inputs[b]), data.examples[b])
        kept = sum(g.sum() for g in gates.values()) / total
        loss = lsum / len(data.examples[b]) + lam * kept
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in taus.items()}


def ranking(sites: list[NodeSite], taus: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(site index, node) of every node, by tau descending (ties: forward order)."""
    flat = torch.cat([taus[s.name].float().cpu() for s in sites])
    order = torch.sort(-flat, stable=True).indices.tolist()
    owners = [(si, n) for si, s in enumerate(sites) for n in range(s.num_nodes)]
    return [owners[i] for i in order]


def top_k_gates(sites: list[NodeSite], order: list[tuple[int, int]], k: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """0/1 gates keeping the first k nodes of `order`."""
    gates = [torch.zeros(s.num_nodes) for s in sites]
    for si, n in order[:k]:
        gates[si][n] = 1.0
    return {s.name: g.to(device) for s, g in zip(sites, gates)}


def smallest_circuit(loss_at: Callable[[int], float], start: int, total: int,
                     target: float) -> int | None:
    """Smallest k in [0, total] with loss_at(k) <= target found by bisection, first on
    [0, start] if loss_at(start) meets the target, else on [start, total]; None if neither
    end meets it (`loss_at` is assumed to fall with k; see the module docstring)."""
    if loss_at(start) <= target:
        lo, hi = 0, start
    elif start < total and loss_at(total) <= target:
        lo, hi = start + 1, total
    else:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if loss_at(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _counts(sites: list[NodeSite], gates: dict[str, torch.Tensor]) -> dict[str, int]:
    """Nodes kept per kind (every kind of NODE_KINDS present in `sites`) and in all."""
    out = {kind: 0 for kind in NODE_KINDS if any(s.kind == kind for s in sites)}
    for s in sites:
        out[s.kind] += int(gates[s.name].sum().item())
    out["all"] = sum(out.values())
    return out


def prune(model: nn.Module, sites: list[NodeSite], data: TaskData, target: float, lambdas: tuple[float, ...],
          steps: int, lr: float, ablation: str = "mean") -> dict:
    """The smallest circuit of `model` reaching `target` on `data` over the penalties
    `lambdas`, with its per-kind node counts, loss and kept nodes (JSON-ready).

    When no penalty reaches the target, the entry reports the trained mask (tau > 0) with
    the lowest task loss, with `reached: false`."""
    device = data.inputs[0].device
    if ablation == "mean":
        means = site_means(model, sites, data.inputs)
    else:
        means = {s.name: torch.zeros(s.num_nodes * s.group, device=device) for s in sites}
    total = sum(s.num_nodes for s in sites)
    masker = NodeMasker(sites, means)
    with masker:
        full_loss, full_acc = evaluate(model, masker, data, None)
        best, attempts = None, []
        for lam in lambdas:
            taus = train_masks(model, masker, data, lam, steps, lr)
            order = ranking(sites, taus)
            cache: dict[int, tuple[float, float]] = {}

            def loss_at(k: int) -> float:
                if k not in cache:
                    cache[k] = evaluate(model, masker, data, top_k_gates(sites, order, k, device))
                return cache[k][0]

            trained_k = sum(int((t > 0).sum()) for t in taus.values())
            k = smallest_circuit(loss_at, trained_k, total, target)
            reached = k is not None
            k = trained_k if k is None else k
            loss_at(k)
            loss, acc = cache[k]
            attempts.append({"lambda": lam, "mask_nodes": trained_k, "mask_loss": round(cache[trained_k][0], 6),
                             "nodes": k, "loss": round(loss, 6), "reached": reached})
            key = (not reached, k if reached else loss)
            if best is None or key < best[0]:
                best = (key, lam, order, k, loss, acc, reached)
    _, lam, order, k, loss, acc, reached = best
    gates = top_k_gates(sites, order, k, torch.device("cpu"))
    return {
        "full_loss": round(full_loss, 6),
        "full_accuracy": round(full_acc, 6),
        "reached": reached,
        "nodes_kept": _counts(sites, gates),
        "task_loss": round(loss, 6),
        "accuracy": round(acc, 6),
        "lambda": lam,
        "per_lambda": attempts,
        "kept": {s.name: gates[s.name].nonzero().flatten().tolist() for s in sites},
    }


def total_nodes(sites: list[NodeSite]) -> dict[str, int]:
    """Nodes per kind and in all."""
    return _counts(sites, {s.name: torch.ones(s.num_nodes) for s in sites})
