"""Train-time routing metrics of the MoE layers (`moe/blocks.{i}/*`), from each layer's counts.

Per MoE block i, over the micro-steps since the last log step (then averaged over the DP
group by the trainer, like every train metric; local batches are equal, so the average of
shares is the global share):

    share_e{j}   = tokens whose router argmax is expert j / tokens           (before capacity)
    imbalance    = E * max_j share_e{j}          (1: perfectly balanced; E: one expert takes all)
                   of the global shares, so computed after the DP average (`with_imbalance`):
                   the mean of per-rank maxima overstates it (uniform routing, E = 8, 8 DP
                   ranks of 4,096 tokens: ~1.09 against ~1.03)
    dropped_frac = routes over capacity / routes  (dropped routes skip the expert: the token
                   continues on the residual stream only)
    entropy      = mean over tokens of H(p(. | x)) = -sum_e p_e log p_e, nats (log E: uniform
                   routing; 0: one-hot)
    capacity     = the per-expert capacity in routes (DeepSpeed's, from the capacity factor)

The counts are recorded by the gate (models/moe.py) without a host sync; `metrics` returns
tensors, so the trainer's single all-reduce at the log step carries them.
"""

from __future__ import annotations

import torch
from torch import nn

from tti_dist.models.moe import RoutedMLP


class RoutingStatsAccumulator:
    """Sums the MoE layers' routing counts over micro-steps; `metrics()` turns them into tags."""

    def __init__(self, model: nn.Module):
        self.layers = [(f"blocks.{m.layer_index}", m) for m in model.modules() if isinstance(m, RoutedMLP)]
        self._sums: dict[str, dict[str, torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def add(self) -> None:
        """Add the counts of the latest forward of every MoE layer (call once per micro-step)."""
        for name, layer in self.layers:
            stats = layer.routing_stats()
            if stats is None:
                continue
            acc = self._sums.setdefault(name, {})
            for key, value in stats.items():
                if key == "capacity":
                    acc[key] = value  # the latest, not a sum
                else:
                    acc[key] = acc[key] + value if key in acc else value.clone()

    def metrics(self) -> dict[str, torch.Tensor]:
        """moe/blocks.{i}/* for the accumulated micro-steps, then reset."""
        out: dict[str, torch.Tensor] = {}
        for name, acc in self._sums.items():
            prefix = f"moe/{name}/"
            shares = acc["first_choice_counts"] / acc["tokens"]
            for j, share in enumerate(shares):
                out[f"{prefix}share_e{j}"] = share
            out[prefix + "dropped_frac"] = acc["dropped_routes"] / acc["routes"]
            out[prefix + "entropy"] = acc["entropy_sum"] / acc["tokens"]
            out[prefix + "capacity"] = acc["capacity"]
        self._sums.clear()
        return out


def with_imbalance(reduced: dict[str, float]) -> dict[str, float]:
    """`reduced` (DP-averaged tags, with moe/<block>/share_e{j}) plus moe/<block>/imbalance:
    E times the largest global share. Every rank computes it from the same reduced values."""
    shares: dict[str, list[float]] = {}
    for tag, value in reduced.items():
        head, _, last = tag.rpartition("/")
        if tag.startswith("moe/") and last.startswith("share_e"):
            shares.setdefault(head, []).append(value)
    out = dict(reduced)
    for block, values in shares.items():
        out[f"{block}/imbalance"] = max(values) * len(values)
    return out
