"""Soft orthogonality of neuron directions in (possibly tensor-parallel-sharded) weights."""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from tti_dist.capture.hookpoints import is_recomputing, summarize_names
from tti_dist.config.regularizers import OrthogonalityConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.collectives import gather_with_summed_grad, sum_with_identity_grad
from tti_dist.errors import ConfigError
from tti_dist.models.layout import Direction, Linear, model_layout
from tti_dist.regularizers.base import Regularizer, register
from tti_dist.utils.seeding import fold_seed


def targetable_layers(cfg: ModelConfig) -> dict[str, Linear]:
    """The linear layers orthogonality can target, from the model's layout (tti_dist.models.layout).

    Every tensor-parallel linear layer outside the MoE layers: attn.qkv, attn.proj, the
    dense MLP's mlp.fc1 and mlp.fc2, and the bottleneck's enc_mu, enc_logvar and dec.
    Column-parallel layers (qkv, fc1, enc_*) hold one direction per output row (the input
    direction of a unit), row-parallel layers (proj, fc2, dec) one per input column (the
    output direction of a unit); either way the directions are split across TP ranks and
    each lives whole on one rank. Not targetable: an MoE block's experts (each lives on one
    expert-parallel rank only) and its router (replicated, not split over TP); an MoE block
    has no mlp.fc1 / mlp.fc2.
    """
    return {lin.name: lin for lin in model_layout(cfg).linears if lin.parallel is not None and lin.expert is None}


def _match_targets(patterns: tuple[str, ...], cfg: ModelConfig, where: str) -> list[str]:
    """Layer names matched by the globs, in model order; ConfigError for a glob matching nothing."""
    layers = list(targetable_layers(cfg))
    if not patterns:
        raise ConfigError(f"{where}.weights: needs at least one glob; available: {summarize_names(layers)}")
    for j, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise ConfigError(f"{where}.weights[{j}]: {pattern!r} matches no linear layer{_moe_hint(pattern, cfg)}; "
                              f"available: {summarize_names(layers)}")
    return [n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _moe_hint(pattern: str, cfg: ModelConfig) -> str:
    """Why a glob naming a dense MLP layer of an MoE block matches nothing ('' otherwise)."""
    moe_blocks = [i for i in cfg.moe_blocks
                  if any(fnmatch.fnmatchcase(f"blocks.{i}.mlp.{fc}", pattern) for fc in ("fc1", "fc2"))]
    if not moe_blocks:
        return ""
    if len(moe_blocks) == 1:
        which, its = f"block {moe_blocks[0]} is an MoE block", "its"
    else:
        contiguous = moe_blocks == list(range(moe_blocks[0], moe_blocks[-1] + 1))
        listed = f"{moe_blocks[0]}..{moe_blocks[-1]}" if contiguous else ", ".join(map(str, moe_blocks))
        which, its = f"blocks {listed} are MoE blocks", "their"
    return (f" ({which} with model.moe_num_experts {cfg.moe_num_experts}: no mlp.fc1 / mlp.fc2, and {its} experts "
            f"are not targetable)")


@register
class Orthogonality(Regularizer):
    """Soft orthogonality: mean squared off-diagonal cosine similarity of neuron directions.

    For a matrix with n directions w_1..w_n (rows of a column-parallel weight, columns of a
    row-parallel one), cos_ij = <w_i, w_j> / (|w_i| |w_j|) and

        L = (1 / (n (n - 1))) * sum_{i != j} cos_ij^2,

    the loss being the mean of L over the targeted matrices. This is the soft orthogonality
    penalty ||W_hat W_hat^T - I||_F^2 of Bansal, Chen & Wang 2018 ("Can We Gain More from
    Orthogonality Regularizations in Training Deep CNNs?", SO), on row-normalized directions
    (so it penalises only angles, not norms) and divided by the number of off-diagonal pairs.

    Modes (n_l = n / tp local directions per rank, d their length, k sampled per rank):
    - full: exact L. Each rank normalizes its n_l directions, all-gathers them over TP
      (backward: reduce-scatter), computes the n_l x n block of the Gram against all of them,
      sums its squared off-diagonal entries; the partial sums are all-reduced.
    - sampled_local: each rank samples k of its directions uniformly without replacement and
      takes the mean squared off-diagonal cosine of their k x k Gram; the loss is the mean
      over TP ranks. Unbiased for (1/tp) sum_r W_r, W_r the mean over ordered pairs of
      distinct directions *within shard r*. It ignores cross-shard pairs, so it differs from L
      when cross-shard pairs correlate differently from within-shard pairs (and
      cross-shard correlations are never penalised). With tp = 1 it is unbiased for L, and
      with tp = 1 and k = n it equals L.
    - sampled_global: each rank samples k directions (independently of the other ranks) and
      the k x d samples are all-gathered over TP. Pairs within a shard get weight
      n_l (n_l - 1) / (k (k - 1)), pairs across shards n_l^2 / k^2 (inverse inclusion
      probabilities), so the estimate is unbiased for L itself, for any k >= 2. With
      k = n_l it equals L; with tp = 1 it equals sampled_local.
    Sampling uses a private torch.Generator (seeded from `seed`, layer, TP rank and a
    per-layer counter of training forwards), never the global RNG. The trainer checkpoints
    the counters (state_dict, in DeepSpeed's client_state), so a resumed run draws exactly
    the samples of an uninterrupted one.

    When: the penalty is computed in a forward hook of each targeted linear layer (prepended,
    so it runs while DeepSpeed ZeRO-3 still holds the gathered weight) and `loss` returns the
    stashed value. It is computed only when grad is enabled (not in eval), once per forward.

    Reduce group: TP. DP ranks hold identical weights and draw identical samples, so the
    value is the same on every rank; DeepSpeed's DP gradient averaging leaves it unchanged.
    Communication per forward+backward, per matrix (fp32, 4 bytes per float):
    full: all-gather + reduce-scatter of n x d floats (2 * 4 * n * d bytes through the
    group); sampled_global: the same with tp * k in place of n; sampled_local: none; and one
    all-reduce of 2 floats per matrix for all matrices together (in `loss`). No
    communication when tp = 1.
    Cost per rank per matrix: full n_l * n * d multiply-adds (Gram block) plus O(n_l * d);
    sampled_local k^2 d; sampled_global tp k^2 d. Memory: the n x n_l (or k x tp k) Gram.

    Metrics: `mean_abs_cos` = the same estimator with |cos| in place of cos^2 (full: exact
    mean |cos| over all pairs), detached.
    """

    Config = OrthogonalityConfig

    @classmethod
    def check_params(cls, params: OrthogonalityConfig, model_cfg: ModelConfig, hookpoints: list[str], where: str,
                     tp_size: int) -> None:
        names = _match_targets(params.weights, model_cfg, where)
        if params.mode == "full":
            if params.k is not None:
                raise ConfigError(f"{where}.k: {params.k!r} is only used by sampled modes; "
                                  f"remove it or choose mode sampled_local or sampled_global")
            return
        if params.k is None:
            raise ConfigError(f"{where}.k: required for mode {params.mode}; an integer >= 2")
        layers = targetable_layers(model_cfg)
        if params.k < 2:
            raise ConfigError(f"{where}.k: {params.k!r} must be >= 2 (pairs of distinct directions)")
        for name in names:
            width = layers[name].num_directions
            if params.k > width // tp_size:
                raise ConfigError(f"{where}.k: {params.k!r} exceeds the local width {width // tp_size} of {name} "
                                  f"(global width {width} / tp_size {tp_size}; k directions are sampled per TP rank)")

    def __init__(self, spec, model: nn.Module, groups) -> None:
        super().__init__(spec, model, groups)
        p: OrthogonalityConfig = self.params
        self.tp_group = groups.tp_group
        self.tp_size = groups.tp_size
        self.tp_rank = groups.tp_rank
        layers = targetable_layers(model.cfg)
        names = _match_targets(p.weights, model.cfg, spec.where)
        self.targets: list[tuple[str, Direction, int]] = []  # (name, direction, local width)
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._forwards: dict[str, int] = {}
        self._handles = []
        for index, name in enumerate(names):
            direction, width = layers[name].directions, layers[name].num_directions
            module = model.get_submodule(name)
            assert module.weight is not None, name
            if width % self.tp_size:
                raise ConfigError(f"{spec.where}.weights: {name} has {width} directions, not divisible by tp_size {self.tp_size}")
            local = width // self.tp_size
            if p.k is not None and p.k > local:
                raise ConfigError(f"{spec.where}.k: {p.k!r} exceeds the local width {local} of {name} "
                                  f"(global width {width} / tp_size {self.tp_size})")
            self.targets.append((name, direction, local))
            self._forwards[name] = 0
            self._handles.append(module.register_forward_hook(self._make_hook(index, name, direction, local), prepend=True))

    # -- sampling state (a per-layer counter of training forwards) -----------------------------
    def state_dict(self) -> dict:
        """The sampling counters (resume them to repeat an uninterrupted run's samples)."""
        return {"forwards": dict(self._forwards)}

    def load_state_dict(self, state: dict) -> None:
        """Restore counters saved by `state_dict`."""
        self._forwards.update(state["forwards"])

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- the penalty ------------------------------------------------------------------------------
    def _make_hook(self, index: int, name: str, direction: Direction, local: int):
        def hook(module: nn.Module, args, output) -> None:
            if not torch.is_grad_enabled() or is_recomputing():
                return
            count = self._forwards[name]
            self._forwards[name] = count + 1
            self._stash[name] = self._partial(module.weight, index, direction, local, count)

        return hook

    def _partial(self, weight: torch.Tensor, index: int, direction: Direction, local: int, count: int):
        """This rank's share of (penalty, mean |cos|) for one matrix; summed over TP in `loss`."""
        p: OrthogonalityConfig = self.params
        dirs = weight.t() if direction == "columns" else weight  # [n_local, d], a view
        if p.mode == "full":
            k = local
            # A copy: the graph must not save the parameter itself (ZeRO-3 frees its data after
            # the forward; autograd would then unpack an empty tensor in backward).
            picked = dirs.clone()
        else:
            k = p.k
            gen = torch.Generator().manual_seed(fold_seed(p.seed, index, self.tp_rank, count))
            idx = torch.randperm(local, generator=gen)[:k].to(weight.device)
            picked = dirs.index_select(0, idx)  # a copy; backward saves only idx
        unit = F.normalize(picked.float(), dim=1)  # [k, d]
        if p.mode == "sampled_local" or self.tp_size == 1:
            gram = unit @ unit.t()  # [k, k]
            off = ~torch.eye(k, dtype=torch.bool, device=gram.device)
            sq = gram.square()[off].sum() / (k * (k - 1))
            ab = gram.detach().abs()[off].sum() / (k * (k - 1))
            return sq / self.tp_size, ab / self.tp_size
        # full / sampled_global: rows of this rank against all ranks' gathered rows.
        everyone = gather_with_summed_grad(unit, self.tp_group)  # [tp * k, d]
        gram = unit @ everyone.t()  # [k, tp * k]
        cols = torch.arange(self.tp_size * k, device=gram.device)
        rows = torch.arange(k, device=gram.device)
        same_shard = (cols // k == self.tp_rank).unsqueeze(0).expand(k, -1)
        diagonal = cols.unsqueeze(0) == (self.tp_rank * k + rows).unsqueeze(1)
        within = same_shard & ~diagonal
        cross = ~same_shard
        n = local * self.tp_size
        # Inverse inclusion probabilities of a pair (both 1 in full mode, where k = n_local).
        w_within = local * (local - 1) / (k * (k - 1)) / (n * (n - 1))
        w_cross = (local / k) ** 2 / (n * (n - 1))
        sq_all = gram.square()
        sq = w_within * sq_all[within].sum() + w_cross * sq_all[cross].sum()
        ab_all = gram.detach().abs()
        ab = w_within * ab_all[within].sum() + w_cross * ab_all[cross].sum()
        return sq, ab

    def loss(self, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = [name for name, _, _ in self.targets if name not in self._stash]
        if missing:
            raise RuntimeError(f"orthogonality regularizer {self.spec.name!r}: no forward with grad enabled "
                               f"ran {missing[0]} since the last loss() call")
        parts = [self._stash.pop(name) for name, _, _ in self.targets]
        stacked = torch.stack([torch.stack([sq, ab]) for sq, ab in parts])  # [num_matrices, 2]
        if self.tp_size > 1:
            # All-reduce forward, identity backward: each rank's graph holds only its own share.
            stacked = sum_with_identity_grad(stacked, self.tp_group)
        means = stacked.mean(dim=0)
        return means[0], {"mean_abs_cos": means[1].detach()}
