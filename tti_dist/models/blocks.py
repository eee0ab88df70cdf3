"""Transformer blocks on megatron-core tensor-parallel linear layers.

Attention: the fused QKV projection is a `ColumnParallelLinear` whose output rows are laid
out head by head ([head][q|k|v][head_dim]), so a contiguous split across TP ranks gives each
rank whole heads with their q, k and v. Each rank runs SDPA on its local heads, and the
output projection is a `RowParallelLinear` that sums the ranks' partial products with one
all-reduce. The MLP is the same pattern: column-parallel up-projection (each rank holds a
contiguous slice of hidden units), GELU, row-parallel down-projection.

Only megatron-core code paths that run on CPU are used: `gather_output=False`,
`input_is_parallel=True`, no sequence parallelism, CPU initialisation (which also makes
weights independent of tp_size: megatron builds the full master weight from the global RNG
and keeps this rank's slice).

Tensors are batch-first: [batch, seq, features] (the megatron layers only touch the last
dimension).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from tti_dist.capture.hookpoints import HookPoint
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.expert_parallel import ExpertGroups
from tti_dist.models.activation_sparsity import AbsTopK
from tti_dist.models.bottleneck import ParallelBottleneck
from tti_dist.models.moe import RoutedMLP
from tti_dist.models.parallel_linear import ColumnLinear, RowLinear
from tti_dist.models.rope import apply_rope
from tti_dist.models.sparsity import hard_mask_units, topk_mask


def normal_init(std: float):
    """An init_method for megatron layers: N(0, std^2) on the full master weight."""

    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


class ParallelAttention(nn.Module):
    """Causal multi-head self-attention with heads split across the TP group.

    Hookpoints: `attn.z` (concatenated per-head outputs before the output projection,
    TP-sharded by head) and `attn.out` (after it, replicated). With AbsTopK activation
    sparsity (models/activation_sparsity.py) at attn_q/attn_k/attn_v, each token keeps the
    largest-|.| entries of its queries/keys/values over all heads (before RoPE); at attn_out,
    of the output, before `attn.out` records it.
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group, tp_size: int):
        super().__init__()
        self.num_heads_local = cfg.num_heads // tp_size
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.dropout = cfg.dropout
        self.use_rope = cfg.position_embedding == "rope"
        self.rope_base = cfg.rope_base
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        # Modules are registered in data-flow order, so list_hookpoints follows the forward.
        self.qkv = ColumnLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, config=mp_config, init_method=normal_init(cfg.init_std),
            bias=cfg.bias, gather_output=False, tp_group=tp_group,
        )
        self.hook_z = HookPoint(cfg.hidden_size, tp_sharded=True)
        self.proj = RowLinear(
            cfg.hidden_size, cfg.hidden_size, config=mp_config, init_method=normal_init(out_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        self.q_topk = AbsTopK(cfg, "attn_q", tp_group)
        self.k_topk = AbsTopK(cfg, "attn_k", tp_group)
        self.v_topk = AbsTopK(cfg, "attn_v", tp_group)
        self.out_topk = AbsTopK(cfg, "attn_out")
        self.hook_out = HookPoint(cfg.hidden_size, tp_sharded=False)

    @staticmethod
    def _sparsify_heads(topk: AbsTopK, t_BHTd: torch.Tensor) -> torch.Tensor:
        """AbsTopK over each token's [heads x head_dim] entries of q, k or v ([B, H_local, T, d])."""
        if not topk.active:
            return t_BHTd
        B, H, T, d = t_BHTd.shape
        flat = topk(t_BHTd.transpose(1, 2).reshape(B, T, H * d))
        return flat.view(B, T, H, d).transpose(1, 2)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        qkv, _ = self.qkv(x_BTD)
        # [B, T, heads_local, 3, head_dim] -> three [B, heads_local, T, head_dim]
        qkv = qkv.view(B, T, self.num_heads_local, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        # unbind, not qkv[0], qkv[1], qkv[2]: indexing backpropagates through three zero-filled
        # copies of the whole [3, ...] tensor, unbind through one stack.
        q, k, v = qkv.unbind(0)
        q = self._sparsify_heads(self.q_topk, q)
        k = self._sparsify_heads(self.k_topk, k)
        v = self._sparsify_heads(self.v_topk, v)
        if self.use_rope:
            q, k = apply_rope(q, k, base=self.rope_base)
        z = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        z = self.hook_z(z.transpose(1, 2).reshape(B, T, self.num_heads_local * self.head_dim))
        out, _ = self.proj(z)
        return self.hook_out(self.out_topk(out))


class ParallelMLP(nn.Module):
    """GELU (or ReLU: cfg.mlp_activation) MLP with hidden units split across the TP group,
    optionally sparse.

        act = topk_k( GELU(fc1(x)) * hard_mask ),   out = fc2(act)

    Two architectural sparsity options (tti_dist.models.sparsity), both off by default:
    - `cfg.mlp_mask_density < 1`: a fixed hard mask zeroes the same units of this layer on
      every token (`hard_mask_units`, seeded from (mlp_mask_seed, layer_index), the same at
      every TP degree; this rank keeps its slice as the non-persistent buffer `unit_mask`).
    - `cfg.mlp_topk = k > 0`: per token, only the k units (of the whole ffn width, selected
      jointly across TP ranks with one all-gather, exactly as at TP=1) with the largest
      value (`mlp_topk_by: value`) or magnitude (`abs`) are kept. Applied after the hard
      mask, so it chooses among kept units; masked-out units are exactly 0 and may still
      be "selected" when fewer than k kept units outrank 0 (then L0 < k). Gradients flow
      through the kept units only.
    With both off the forward is the plain GELU MLP (no extra work).

    Hookpoints: `mlp.pre` and `mlp.act` (before GELU / after GELU and the masks, TP-sharded;
    with top-k, L0 of `mlp.act` <= k), `mlp.out` (replicated; after the mlp_out AbsTopK
    when that site is on).
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.activation = F.relu if cfg.mlp_activation == "relu" else F.gelu
        self.topk = cfg.mlp_topk
        self.topk_by = cfg.mlp_topk_by
        self.tp_group = tp_group
        self.has_unit_mask = cfg.mlp_mask_density < 1.0
        self.tp_size, self.tp_rank = 1, 0
        if self.topk or self.has_unit_mask:
            self.tp_size, self.tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        if self.has_unit_mask:
            full = hard_mask_units(cfg.ffn_size, cfg.mlp_mask_density, cfg.mlp_mask_seed, layer_index)
            local = cfg.ffn_size // self.tp_size
            self.register_buffer("unit_mask", full[self.tp_rank * local:(self.tp_rank + 1) * local].clone(),
                                 persistent=False)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.fc1 = ColumnLinear(
            cfg.hidden_size, cfg.ffn_size, config=mp_config, init_method=normal_init(cfg.init_std),
            bias=cfg.bias, gather_output=False, tp_group=tp_group,
        )
        self.hook_pre = HookPoint(cfg.ffn_size, tp_sharded=True)
        self.hook_act = HookPoint(cfg.ffn_size, tp_sharded=True)
        self.fc2 = RowLinear(
            cfg.ffn_size, cfg.hidden_size, config=mp_config, init_method=normal_init(out_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        self.out_topk = AbsTopK(cfg, "mlp_out")
        self.hook_out = HookPoint(cfg.hidden_size, tp_sharded=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        pre, _ = self.fc1(x_BTD)
        act = self.activation(self.hook_pre(pre))
        if self.has_unit_mask:
            act = act * self.unit_mask
        if self.topk:
            act = act * topk_mask(act, self.topk, by=self.topk_by, tp_group=self.tp_group,
                                  tp_size=self.tp_size, tp_rank=self.tp_rank)
        act = self.hook_act(act)
        out, _ = self.fc2(act)
        return self.hook_out(self.out_topk(out))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(.)).

    In an MoE block (cfg.is_moe_block) the MLP is a `RoutedMLP` (models/moe.py) named
    `moe`, with hookpoints `moe.{router_logits,router_probs,expert,out}` instead of `mlp.*`.

    AbsTopK activation sparsity (models/activation_sparsity.py), where its sites are on:
    attn_in and mlp_in on the LayerNorm outputs the sublayers read, resid_mid and
    resid_post on the stream after each write (before its hookpoint). The sublayers apply
    their own sites (attn_q/k/v, attn_out, mlp_out) before their output hookpoints.

    Hookpoints: `resid_pre`, `resid_mid`, `resid_post` (replicated across TP). In the block
    with index cfg.bottleneck_layer a stochastic bottleneck (models/bottleneck.py) follows
    resid_post and replaces the stream with dec(z): `bottleneck.{mu,logvar,z,out}`.
    """

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig, tp_group, tp_size: int, layer_index: int,
                 experts: ExpertGroups | None = None):
        super().__init__()
        self.layer_index = layer_index
        self.hook_resid_pre = HookPoint(cfg.hidden_size, tp_sharded=False)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.attn_in_topk = AbsTopK(cfg, "attn_in")
        self.attn = ParallelAttention(cfg, mp_config, tp_group, tp_size)
        self.resid_mid_topk = AbsTopK(cfg, "resid_mid")
        self.hook_resid_mid = HookPoint(cfg.hidden_size, tp_sharded=False)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.mlp_in_topk = AbsTopK(cfg, "mlp_in")
        if cfg.is_moe_block(layer_index):
            self.moe = RoutedMLP(cfg, mp_config, tp_group, layer_index, experts)
            self.mlp = None
        else:
            self.moe = None
            self.mlp = ParallelMLP(cfg, mp_config, tp_group, layer_index)
        self.resid_post_topk = AbsTopK(cfg, "resid_post")
        self.hook_resid_post = HookPoint(cfg.hidden_size, tp_sharded=False)
        self.drop = nn.Dropout(cfg.dropout)
        # Registered after hook_resid_post (and applied after it): hookpoints stay in data-flow order.
        self.bottleneck = (
            ParallelBottleneck(cfg, mp_config, tp_group) if cfg.bottleneck_layer == layer_index else None
        )

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x_BTD)
        x = self.hook_resid_mid(self.resid_mid_topk(x + self.drop(self.attn(self.attn_in_topk(self.ln1(x))))))
        ffn = self.moe if self.moe is not None else self.mlp
        x = self.hook_resid_post(self.resid_post_topk(x + self.drop(ffn(self.mlp_in_topk(self.ln2(x))))))
        if self.bottleneck is not None:
            x = self.bottleneck(x)
        return x
