"""Validation of a `RunConfig`, run once before any process group starts.

Each check raises `ConfigError` with one line: the field path, the value given and what is
allowed. Checks that involve the number of processes take it as an argument, because the
launcher knows it (`--nproc`, or the Ray worker count) and the config alone does not.
The regularizer entries are field-checked when they are loaded (config.regularizers); their
checks against the model's layout are in tti_dist.regularizers.validation, whose
`validate_run_config` runs these checks and then those.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path


from tti_dist.config.schema import (
    ABS_TOPK_SITES,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    WandbConfig,
    ZeroConfig,
)
from tti_dist.data.tokenizer import MAX_BPE_VOCAB_SIZE, MIN_BPE_VOCAB_SIZE, load_pretrained_tokenizer
from tti_dist.errors import ConfigError


def validate_config(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise `ConfigError` on the first problem found in the sections' fields; None when they
    are usable. The regularizer entries' checks against the model are not made here
    (tti_dist.regularizers.validation.validate_run_config makes both)."""
    _validate_model(cfg)
    _validate_parallel(cfg, world_size)
    _validate_optim(cfg)
    _validate_train(cfg)
    _validate_data(cfg)
    _validate_logging_and_checkpoint(cfg)
    if cfg.weight_sparsity is not None:
        cfg.weight_sparsity.validate()
        if cfg.zero.stage == 3:
            # ZeRO-3 partitions the parameters themselves: no rank holds a whole matrix to rank.
            raise ConfigError("zero.stage: 3 is not supported with weight_sparsity (each matrix's top-|w| "
                              "selection needs its whole TP shard on every rank); use stage 0, 1 or 2")


def _finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} must be a finite number")


def _positive(value: float, where: str) -> None:
    _finite(value, where)
    if value <= 0:
        raise ConfigError(f"{where}: {value!r} must be > 0")


def _non_negative(value: float, where: str) -> None:
    _finite(value, where)
    if value < 0:
        raise ConfigError(f"{where}: {value!r} must be >= 0")


def _validate_model(cfg: RunConfig) -> None:
    m = cfg.model
    for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "vocab_pad_multiple", "max_seq_len"):
        _positive(getattr(m, name), f"model.{name}")
    if m.ffn_hidden_size is not None:
        _positive(m.ffn_hidden_size, "model.ffn_hidden_size")
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.num_heads: {m.num_heads} must divide model.hidden_size ({m.hidden_size})"
        )
    head_dim = m.hidden_size // m.num_heads
    if m.position_embedding == "rope" and head_dim % 2:
        raise ConfigError(
            f"model.position_embedding: 'rope' needs an even head dimension; "
            f"hidden_size/num_heads = {head_dim}"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: {m.dropout!r} must be in [0, 1)")
    _positive(m.layernorm_eps, "model.layernorm_eps")
    _positive(m.init_std, "model.init_std")
    _positive(m.rope_base, "model.rope_base")
    if not 0 <= m.mlp_topk <= m.ffn_size:
        raise ConfigError(
            f"model.mlp_topk: {m.mlp_topk!r} must be in 0..ffn_size ({m.ffn_size}); 0 keeps all units"
        )
    _finite(m.mlp_mask_density, "model.mlp_mask_density")
    kept = round(m.mlp_mask_density * m.ffn_size)
    if not 0.0 < m.mlp_mask_density <= 1.0 or kept < 1:
        raise ConfigError(
            f"model.mlp_mask_density: {m.mlp_mask_density!r} must be in (0, 1] and keep at least one of "
            f"the {m.ffn_size} MLP units"
        )
    if m.mlp_topk and m.mlp_mask_density < 1.0 and m.mlp_topk > kept:
        raise ConfigError(
            f"model.mlp_topk: {m.mlp_topk} exceeds the {kept} units the hard mask keeps "
            f"(mlp_mask_density {m.mlp_mask_density} x ffn_size {m.ffn_size}); lower it or raise the density"
        )
    if m.mlp_mask_seed < 0:
        raise ConfigError(f"model.mlp_mask_seed: {m.mlp_mask_seed!r} must be >= 0")
    _finite(m.abs_topk_fraction, "model.abs_topk_fraction")
    if not 0.0 < m.abs_topk_fraction <= 1.0 or (m.abs_topk_fraction < 1.0 and m.abs_topk_k < 1):
        raise ConfigError(
            f"model.abs_topk_fraction: {m.abs_topk_fraction!r} must be in (0, 1] and keep at least one of the "
            f"{m.hidden_size} entries per token (floor(fraction x hidden_size) >= 1); 1.0 switches it off"
        )
    for site in m.abs_topk_sites:
        if site not in ABS_TOPK_SITES:
            hint = " (the MLP units' AbsTopK is model.mlp_topk with mlp_topk_by: abs)" if site == "mlp_neuron" else ""
            raise ConfigError(f"model.abs_topk_sites: {site!r} is not a site; allowed: {', '.join(ABS_TOPK_SITES)}"
                              + hint)
    if len(set(m.abs_topk_sites)) != len(m.abs_topk_sites) or not m.abs_topk_sites:
        raise ConfigError(f"model.abs_topk_sites: {list(m.abs_topk_sites)!r} must name each site once, "
                          "and at least one")
    if m.bottleneck_layer is not None and not 0 <= m.bottleneck_layer < m.num_layers:
        raise ConfigError(
            f"model.bottleneck_layer: {m.bottleneck_layer!r} must be a block index in 0..{m.num_layers - 1} or null"
        )
    _positive(m.bottleneck_dim, "model.bottleneck_dim")
    _validate_moe(cfg)


def _validate_moe(cfg: RunConfig) -> None:
    m = cfg.model
    if m.moe_num_experts < 0:
        raise ConfigError(f"model.moe_num_experts: {m.moe_num_experts!r} must be >= 0 (0: dense model)")
    if m.moe_num_experts == 0:
        return
    if not 1 <= m.moe_top_k <= m.moe_num_experts:
        raise ConfigError(
            f"model.moe_top_k: {m.moe_top_k!r} must be in 1..moe_num_experts ({m.moe_num_experts})"
        )
    if not 1 <= m.moe_layer_interval <= m.num_layers:
        raise ConfigError(
            f"model.moe_layer_interval: {m.moe_layer_interval!r} must be in 1..num_layers ({m.num_layers})"
        )
    _positive(m.moe_capacity_factor, "model.moe_capacity_factor")
    _positive(m.moe_eval_capacity_factor, "model.moe_eval_capacity_factor")
    # The capacity bound below multiplies these; a bad one must be reported as itself.
    _positive(cfg.train.micro_batch_size, "train.micro_batch_size")
    _positive(cfg.data.seq_len, "data.seq_len")
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    if not 0 <= m.moe_min_capacity <= tokens:
        raise ConfigError(
            f"model.moe_min_capacity: {m.moe_min_capacity!r} must be in 0..{tokens} (the tokens of one "
            f"micro-batch: train.micro_batch_size x data.seq_len)"
        )
    if m.moe_ffn_hidden_size is not None:
        _positive(m.moe_ffn_hidden_size, "model.moe_ffn_hidden_size")
    if cfg.zero.stage == 3:
        raise ConfigError(
            "zero.stage: 3 is not supported with model.moe_num_experts > 0 (DeepSpeed's MoE does not run "
            "under ZeRO-3, and Megatron's MoE averages different experts' gradients there); use stage 0, 1 or 2"
        )


def _validate_parallel(cfg: RunConfig, world_size: int | None) -> None:
    p, m = cfg.parallel, cfg.model
    _positive(p.tp_size, "parallel.tp_size")
    _positive(p.dp_size, "parallel.dp_size")
    tp = p.tp_size
    for field, size in (
        ("model.num_heads", m.num_heads),
        ("model.hidden_size", m.hidden_size),
        ("model.ffn_hidden_size", m.ffn_size),
        ("model.vocab_size (padded to vocab_pad_multiple)", m.padded_vocab_size),
        *((("model.bottleneck_dim", m.bottleneck_dim),) if m.bottleneck_layer is not None else ()),
        *((("model.moe_ffn_hidden_size (ffn_size when null)", m.expert_ffn_size),) if m.moe_num_experts else ()),
    ):
        if size % tp:
            raise ConfigError(f"parallel.tp_size: {tp} must divide {field} = {size}")
    _positive(p.ep_size, "parallel.ep_size")
    if p.ep_size > 1 and m.moe_num_experts == 0:
        raise ConfigError(f"parallel.ep_size: {p.ep_size} needs an MoE model; set model.moe_num_experts or use ep_size 1")
    if m.moe_num_experts % p.ep_size:
        raise ConfigError(
            f"model.moe_num_experts: {m.moe_num_experts} is not divisible by parallel.ep_size = {p.ep_size}; "
            "each expert-parallel rank holds the same number of experts"
        )
    if p.dp_size % p.ep_size:
        raise ConfigError(
            f"parallel.ep_size: {p.ep_size} must divide parallel.dp_size = {p.dp_size} (expert-parallel "
            "groups are carved out of the data-parallel group)"
        )
    if world_size is not None and world_size != p.world_size:
        raise ConfigError(
            f"parallel: tp_size * dp_size = {tp} * {p.dp_size} = {p.world_size} "
            f"but the job has {world_size} processes; make them equal"
        )
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage: {cfg.zero.stage!r} is not allowed; choose 0, 1, 2 or 3")
    _positive(cfg.zero.reduce_bucket_size, "zero.reduce_bucket_size")
    _positive(cfg.zero.allgather_bucket_size, "zero.allgather_bucket_size")


def _validate_optim(cfg: RunConfig) -> None:
    o = cfg.optim
    _positive(o.lr, "optim.lr")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: {o.min_lr_ratio!r} must be in [0, 1]")
    _non_negative(o.warmup_steps, "optim.warmup_steps")
    _non_negative(o.weight_decay, "optim.weight_decay")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optim.{name}: {value!r} must be in [0, 1)")
    _positive(o.eps, "optim.eps")
    _non_negative(o.grad_clip, "optim.grad_clip")
    _positive(cfg.train.steps, "train.steps")  # before the comparison that reads it
    if o.warmup_steps >= cfg.train.steps:
        raise ConfigError(
            f"optim.warmup_steps: {o.warmup_steps} must be < train.steps = {cfg.train.steps} "
            "(the schedule decays to lr * min_lr_ratio at the last step)"
        )


def _validate_train(cfg: RunConfig) -> None:
    t = cfg.train
    _positive(t.steps, "train.steps")
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.grad_accum_steps, "train.grad_accum_steps")
    _non_negative(t.eval_every, "train.eval_every")
    _positive(t.eval_batches, "train.eval_batches")
    _positive(t.dist_timeout_s, "train.dist_timeout_s")
    if not 0 <= t.seed < 2**63:
        # The data order's generator refuses negative seeds (inside the ranks), and torch's
        # manual_seed overflows past 2**64 once the per-rank strides are added.
        raise ConfigError(f"train.seed: {t.seed!r} must be an integer in 0..2**63 - 1")
    _validate_compile(cfg)


def _validate_compile(cfg: RunConfig) -> None:
    """train.compile: the combinations that cannot compile are refused here, not at step 1."""
    if not cfg.train.compile:
        return
    if cfg.zero.stage == 3:
        # Measured with DeepSpeed 0.19.8: its ZeRO-3 gather/release hooks run under
        # torch.compiler.disable, which splits the graph at every module (44 breaks on a
        # 2-block GPT): the result is eager execution with extra overhead.
        raise ConfigError(
            "train.compile: true is not supported with zero.stage 3 (DeepSpeed's ZeRO-3 parameter hooks "
            "split the compiled graph at every module); use zero.stage 0, 1 or 2, or train.compile false"
        )
    if cfg.model.moe_num_experts:
        # DeepSpeed's gate reads capacities and counts with Tensor.item() (graph breaks),
        # and its expert all-to-all has not been verified under compilation.
        raise ConfigError(
            "train.compile: true is not supported with model.moe_num_experts > 0 (DeepSpeed's MoE gate "
            "syncs with the host inside the forward); use train.compile false"
        )


def _validate_data(cfg: RunConfig) -> None:
    d = cfg.data
    _positive(d.seq_len, "data.seq_len")
    _positive(d.max_bytes, "data.max_bytes")
    _positive(d.bpe_sample_bytes, "data.bpe_sample_bytes")
    is_file = d.tokenizer.endswith(".json")
    if d.tokenizer not in ("byte", "bpe") and not is_file:
        raise ConfigError(
            f"data.tokenizer: {d.tokenizer!r} is not allowed; use byte, bpe or a path to a HuggingFace "
            "tokenizer .json file"
        )
    if d.eos_token is not None and not is_file:
        raise ConfigError(
            f"data.eos_token: {d.eos_token!r} is not allowed with data.tokenizer {d.tokenizer!r}, whose "
            "end-of-document token is fixed; set it only with a tokenizer .json file, or remove it"
        )
    if d.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {d.seq_len} exceeds model.max_seq_len = {cfg.model.max_seq_len}"
        )
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {d.val_fraction!r} must be in (0, 1)")
    if d.path is not None:
        if not (Path(d.path) / "manifest.json").is_file():
            raise ConfigError(
                f"data.path: '{d.path}' is not a dataset directory (no manifest.json); "
                "build one with `tti data build` or `tti data synth`, or leave data.path null"
            )
        return
    if d.source == "synthetic:factored":
        return
    if not d.source:
        # Path('') is the working directory, which would be read as a corpus.
        raise ConfigError(
            "data.source: '' is empty; use 'stdlib', 'shakespeare', 'synthetic:factored', or a path to a "
            "text file, directory, .jsonl, .parquet or .arrow file"
        )
    if not d.text_field:
        raise ConfigError("data.text_field: '' is empty; name the JSONL field or Parquet/Arrow column holding the text")
    if d.source not in ("stdlib", "shakespeare") and not Path(d.source).exists():
        raise ConfigError(
            f"data.source: '{d.source}' does not exist; use 'stdlib', 'shakespeare', 'synthetic:factored', "
            "or a path to a text file, directory, .jsonl, .parquet or .arrow file"
        )
    if d.tokenizer == "byte" and cfg.model.vocab_size < 257:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the byte-level tokenizer's 257 tokens"
        )
    if d.tokenizer == "bpe" and not MIN_BPE_VOCAB_SIZE <= cfg.model.vocab_size <= MAX_BPE_VOCAB_SIZE:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is not allowed with data.tokenizer bpe, which trains "
            f"that many tokens; use an integer in [{MIN_BPE_VOCAB_SIZE}, {MAX_BPE_VOCAB_SIZE}]"
        )
    if is_file:
        # Loaded here so a bad file, an undeterminable end-of-document token or a too-small
        # model fail before the dataset build, not after it.
        tok = load_pretrained_tokenizer(d.tokenizer, d.eos_token, field="data.tokenizer", eos_field="data.eos_token")
        if cfg.model.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the {tok.vocab_size} tokens of "
                f"data.tokenizer {d.tokenizer!r}; set model.vocab_size: {tok.vocab_size} or more"
            )


def _validate_logging_and_checkpoint(cfg: RunConfig) -> None:
    _positive(cfg.logging.log_every, "logging.log_every")
    if cfg.logging.wandb is not None:
        _validate_wandb(cfg.logging.wandb)
    _non_negative(cfg.checkpoint.every, "checkpoint.every")
    _non_negative(cfg.checkpoint.keep_last, "checkpoint.keep_last")
    _positive(cfg.checkpoint.signal_grace_s, "checkpoint.signal_grace_s")


def _validate_wandb(w: WandbConfig) -> None:
    """logging.wandb: a project, no empty names, and (unless disabled) the wandb package."""
    if w.project is None or not w.project.strip():
        raise ConfigError(f"logging.wandb.project: {w.project!r}; name the W&B project to log to")
    for name in ("entity", "group", "name"):
        value = getattr(w, name)
        if value is not None and not value.strip():
            raise ConfigError(f"logging.wandb.{name}: {value!r} must be a non-empty string or null")
    for i, tag in enumerate(w.tags):
        if not tag.strip():
            raise ConfigError(f"logging.wandb.tags[{i}]: {tag!r} must be a non-empty string")
    # find_spec locates the package without importing it (importing wandb takes ~1 s).
    if w.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb: mode {w.mode!r} needs the wandb package, which is not installed; "
                          "pip install wandb (or the tti_dist[wandb] extra), or remove logging.wandb")


def ignored_settings(cfg: RunConfig) -> list[str]:
    """Settings that the rest of the config makes ineffective; the trainer warns once about each.

    Compared against the schema defaults, so only values a user actually set are reported.
    """
    notes = []
    if cfg.model.position_embedding != "rope" and cfg.model.rope_base != ModelConfig.rope_base:
        notes.append(f"model.rope_base: {cfg.model.rope_base!r} is ignored with position_embedding "
                     f"{cfg.model.position_embedding!r}")
    m = cfg.model
    if m.mlp_topk == 0 and m.mlp_topk_by != ModelConfig.mlp_topk_by:
        notes.append(f"model.mlp_topk_by: {m.mlp_topk_by!r} is ignored with mlp_topk 0")
    if m.mlp_mask_density == 1.0 and m.mlp_mask_seed != ModelConfig.mlp_mask_seed:
        notes.append(f"model.mlp_mask_seed: {m.mlp_mask_seed} is ignored with mlp_mask_density 1.0")
    if m.abs_topk_fraction == 1.0 and m.abs_topk_sites != ModelConfig.abs_topk_sites:
        notes.append(f"model.abs_topk_sites: {list(m.abs_topk_sites)!r} is ignored with abs_topk_fraction 1.0")
    if m.moe_num_experts == 0:
        for name in ("moe_top_k", "moe_layer_interval", "moe_capacity_factor", "moe_eval_capacity_factor",
                     "moe_min_capacity", "moe_drop_tokens", "moe_ffn_hidden_size"):
            if getattr(m, name) != getattr(ModelConfig, name):
                notes.append(f"model.{name}: {getattr(m, name)!r} is ignored with moe_num_experts 0")
    elif len(m.moe_blocks) == m.num_layers:
        for name in ("mlp_topk", "mlp_mask_density"):
            if getattr(m, name) != getattr(ModelConfig, name):
                notes.append(f"model.{name}: {getattr(m, name)!r} is ignored: every block is an MoE block "
                             "(it applies to the dense MLP only)")
    if m.bottleneck_layer is None and m.bottleneck_dim != ModelConfig.bottleneck_dim:
        notes.append(f"model.bottleneck_dim: {m.bottleneck_dim} is ignored with bottleneck_layer null")
    if cfg.zero.stage in (0, 3) and cfg.zero.allgather_bucket_size != ZeroConfig.allgather_bucket_size:
        notes.append(f"zero.allgather_bucket_size: {cfg.zero.allgather_bucket_size} is ignored with "
                     f"zero.stage {cfg.zero.stage} (used by stages 1 and 2)")
    if cfg.train.eval_every == 0 and cfg.train.eval_batches != TrainConfig.eval_batches:
        notes.append(f"train.eval_batches: {cfg.train.eval_batches} is ignored with train.eval_every 0")
    if cfg.data.path is not None:
        for name in ("source", "tokenizer", "eos_token", "bpe_sample_bytes", "text_field", "max_bytes",
                     "val_fraction"):
            if getattr(cfg.data, name) != getattr(DataConfig, name):
                notes.append(f"data.{name}: {getattr(cfg.data, name)!r} is ignored when data.path is set "
                             "(the dataset was built already)")
    elif cfg.data.tokenizer != "bpe" and cfg.data.bpe_sample_bytes != DataConfig.bpe_sample_bytes:
        notes.append(f"data.bpe_sample_bytes: {cfg.data.bpe_sample_bytes} is ignored with data.tokenizer "
                     f"{cfg.data.tokenizer!r} (it sizes the BPE training sample)")
    if cfg.checkpoint.every == 0 and not cfg.checkpoint.save_final:
        notes.append("checkpoint: every 0 and save_final false: this run saves no checkpoint")
    return notes
