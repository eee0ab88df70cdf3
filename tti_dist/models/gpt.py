"""A GPT decoder built from megatron-core tensor-parallel layers.

    tokens -> VocabParallelEmbedding (+ learned positions) -> Block x num_layers
           -> LayerNorm -> vocab-parallel output projection -> local logit shard

The output projection is a `ColumnParallelLinear` over the padded vocabulary; with tied
embeddings it borrows the embedding's weight (megatron's own tying), so each TP rank
holds the same vocabulary rows for both. `forward` returns this rank's shard of the logits
([batch, seq, padded_vocab / tp_size]); `lm_loss` turns it into per-token cross entropy
with megatron's `vocab_parallel_cross_entropy`, never materialising full logits.

The model knows nothing about regularizers or training: it receives its process groups
(`ParallelGroups`: TP, and the expert-parallel groups of MoE blocks) and creates none;
the DeepSpeed engine and the trainer are applied around it by plain functions
(tti_dist.train). Its MoE layers are DeepSpeed's MoE layer (models/moe.py).

What a config builds (hookpoints, linear layers, parameters, their global shapes and TP
sharding) is described without building it by tti_dist.models.layout; tests check that
every variant built here has exactly that layout.

Weights do not depend on tp_size: every rank seeds the global RNG identically before
construction, megatron's CPU initialisation draws each full master weight and keeps the
local slice, and the non-parallel modules draw the same numbers in the same order.

Activation checkpointing (`recompute_blocks`, Megatron's full-granularity recompute):
each block's forward keeps only its input; backward reruns the block to rebuild the rest
(torch.utils.checkpoint, non-reentrant, RNG state restored so dropout repeats exactly).
The rerun happens inside `capture.recomputation()`, so observers of the forward (captures,
regularizer hooks) see each block once. Collectives in a block (TP all-reduces, the top-k
all-gather) rerun on every rank in the same order, so ranks stay in step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from tti_dist.capture.hookpoints import HookPoint, recomputation
from tti_dist.config.schema import ModelConfig
from tti_dist.distributed.groups import ParallelGroups
from tti_dist.models.blocks import Block, normal_init
from tti_dist.models.layout import model_layout
from tti_dist.models.parallel_linear import ColumnLinear


def megatron_config(tp_size: int) -> ModelParallelConfig:
    """The ModelParallelConfig for our layers: CPU initialisation, no CUDA-only features."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


class GPT(nn.Module):
    """Decoder-only transformer LM, tensor-parallel over `groups.tp_group` (MoE blocks:
    experts over `groups.experts`).

    Hookpoints (see `tti_dist.capture.list_hookpoints`): `tokens` (the int64 input ids
    [batch, seq], for objectives keyed on token identity), `embed` (embeddings), and per block i:
    `blocks.{i}.resid_pre`, `.attn.z`, `.attn.out`, `.resid_mid`, `.mlp.pre`, `.mlp.act`,
    `.mlp.out`, `.resid_post` (and `.bottleneck.{mu,logvar,z,out}` in the block with index
    cfg.bottleneck_layer; MoE blocks have `.moe.{router_logits,router_probs,expert,out}` in
    place of `.mlp.*`, see models/moe.py); finally `final_norm` (input to the unembedding). `attn.z`, `mlp.pre` and `mlp.act`
    are TP-sharded (this rank's heads / hidden units); the rest are replicated.
    """

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups):
        super().__init__()
        self.cfg = cfg
        tp_group, tp_size = groups.tp_group, groups.tp_size
        self.hook_tokens = HookPoint(1, tp_sharded=False)
        mp_config = megatron_config(tp_size)
        self.embedding = VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
            config=mp_config, tp_group=tp_group,
        )
        self.position_embedding = None
        if cfg.position_embedding == "learned":
            self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
            nn.init.normal_(self.position_embedding.weight, mean=0.0, std=cfg.init_std)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint(cfg.hidden_size, tp_sharded=False)
        self.blocks = nn.ModuleList(Block(cfg, mp_config, tp_group, tp_size, i, groups.experts) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps, bias=cfg.bias)
        self.hook_final_norm = HookPoint(cfg.hidden_size, tp_sharded=False)
        self.output_layer = ColumnLinear(
            cfg.hidden_size, cfg.padded_vocab_size, config=mp_config, init_method=normal_init(cfg.init_std),
            bias=False, gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
            tp_group=tp_group,
        )
        self.recompute_blocks = False
        """Activation checkpointing: recompute each block in backward (set by the trainer)."""

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Local logit shard [batch, seq, padded_vocab / tp_size] for int64 tokens [batch, seq]."""
        tokens_BT = self.hook_tokens(tokens_BT)
        x = self.embedding(tokens_BT)
        if self.position_embedding is not None:
            positions = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
            x = x + self.position_embedding(positions)
        x = self.hook_embed(self.embed_drop(x))
        recompute = self.recompute_blocks and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, use_reentrant=False, context_fn=_mark_recomputation)
            else:
                x = block(x)
        x = self.hook_final_norm(self.final_norm(x))
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output_layer(x, weight=weight)
        return logits


def _mark_recomputation() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint's context_fn: nothing around the forward, `recomputation()`
    around its rerun in backward."""
    return contextlib.nullcontext(), recomputation()


def lm_loss(logits_local_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross entropy [batch, seq] from the local logit shard.

    Reduces over the tensor-parallel group (megatron's vocab_parallel_cross_entropy takes it
    from parallel_state: the max, the target logit and the softmax denominator are each
    all-reduced). Computed in fp32 whatever the logits' dtype, on a copy: megatron's
    kernel works in place, and callers may still read the logits afterwards.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        # The whole vocabulary is here: the same cross entropy without megatron's three
        # all-reduces over a one-rank group and its in-place work on a copy (~1 ms a step
        # on the smoke model's CPU step of ~60 ms).
        return F.cross_entropy(logits_local_BTV.flatten(0, 1).float(), targets_BT.flatten(),
                               reduction="none").view_as(targets_BT)
    return vocab_parallel_cross_entropy(logits_local_BTV.to(torch.float32, copy=True), targets_BT)


def tp_partition_dims(model: nn.Module) -> dict[str, int | None]:
    """For each parameter name, the dimension split across TP ranks (None: replicated).

    Read from the attributes megatron-core sets on its sharded parameters, so it stays
    right for any layer built from megatron's tensor_parallel modules.
    """
    dims: dict[str, int | None] = {}
    for name, param in model.named_parameters():
        sharded = getattr(param, "tensor_model_parallel", False)
        dims[name] = int(param.partition_dim) if sharded else None
    return dims


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the whole (unsharded) model, padded vocabulary and bottleneck included
    (the sum over its layout, tti_dist.models.layout)."""
    return model_layout(cfg).num_parameters
