"""Export a run as a HuggingFace transformers model directory (`tti export --format hf`).

The checkpoint is consolidated to the TP=1 state dict of tti_dist.models.gpt.GPT
(tti_dist.train.export: TP shards merged, ZeRO partitions gathered) and its tensors are
renamed and re-laid-out by hand into a standard architecture whose forward is the same
function (docs/interop.md has the table):

- learned positions -> GPT-2 (`GPT2LMHeadModel`). GPT-2 is pre-norm with learned absolute
  positions like our model. Its fused `c_attn` is a Conv1D ([in, out], the transpose of
  nn.Linear) whose outputs are [q | k | v], each head by head; ours are [head][q|k|v][hd], so
  the rows are regrouped before transposing.
- rope -> GPT-NeoX (`GPTNeoXForCausalLM`, sequential residual, rotary on the whole head,
  base model.rope_base). Its `query_key_value` is laid out [head][q|k|v][hd] exactly like
  ours and its rotary embedding is the same "rotate half" form, so tensors copy as they are.

Both take the MLP activation by name ("gelu" is transformers' erf GELU, F.gelu, as ours;
"relu"), scale attention by 1/sqrt(head_dim) and apply LayerNorm with model.layernorm_eps.
Where our model has no bias (model.bias: false) the HF module's bias is exported as zeros:
adding 0 changes nothing, so the function is the same. The padded vocabulary rows
(model.padded_vocab_size > model.vocab_size) are cut: token ids >= vocab_size never occur.
Dropout probabilities are 0 (the eval-mode function).

Options that change the function in a way neither architecture can express are refused
before anything is read or written (`check_exportable`).

The directory is built in a temporary sibling and renamed into place, so `out` either does
not exist or holds a complete export.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tti_dist.config.schema import ModelConfig
from tti_dist.data.tokenizer import load_tokenizer
from tti_dist.errors import ConfigError
from tti_dist.rundir import RunDir
from tti_dist.train.export import consolidated_state_dict
from tti_dist.train.hf_tokenizer import save_hf_tokenizer

logger = logging.getLogger(__name__)

EXPORT_INFO_FILE = "tti_export.json"
GPT2 = "GPT2LMHeadModel"
NEOX = "GPTNeoXForCausalLM"


def check_exportable(cfg: ModelConfig) -> None:
    """ConfigError naming the first model option GPT-2/GPT-NeoX cannot express."""
    refused = [
        ("model.mlp_topk", cfg.mlp_topk, cfg.mlp_topk > 0, "a top-k MLP has no GPT-2/GPT-NeoX equivalent"),
        ("model.mlp_mask_density", cfg.mlp_mask_density, cfg.mlp_mask_density < 1.0,
         "a hard-masked MLP has no GPT-2/GPT-NeoX equivalent"),
        ("model.abs_topk_fraction", cfg.abs_topk_fraction, cfg.abs_topk_k > 0,
         "AbsTopK activation sparsity has no GPT-2/GPT-NeoX equivalent"),
        ("model.bottleneck_layer", cfg.bottleneck_layer, cfg.bottleneck_layer is not None,
         "a stochastic bottleneck has no GPT-2/GPT-NeoX equivalent"),
        ("model.moe_num_experts", cfg.moe_num_experts, cfg.moe_num_experts > 0,
         "mixture-of-experts blocks have no GPT-2/GPT-NeoX equivalent"),
    ]
    for field, value, on, why in refused:
        if on:
            raise ConfigError(f"{field}: {value!r} cannot be exported with --format hf ({why}); "
                              "use --format tti")


def hf_architecture(cfg: ModelConfig) -> str:
    """GPT2LMHeadModel for learned positions, GPTNeoXForCausalLM for rope."""
    return GPT2 if cfg.position_embedding == "learned" else NEOX


def hf_config_kwargs(cfg: ModelConfig, eos_id: int | None) -> dict:
    """Keyword arguments of the transformers config (GPT2Config / GPTNeoXConfig) of `cfg`."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "bos_token_id": eos_id, "eos_token_id": eos_id,
              "architectures": [hf_architecture(cfg)]}
    if hf_architecture(cfg) == GPT2:
        return {**common, "n_positions": cfg.max_seq_len, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
                "n_head": cfg.num_heads, "n_inner": cfg.ffn_size, "activation_function": cfg.mlp_activation,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
                "layer_norm_epsilon": cfg.layernorm_eps, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    return {**common, "max_position_embeddings": cfg.max_seq_len, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.ffn_size, "hidden_act": cfg.mlp_activation,
            "attention_dropout": 0.0, "hidden_dropout": 0.0, "classifier_dropout": 0.0,
            "layer_norm_eps": cfg.layernorm_eps, "use_parallel_residual": False, "attention_bias": cfg.bias,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": 1.0}}


def hf_config(cfg: ModelConfig, eos_id: int | None):
    """The transformers config object (GPT2Config or GPTNeoXConfig) of `cfg`."""
    # lazy: transformers takes seconds to import; only the hf export needs it
    from transformers import GPT2Config, GPTNeoXConfig

    config_class = GPT2Config if hf_architecture(cfg) == GPT2 else GPTNeoXConfig
    return config_class(**hf_config_kwargs(cfg, eos_id))


def _bias(state: dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    """Our bias, or zeros where the model has none (model.bias: false): the same function."""
    return state[name] if name in state else torch.zeros(size)


def gpt2_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our TP=1 GPT state dict as GPT2LMHeadModel's (learned positions)."""
    H, nh, V = cfg.hidden_size, cfg.num_heads, cfg.vocab_size
    hd = H // nh
    out = {"transformer.wte.weight": state["embedding.weight"][:V],
           "transformer.wpe.weight": state["position_embedding.weight"],
           "transformer.ln_f.weight": state["final_norm.weight"],
           "transformer.ln_f.bias": _bias(state, "final_norm.bias", H)}
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        # qkv rows [head][q|k|v][hd] -> [q|k|v][head][hd]; then Conv1D's [in, out] layout.
        qkv_w = state[ours + "attn.qkv.weight"].view(nh, 3, hd, H).transpose(0, 1).reshape(3 * H, H)
        qkv_b = _bias(state, ours + "attn.qkv.bias", 3 * H).view(nh, 3, hd).transpose(0, 1).reshape(3 * H)
        out.update({
            hf + "ln_1.weight": state[ours + "ln1.weight"],
            hf + "ln_1.bias": _bias(state, ours + "ln1.bias", H),
            hf + "attn.c_attn.weight": qkv_w.t(),
            hf + "attn.c_attn.bias": qkv_b,
            hf + "attn.c_proj.weight": state[ours + "attn.proj.weight"].t(),
            hf + "attn.c_proj.bias": _bias(state, ours + "attn.proj.bias", H),
            hf + "ln_2.weight": state[ours + "ln2.weight"],
            hf + "ln_2.bias": _bias(state, ours + "ln2.bias", H),
            hf + "mlp.c_fc.weight": state[ours + "mlp.fc1.weight"].t(),
            hf + "mlp.c_fc.bias": _bias(state, ours + "mlp.fc1.bias", cfg.ffn_size),
            hf + "mlp.c_proj.weight": state[ours + "mlp.fc2.weight"].t(),
            hf + "mlp.c_proj.bias": _bias(state, ours + "mlp.fc2.bias", H),
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:V]
    return {k: v.contiguous() for k, v in out.items()}


def neox_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our TP=1 GPT state dict as GPTNeoXForCausalLM's (rope; sequential residual)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = {"gpt_neox.embed_in.weight": state["embedding.weight"][:V],
           "gpt_neox.final_layer_norm.weight": state["final_norm.weight"],
           "gpt_neox.final_layer_norm.bias": _bias(state, "final_norm.bias", H)}
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        out.update({
            hf + "input_layernorm.weight": state[ours + "ln1.weight"],
            hf + "input_layernorm.bias": _bias(state, ours + "ln1.bias", H),
            # Same [head][q|k|v][hd] row layout as ours: a plain copy.
            hf + "attention.query_key_value.weight": state[ours + "attn.qkv.weight"],
            hf + "attention.dense.weight": state[ours + "attn.proj.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "ln2.weight"],
            hf + "post_attention_layernorm.bias": _bias(state, ours + "ln2.bias", H),
            hf + "mlp.dense_h_to_4h.weight": state[ours + "mlp.fc1.weight"],
            hf + "mlp.dense_h_to_4h.bias": _bias(state, ours + "mlp.fc1.bias", cfg.ffn_size),
            hf + "mlp.dense_4h_to_h.weight": state[ours + "mlp.fc2.weight"],
            hf + "mlp.dense_4h_to_h.bias": _bias(state, ours + "mlp.fc2.bias", H),
        })
        if cfg.bias:  # attention_bias: false leaves these out of the NeoX model
            out[hf + "attention.query_key_value.bias"] = state[ours + "attn.qkv.bias"]
            out[hf + "attention.dense.bias"] = state[ours + "attn.proj.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"][:V]
    return {k: v.contiguous() for k, v in out.items()}


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our TP=1 GPT state dict in the exported architecture's names and layouts."""
    check_exportable(cfg)
    mapped = gpt2_state_dict(cfg, state) if hf_architecture(cfg) == GPT2 else neox_state_dict(cfg, state)
    return {k: v.detach().float() for k, v in mapped.items()}


def build_hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor], eos_id: int | None = None):
    """The transformers model (eval mode, fp32) holding our weights; every HF parameter is
    set from `state` (tied output weights share the embedding), else RuntimeError."""
    # lazy: transformers takes seconds to import; only the hf export needs it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(cfg, eos_id), dtype=torch.float32)
    mapped = hf_state_dict(cfg, state)
    result = model.load_state_dict(mapped, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {result.unexpected_keys}")
    if cfg.tie_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("tied output embedding does not share the input embedding")
    return model.eval()


def run_tokenizer(data_path: str | None):
    """The tokenizer of the run's dataset, or None when the dataset is gone (moved or deleted)."""
    if data_path is None or not (Path(data_path) / "manifest.json").is_file():
        return None
    manifest = json.loads((Path(data_path) / "manifest.json").read_text())
    return load_tokenizer(data_path, manifest["tokenizer"])


def check_transformers_installed() -> None:
    """ConfigError when the transformers library (the `interop` extra) is missing."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("--format: 'hf' needs the transformers library; "
                          "install it with pip install 'tti_dist[interop]'")


def check_out_dir(out: Path) -> None:
    """ConfigError unless `out` is absent or an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: '{out}' already exists and is not an empty directory; "
                          "choose a new directory (tti export never overwrites)")


def _save_quietly(model, directory: Path) -> None:
    """`save_pretrained` (config.json, generation_config.json, model.safetensors) without its
    progress bar: stderr is for tti's log and errors."""
    # lazy: transformers takes seconds to import; only the hf export needs it
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(directory))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _ordinary_permissions(directory: Path) -> None:
    """The umask's permissions for the directory and its files (mkdtemp makes the directory
    owner-only, and the safetensors file comes out owner-only too): an export is shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def export_hf(run_dir: str | Path, out: str | Path, checkpoint: str | None = None) -> Path:
    """Write the run's checkpoint as a transformers model directory at `out`.

    Holds config.json and model.safetensors (`save_pretrained`), generation_config.json,
    tokenizer.json and tokenizer_config.json when the dataset is at hand, and
    tti_export.json (provenance). Bad input is a ConfigError before anything is written.
    """
    out = Path(out)
    cfg = RunDir(Path(run_dir)).load_config()
    check_exportable(cfg.model)
    check_transformers_installed()
    check_out_dir(out)
    cfg, state, tag = consolidated_state_dict(run_dir, checkpoint)
    tokenizer = run_tokenizer(cfg.data.path)
    if tokenizer is None:
        logger.warning("dataset %s not found: exporting without tokenizer files", cfg.data.path)
    model = build_hf_model(cfg.model, state, None if tokenizer is None else tokenizer.eos_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _save_quietly(model, tmp)
        tokenizer_files = [] if tokenizer is None else save_hf_tokenizer(tokenizer, tmp, cfg.model.max_seq_len)
        info = {
            "format": "tti_dist.hf_export", "source_run": str(Path(run_dir).resolve()), "checkpoint": tag,
            "architecture": hf_architecture(cfg.model), "model_type": model.config.model_type,
            "vocab_size": cfg.model.vocab_size, "padded_vocab_size": cfg.model.padded_vocab_size,
            "vocab_rows_cut": cfg.model.padded_vocab_size - cfg.model.vocab_size,
            "trained_tp_size": cfg.parallel.tp_size, "trained_dropout": cfg.model.dropout,
            "zero_biases_added": not cfg.model.bias,
            "tokenizer": None if tokenizer is None else {
                "name": tokenizer.name, "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size,
                "files": tokenizer_files},
        }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _ordinary_permissions(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s of %s as %s to %s", tag, run_dir, info["architecture"], out)
    return out
