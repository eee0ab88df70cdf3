"""A regularizer defined outside tti_dist, registered through a config's `imports:` (a plugin).

    imports: [tti_plugin_example]            # on PYTHONPATH, or the path of this file
    regularizers:
      - {type: weight_lp, name: wlp, coefficient: 0.1, layers: ["blocks.*.mlp.fc1"], p: 2.0}

`weight_lp` is the mean |w|^p of the weights of the chosen tensor-parallel linear layers (p = 2:
an L2 penalty on selected layers only, i.e. weight decay as a loss term, Krogh & Hertz 1992;
p = 1: an L1 penalty on weights, which pushes individual connections to zero):

    L = (1 / K) * sum_k (1 / n_k) * sum_ij |W_k[i, j]|^p

over the K matched layers, n_k the number of elements of layer k's whole (unsharded) weight.

Reduce group: TP. Each rank holds a shard of every matched weight (rows of a column-parallel
layer, columns of a row-parallel one); it sums |w|^p over its shard and the sums are
all-reduced over the TP group (all-reduce forward, identity backward), so every TP rank holds
the value of the unsharded model and each local weight gets p |w|^(p-1) sign(w) / n_k.
Reads the weights directly, so it needs ZeRO stage 0-2 (stage 3 partitions the parameters).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from tti_dist.config.regularizers import RegularizerTypeConfig, register_config
from tti_dist.distributed.collectives import sum_with_identity_grad
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout
from tti_dist.regularizers.base import Regularizer, register


@register_config
@dataclass(frozen=True)
class WeightLpConfig(RegularizerTypeConfig):
    """Settings of `type: weight_lp` (acts on weights: no hookpoints)."""

    type_name = "weight_lp"
    uses_hookpoints = False

    layers: tuple[str, ...] = ("blocks.*.mlp.fc1",)
    """Globs over the tensor-parallel linear layers (blocks.{i}.attn.qkv, .attn.proj, .mlp.fc1, .mlp.fc2)."""
    p: float = 2.0
    """Exponent of the penalty, > 0."""


def _tp_linears(model_cfg) -> list[str]:
    return [lin.name for lin in model_layout(model_cfg).linears if lin.parallel is not None and lin.expert is None]


def _matched(params: WeightLpConfig, model_cfg, where: str) -> list[str]:
    names = _tp_linears(model_cfg)
    for j, pattern in enumerate(params.layers):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"{where}.layers[{j}]: {pattern!r} matches no tensor-parallel linear layer")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in params.layers)]


@register
class WeightLp(Regularizer):
    """Mean |w|^p of selected layers' weights (formula and reduction in the module docstring)."""

    Config = WeightLpConfig

    @classmethod
    def check_params(cls, params, model_cfg, hookpoints, where, tp_size) -> None:
        if not params.layers:
            raise ConfigError(f"{where}.layers: needs at least one glob")
        if not params.p > 0:
            raise ConfigError(f"{where}.p: {params.p!r} must be > 0")
        _matched(params, model_cfg, where)

    def __init__(self, spec, model, groups) -> None:
        super().__init__(spec, model, groups)
        self.layers = [model.get_submodule(name) for name in _matched(self.params, model.cfg, spec.where)]

    def loss(self, acts):
        tp = self.groups.tp_size
        total = 0.0
        for layer in self.layers:
            w = layer.weight
            local = w.float().abs().pow(self.params.p).sum()
            if tp > 1:
                local = sum_with_identity_grad(local, self.groups.tp_group)
            total = total + local / (w.numel() * tp)  # every TP shard has the same size
        return total / len(self.layers), {}
