"""The layout of the GPT a `ModelConfig` describes, derived without building the model.

One place answers, for a config: which blocks are dense and which MoE (and which carry the
stochastic bottleneck), which hookpoints exist (names, global widths, tensor-parallel
sharding), which linear layers exist (module paths, global shapes, column- or
row-parallel, their neuron directions) and every parameter (names, global shapes, the
dimension split across TP ranks), hence the parameter count.

    layout = model_layout(cfg)
    layout.hookpoint("blocks.1.mlp.act").width       # ffn_size
    layout.linear("blocks.0.attn.qkv").parallel      # 'column'
    layout.num_parameters                            # == sum of numel of the built model

Everything that needs this knowledge before (or without) a model reads it from here:
regularizer validation (hookpoint globs, orthogonality's weight globs), activation capture
names, parameter counts, eval's neuron-direction matrices. The model itself is built by
tti_dist.models.gpt / blocks / moe / bottleneck, and tests/unit/test_layout.py checks that
every built variant (dense, top-k, MoE, mixed, bottleneck; TP=2 in
tests/distributed/test_layout_tp.py) has exactly this layout.

Imports only tti_dist.config: config validation runs it before torch, megatron or DeepSpeed
matter (importing this module does not import tti_dist.models' heavy modules).

Conventions: names are module paths of the built GPT (`blocks.{i}.mlp.fc1`, parameters with
`.weight` / `.bias`); hookpoint names drop the `hook_` prefix (`blocks.{i}.mlp.act`).
Shapes are global (unsharded), in torch's layout (a linear weight is [out, in]). An MoE
expert is named by its global expert id, its module path at parallel.ep_size 1; with
ep_size > 1 an expert-parallel rank holds num_experts / ep_size of them, numbered locally.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from tti_dist.config.schema import ModelConfig

BLOCK_SITES = ("resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.act", "mlp.out", "resid_post")
"""Per-block hookpoints of a dense block, in data-flow order."""
MOE_SITES = ("moe.router_logits", "moe.router_probs", "moe.expert", "moe.out")
"""Hookpoints of an MoE layer, in data-flow order; in an MoE block they take the place of
the dense MLP's mlp.pre, mlp.act, mlp.out. router_logits and router_probs are
[batch, seq, moe_num_experts] (fp32, replicated across TP), expert is int64
[batch, seq, moe_top_k]: the expert of each route, first choice first, -1 where the route
was dropped by the capacity limit; out is the layer's output."""
MOE_BLOCK_SITES = ("resid_pre", "attn.z", "attn.out", "resid_mid") + MOE_SITES + ("resid_post",)
"""Per-block hookpoints of an MoE block, in data-flow order."""
BOTTLENECK_SITES = ("bottleneck.mu", "bottleneck.logvar", "bottleneck.z", "bottleneck.out")
"""Hookpoints of the stochastic bottleneck (block model.bottleneck_layer only), in data-flow
order; they follow that block's resid_post."""
BOTTLENECK_LATENT_SITES = frozenset({"bottleneck.mu", "bottleneck.logvar", "bottleneck.z"})
"""Bottleneck sites whose width is bottleneck_dim (the latents)."""
TP_SHARDED_SITES = frozenset({"attn.z", "mlp.pre", "mlp.act"}) | BOTTLENECK_LATENT_SITES
"""Sites whose last dimension is split across tensor-parallel ranks."""
INTEGER_SITES = frozenset({"tokens", "moe.expert"})
"""Sites holding int64 ids (token ids, expert ids) rather than float activations."""

ROUTER_MODULE = "moe.layer.deepspeed_moe.gate.wg"
"""Path of an MoE block's router (DeepSpeed's gate weight) below blocks.{i}."""
EXPERTS_MODULE = "moe.layer.deepspeed_moe.experts.deepspeed_experts"
"""Path of an MoE block's expert list below blocks.{i}; expert e is `<this>.{e}`."""

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

Parallel = Literal["column", "row"]
Direction = Literal["rows", "columns"]


@dataclass(frozen=True)
class Hookpoint:
    """A named activation of the model."""

    name: str
    """e.g. blocks.1.mlp.act."""
    width: int
    """Global (unsharded) size of the last dimension."""
    tp_sharded: bool
    """Whether the last dimension is split across tensor-parallel ranks (each holds width / tp_size)."""
    is_float: bool
    """False for int64 ids (tokens, moe.expert), which float statistics skip."""


@dataclass(frozen=True)
class Parameter:
    """A parameter of the model."""

    name: str
    """Parameter name as named_parameters() reports it, e.g. blocks.0.mlp.fc1.weight."""
    shape: tuple[int, ...]
    """Global (unsharded) shape."""
    tp_dim: int | None
    """Dimension split across TP ranks (megatron's partition_dim); None when replicated."""
    expert: bool = False
    """An MoE expert's parameter: held by one expert-parallel rank and reduced over the
    expert-data-parallel group (DeepSpeed's allreduce = False)."""

    @property
    def numel(self) -> int:
        """Elements of the whole parameter."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        """Shape of one TP rank's shard."""
        if self.tp_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.tp_dim] //= tp_size
        return tuple(shape)


@dataclass(frozen=True)
class Linear:
    """A linear layer (a weight matrix y = W x + b) of a block."""

    name: str
    """Module path, e.g. blocks.0.mlp.fc1; its weight is `<name>.weight`."""
    block: int
    """Index of its block."""
    role: str
    """What it is within the block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2, moe.router,
    moe.expert.fc1, moe.expert.fc2, bottleneck.enc_mu, bottleneck.enc_logvar, bottleneck.dec."""
    in_features: int
    """Global input width."""
    out_features: int
    """Global output width; the weight is [out_features, in_features]."""
    parallel: Parallel | None
    """column: output rows split across TP ranks (megatron ColumnParallelLinear); row: input
    columns split (RowParallelLinear, partial outputs all-reduced); None: replicated (the router)."""
    bias: bool
    """Whether it has a bias."""
    expert: int | None = None
    """Global expert id for an MoE expert's layer, else None."""

    @property
    def directions(self) -> Direction:
        """Where a unit's direction lies: rows of the weight (column-parallel and replicated
        layers: the input direction of each output unit, split across TP ranks with the
        rows) or columns (row-parallel: the output direction of each input unit)."""
        return "columns" if self.parallel == "row" else "rows"

    @property
    def num_directions(self) -> int:
        """Global number of directions (units)."""
        return self.in_features if self.directions == "columns" else self.out_features

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Global shape of the weight."""
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class BlockLayout:
    """One transformer block."""

    index: int
    """Block index i (names start with blocks.{i}.)."""
    kind: Literal["dense", "moe"]
    """dense: the GELU/ReLU MLP (`mlp.*`); moe: a routed mixture of experts (`moe.*`)."""
    mlp_topk: int
    """k of the dense MLP's top-k sparsity (0: all units; always 0 in an MoE block)."""
    has_bottleneck: bool
    """Whether the stochastic bottleneck follows this block's resid_post."""
    hookpoints: tuple[Hookpoint, ...]
    """Its hookpoints, in data-flow order."""
    linears: tuple[Linear, ...]
    """Its linear layers, in module order."""
    parameters: tuple[Parameter, ...]
    """Its parameters, in module order."""


@dataclass(frozen=True)
class ModelLayout:
    """The whole GPT: blocks, hookpoints, linear layers and parameters, in module order."""

    blocks: tuple[BlockLayout, ...]
    """One per block."""
    hookpoints: tuple[Hookpoint, ...]
    """tokens, embed, every block's hookpoints, final_norm."""
    linears: tuple[Linear, ...]
    """Every block's linear layers (the embedding and the output projection are not listed
    here; they are in `parameters`)."""
    parameters: tuple[Parameter, ...]
    """Every parameter, in named_parameters() order."""

    @functools.cached_property
    def _hookpoints_by_name(self) -> dict[str, Hookpoint]:
        return {h.name: h for h in self.hookpoints}

    @functools.cached_property
    def _linears_by_name(self) -> dict[str, Linear]:
        return {lin.name: lin for lin in self.linears}

    @property
    def hookpoint_names(self) -> list[str]:
        """Names of all hookpoints, in data-flow order."""
        return [h.name for h in self.hookpoints]

    def hookpoint(self, name: str) -> Hookpoint:
        """The hookpoint called `name` (KeyError when the model has none)."""
        return self._hookpoints_by_name[name]

    def linear(self, name: str) -> Linear:
        """The linear layer with module path `name` (KeyError when the model has none)."""
        return self._linears_by_name[name]

    @property
    def num_parameters(self) -> int:
        """Parameters of the whole (unsharded) model, padded vocabulary and bottleneck included."""
        return sum(p.numel for p in self.parameters)


def _linear_parameters(lin: Linear) -> list[Parameter]:
    weight_dim = {"column": 0, "row": 1, None: None}[lin.parallel]
    params = [Parameter(f"{lin.name}.weight", lin.weight_shape, weight_dim, lin.expert is not None)]
    if lin.bias:
        # A column-parallel bias is split with the output rows; a row-parallel one is added
        # after the all-reduce, so it is replicated.
        params.append(Parameter(f"{lin.name}.bias", (lin.out_features,), 0 if lin.parallel == "column" else None,
                                lin.expert is not None))
    return params


def _layernorm(name: str, cfg: ModelConfig) -> list[Parameter]:
    d = cfg.hidden_size
    return [Parameter(f"{name}.weight", (d,), None)] + ([Parameter(f"{name}.bias", (d,), None)] if cfg.bias else [])


def _site_hookpoint(prefix: str, site: str, cfg: ModelConfig) -> Hookpoint:
    if site == "tokens":
        width = 1
    elif site in ("mlp.pre", "mlp.act"):
        width = cfg.ffn_size
    elif site in ("moe.router_logits", "moe.router_probs"):
        width = cfg.moe_num_experts
    elif site == "moe.expert":
        width = cfg.moe_top_k
    elif site in BOTTLENECK_LATENT_SITES:
        width = cfg.bottleneck_dim
    else:
        width = cfg.hidden_size
    return Hookpoint(prefix + site, width, site in TP_SHARDED_SITES, site not in INTEGER_SITES)


def block_sites(cfg: ModelConfig, layer_index: int) -> tuple[str, ...]:
    """The hookpoint sites of block `layer_index`, in data-flow order."""
    sites = MOE_BLOCK_SITES if cfg.is_moe_block(layer_index) else BLOCK_SITES
    return sites + (BOTTLENECK_SITES if cfg.bottleneck_layer == layer_index else ())


def _block_layout(cfg: ModelConfig, i: int) -> BlockLayout:
    d, b, p = cfg.hidden_size, cfg.bias, f"blocks.{i}."
    moe = cfg.is_moe_block(i)
    # Module order of Block: ln1, attn (qkv, proj), ln2, mlp or moe, bottleneck.
    attn = [Linear(p + "attn.qkv", i, "attn.qkv", d, 3 * d, "column", b),
            Linear(p + "attn.proj", i, "attn.proj", d, d, "row", b)]
    if moe:
        fe = cfg.expert_ffn_size
        ffn = [Linear(p + ROUTER_MODULE, i, "moe.router", d, cfg.moe_num_experts, None, False)]
        for e in range(cfg.moe_num_experts):
            ffn += [Linear(f"{p}{EXPERTS_MODULE}.{e}.fc1", i, "moe.expert.fc1", d, fe, "column", b, e),
                    Linear(f"{p}{EXPERTS_MODULE}.{e}.fc2", i, "moe.expert.fc2", fe, d, "row", b, e)]
    else:
        ffn = [Linear(p + "mlp.fc1", i, "mlp.fc1", d, cfg.ffn_size, "column", b),
               Linear(p + "mlp.fc2", i, "mlp.fc2", cfg.ffn_size, d, "row", b)]
    bottleneck: list[Linear] = []
    if cfg.bottleneck_layer == i:
        z = cfg.bottleneck_dim
        # The logvar encoder always has a bias (models/bottleneck.py: its init value).
        bottleneck = [Linear(p + "bottleneck.enc_mu", i, "bottleneck.enc_mu", d, z, "column", b),
                      Linear(p + "bottleneck.enc_logvar", i, "bottleneck.enc_logvar", d, z, "column", True),
                      Linear(p + "bottleneck.dec", i, "bottleneck.dec", z, d, "row", b)]
    params = _layernorm(p + "ln1", cfg)
    params += [q for lin in attn for q in _linear_parameters(lin)]
    params += _layernorm(p + "ln2", cfg)
    params += [q for lin in ffn for q in _linear_parameters(lin)]
    if bottleneck:
        params += _layernorm(p + "bottleneck.ln", cfg)
        params += [q for lin in bottleneck for q in _linear_parameters(lin)]
    return BlockLayout(
        index=i, kind="moe" if moe else "dense", mlp_topk=0 if moe else cfg.mlp_topk,
        has_bottleneck=bool(bottleneck),
        hookpoints=tuple(_site_hookpoint(p, site, cfg) for site in block_sites(cfg, i)),
        linears=tuple(attn + ffn + bottleneck), parameters=tuple(params),
    )


@functools.lru_cache(maxsize=64)
def model_layout(cfg: ModelConfig) -> ModelLayout:
    """The layout of the GPT built from `cfg` (cached: configs are frozen)."""
    d, v = cfg.hidden_size, cfg.padded_vocab_size
    blocks = tuple(_block_layout(cfg, i) for i in range(cfg.num_layers))
    params = [Parameter("embedding.weight", (v, d), 0)]
    if cfg.position_embedding == "learned":
        params.append(Parameter("position_embedding.weight", (cfg.max_seq_len, d), None))
    params += [q for blk in blocks for q in blk.parameters]
    params += _layernorm("final_norm", cfg)
    if not cfg.tie_embeddings:
        # Tied: the output projection borrows the embedding's weight and has none of its own.
        params.append(Parameter("output_layer.weight", (v, d), 0))
    hookpoints = (_site_hookpoint("", "tokens", cfg), _site_hookpoint("", "embed", cfg))
    hookpoints += tuple(h for blk in blocks for h in blk.hookpoints) + (_site_hookpoint("", "final_norm", cfg),)
    return ModelLayout(blocks=blocks, hookpoints=hookpoints, linears=tuple(lin for blk in blocks for lin in blk.linears),
                       parameters=tuple(params))


# ---------------------------------------------------------------------- name helpers


def gpt_hookpoint_names(cfg: ModelConfig) -> list[str]:
    """tokens, embed, blocks.{i}.<site> for every block and site, final_norm."""
    return model_layout(cfg).hookpoint_names


def split_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.mlp.act' -> (3, 'mlp.act'); 'embed' -> (None, 'embed')."""
    m = _BLOCK_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def hookpoint_width(name: str, cfg: ModelConfig) -> int:
    """Global (unsharded) last-dimension size of hookpoint `name` of the GPT built from
    `cfg` (KeyError for a name the model does not have)."""
    return model_layout(cfg).hookpoint(name).width


def is_tp_sharded(name: str) -> bool:
    """Whether hookpoint `name`'s last dimension is split across tensor-parallel ranks."""
    return split_name(name)[1] in TP_SHARDED_SITES


def is_moe_site(name: str, site: str) -> bool:
    """True for blocks.{i}.<site> with `site` one of MOE_SITES (e.g. 'moe.router_probs')."""
    index, found = split_name(name)
    return index is not None and found == site


def is_bottleneck_latent(name: str) -> bool:
    """True for blocks.{i}.bottleneck.z (the sampled latents the kl / total_correlation
    regularizers read)."""
    index, site = split_name(name)
    return index is not None and site == "bottleneck.z"
