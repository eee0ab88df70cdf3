"""SAELens's on-disk format (sae-lens 6.x) for one of tti's SAEs: what `tti sae export` writes.

    DIR/cfg.json                 SAELens's SAEConfig.to_dict(): d_in, d_sae, dtype, device,
                                 apply_b_dec_to_input, normalize_activations, reshape_activations,
                                 architecture ("topk" with k, or "standard"), metadata
                                 (sae_lens_version, model_name, hook_name, context_size, ...)
    DIR/sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
                                 (+ threshold [d_sae] for architecture "jumprelu")
    DIR/tti_provenance.json      where it came from (run, checkpoint, entry or fit directory, site)

`sae_lens.SAE.load_from_disk(DIR)` reads the first two (SAELens ignores other files).

Exactness. tti's SAE (tti_dist/sae/model.py) and SAELens's inference SAEs compute

    tti:      pre = W_enc (x - b_pre) + b_enc,  f = act(pre),  x_hat = W_dec f + b_pre
    SAELens:  pre = (x - b_dec) @ W_enc + b_enc (apply_b_dec_to_input), f = act(pre),
              x_hat = f @ W_dec + b_dec

so W_enc -> W_enc^T, W_dec -> W_dec^T, b_pre -> b_dec, b_enc -> b_enc is exact. act: relu ->
"standard" (ReLU); topk -> "topk" (torch.topk of the pre-activations, then ReLU: tti's
TopK, which also selects on the pre-activations before its ReLU). The one difference is
ties: tti breaks a tie at the k-th value towards the lower latent index (on every TP
degree), torch.topk leaves it unspecified; only a tie between positive values straddling
the k-th place changes f, which real-valued activations essentially never produce.
jumprelu -> "jumprelu" with threshold = exp(log_threshold): SAELens computes
ReLU(pre) * 1[pre > threshold], tti pre * 1[pre > theta] with theta > 0, the same. batchtopk
and matryoshka -> "jumprelu" with every threshold = max(batchtopk_threshold, 0): their
inference form (tti's eval mode; SAELens saves its BatchTopK and Matryoshka SAEs the same
way, batchtopk_sae.process_state_dict_for_saving_inference). The training-time batch
selection is not exported; it depends on the batch.
Refused (one-line ConfigError): `normalize_input: true` (SAELens's nearest option,
normalize_activations "layer_norm", divides by std + 1e-5 instead of the norm, so its
encoder differs by a relative ~1e-5/std and TopK may select differently), and any site
without a TransformerLens hook of the same activation (`hook_name`).

TP shards. tti's TP rank r holds latents [r n/tp, (r+1) n/tp) (W_enc rows, b_enc, W_dec
columns; b_pre replicated), so the whole SAE is their concatenation in rank order
(`merge_tp_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tti_dist.config.sae import SAEConfig
from tti_dist.config.schema import ModelConfig
from tti_dist.errors import ConfigError
from tti_dist.models.layout import split_name
from tti_dist.sae.export_sources import find_source

SAELENS_VERSION = "6.54.12"
"""The sae-lens version whose format this writes (metadata.sae_lens_version; SAELens reads
configs older than 6.0 through a compatibility path, so it must be >= 6)."""
CONFIG_FILE = "cfg.json"
"""SAELens's SAE_CFG_FILENAME."""
WEIGHTS_FILE = "sae_weights.safetensors"
"""SAELens's SAE_WEIGHTS_FILENAME."""
PROVENANCE_FILE = "tti_provenance.json"
"""tti's record of where the exported SAE came from."""
PROVENANCE_FORMAT = "tti_dist.sae_export/1"

SHARD_DIMS = {"W_enc": 0, "b_enc": 0, "W_dec": 1, "b_pre": None}
"""Dimension of each ParallelSAE tensor split over TP ranks (None: replicated)."""

OPTIONAL_DIMS = {"log_threshold": 0, "batchtopk_threshold": None}
"""The same for the tensors only some activations have (jumprelu; batchtopk / matryoshka)."""

JUMPRELU_FORMS = ("jumprelu", "batchtopk", "matryoshka")
"""Activations exported as SAELens's "jumprelu" (with a threshold tensor)."""

BLOCK_HOOKS = {
    "resid_pre": ("hook_resid_pre", "none"),
    "attn.z": ("attn.hook_z", "hook_z"),
    "attn.out": ("hook_attn_out", "none"),
    "resid_mid": ("hook_resid_mid", "none"),
    "mlp.pre": ("mlp.hook_pre", "none"),
    "mlp.act": ("mlp.hook_post", "none"),
    "mlp.out": ("hook_mlp_out", "none"),
    "resid_post": ("hook_resid_post", "none"),
}
"""tti block site -> (TransformerLens hook below blocks.{i}, SAELens reshape_activations).
TL's hook_z is [..., n_heads, d_head]; SAELens's "hook_z" reshaping flattens it to
n_heads * d_head, head-major, which is the layout of tti's attn.z."""

NO_EQUIVALENT = {
    "tokens": "it holds token ids, not activations",
    "moe": "TransformerLens's HookedTransformer has no mixture-of-experts layer",
    "bottleneck": "TransformerLens has no stochastic bottleneck",
}
"""Sites refused, with the reason (key: the site, or the first part of a block site)."""


def transformer_lens_hook(site: str, model_cfg: ModelConfig) -> tuple[str, str]:
    """(TransformerLens hook name, SAELens reshape_activations) of the activation tti calls
    `site`; a one-line ConfigError for a site TransformerLens has no hook for.

    `embed` (token embedding + learned positions, after dropout) is TL's
    blocks.0.hook_resid_pre (TL's hook_embed holds the token embedding alone). `final_norm`
    (the final LayerNorm's output, scale and bias applied) is TransformerBridge's
    ln_final.hook_out; HookedTransformer has no such hook (its ln_final.hook_normalized is
    taken before the scale and bias), so that SAE attaches through the bridge only.
    """
    if site == "embed":
        return "blocks.0.hook_resid_pre", "none"
    if site == "final_norm":
        return "ln_final.hook_out", "none"
    block, sub = split_name(site)
    key = sub.split(".", 1)[0] if block is not None else site
    if key in NO_EQUIVALENT:
        raise ConfigError(f"site: {site} has no TransformerLens hook ({NO_EQUIVALENT[key]}); exportable sites: "
                          "embed, final_norm, blocks.{i}." + ", blocks.{i}.".join(BLOCK_HOOKS))
    if block is None or sub not in BLOCK_HOOKS:
        raise ConfigError(f"site: {site!r} is not a tti hookpoint with a TransformerLens hook; exportable sites: "
                          "embed, final_norm, blocks.{i}." + ", blocks.{i}.".join(BLOCK_HOOKS))
    if sub == "mlp.act" and model_cfg.mlp_topk:
        raise ConfigError(f"site: {site} is the MLP activation after model.mlp_topk {model_cfg.mlp_topk} keeps "
                          "the top units; TransformerLens's mlp.hook_post has no top-k")
    hook, reshape = BLOCK_HOOKS[sub]
    return f"blocks.{block}.{hook}", reshape


def check_exportable(sae_cfg: SAEConfig, where: str) -> None:
    """ConfigError (one line) unless SAELens computes exactly this SAE's encoder (module docstring)."""
    if sae_cfg.normalize_input:
        raise ConfigError(f"{where}.normalize_input: true is not exportable: SAELens's nearest input normalisation "
                          "(layer_norm) divides by std + 1e-5, not by the centred norm, so its encoder would differ")
    if sae_cfg.activation not in ("topk", "relu") + JUMPRELU_FORMS:
        raise ConfigError(f"{where}.activation: {sae_cfg.activation!r}; exportable: 'topk', 'relu', "
                          + ", ".join(repr(a) for a in JUMPRELU_FORMS))


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """The whole SAE from its TP shards in rank order: W_enc [n, d], b_enc [n], W_dec [d, n],
    b_pre [d] (which every shard must hold identically); fp32 copies. ConfigError otherwise."""
    merged = {}
    dims = dict(SHARD_DIMS)
    for name, dim in OPTIONAL_DIMS.items():
        if any(name in s for s in shards):  # then every shard must hold it
            dims[name] = dim
    for name, dim in dims.items():
        missing = [r for r, s in enumerate(shards) if name not in s]
        if missing:
            raise ConfigError(f"{where}: TP rank {missing[0]}'s SAE state has no {name}; not a tti SAE")
        pieces = [s[name].detach().to("cpu", torch.float32) for s in shards]
        if dim is None:
            for r, piece in enumerate(pieces[1:], start=1):
                if piece.shape != pieces[0].shape or not torch.equal(piece, pieces[0]):
                    raise ConfigError(f"{where}: {name} differs between TP rank 0 and TP rank {r}; the shards are not "
                                      "of one SAE")
            merged[name] = pieces[0].clone()
        else:
            merged[name] = torch.cat(pieces, dim=dim).contiguous()
    n, d = merged["W_enc"].shape
    if merged["b_enc"].shape != (n,) or merged["W_dec"].shape != (d, n) or merged["b_pre"].shape != (d,):
        raise ConfigError(f"{where}: SAE tensors of inconsistent shapes ({ {k: tuple(v.shape) for k, v in merged.items()} })")
    return merged


def saelens_tensors(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens's state dict: W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d] (fp32, contiguous),
    and for a JumpReLU form threshold [n]: exp(log_threshold) (jumprelu), or the running
    BatchTopK threshold clamped at 0 for every latent (batchtopk / matryoshka; tti's eval form)."""
    out = {
        "W_enc": merged["W_enc"].t().contiguous(),
        "b_enc": merged["b_enc"].contiguous(),
        "W_dec": merged["W_dec"].t().contiguous(),
        "b_dec": merged["b_pre"].contiguous(),
    }
    if "log_threshold" in merged:
        out["threshold"] = merged["log_threshold"].exp().contiguous()
    elif "batchtopk_threshold" in merged:
        # cast as tti's eval does (threshold.clamp_min(0).to(pre.dtype)), so the comparisons agree
        theta = merged["batchtopk_threshold"].to(torch.float64).clamp_min(0).to(torch.float32)
        out["threshold"] = theta.expand(merged["b_enc"].shape).contiguous()
    return out


def saelens_config(sae_cfg: SAEConfig, d_in: int, hook_name: str, reshape: str, metadata: dict[str, Any]) -> dict:
    """cfg.json's contents, field for field what SAELens's `save_model` writes for this SAE."""
    cfg: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": sae_cfg.num_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": reshape,
        "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                     "hook_name": hook_name, "hook_head_index": None, **metadata},
    }
    if sae_cfg.activation == "topk":
        cfg.update(k=sae_cfg.k, rescale_acts_by_decoder_norm=False, architecture="topk")
    elif sae_cfg.activation in JUMPRELU_FORMS:
        cfg["architecture"] = "jumprelu"
    else:
        cfg["architecture"] = "standard"
    return cfg


def write_export(out: str | Path, tensors: dict[str, torch.Tensor], cfg: dict, provenance: dict) -> Path:
    """Write the SAELens directory `out` atomically: every file goes into a hidden sibling
    temporary directory, fsync'd, which is then renamed to `out`; a crash leaves no `out`
    (only the temporary directory, named .<out>.tmp-*). `out` must not exist (ConfigError)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out: '{out}' already exists; give a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        provenance = {**provenance, "weights_sha256": _sha256(tmp / WEIGHTS_FILE)}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if out.exists():  # created meanwhile: rename would replace an empty directory
            raise ConfigError(f"--out: '{out}' already exists; give a new directory")
        os.rename(tmp, out)
        _fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def provenance_record(source: dict[str, Any], sae_cfg: SAEConfig, site: str, hook_name: str, tp_size: int) -> dict:
    """The provenance JSON: `source` (kind, run, checkpoint, entry or fit directory) plus the
    SAE's tti settings, its site and TL hook, and the TP degree its shards were merged from."""
    return {"format": PROVENANCE_FORMAT, **source, "site": site, "hook_name": hook_name, "tp_size": tp_size,
            # SAEConfig's own fields (a `type: sae` entry's subclass adds its optimizer settings)
            "sae_config": {name: getattr(sae_cfg, name) for name in SAEConfig.__dataclass_fields__}}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_saelens(path: str | Path, out: str | Path, checkpoint: str | None = None,
                   name: str | None = None) -> tuple[Path, dict]:
    """`tti sae export`: the SAE at `path` (a run's `type: sae` entry at `checkpoint`, or a
    `tti sae fit` directory) written to `out` in SAELens's format; returns (out, cfg.json's
    contents). Everything is read and checked before `out` is touched."""
    source = find_source(path, checkpoint, name)
    check_exportable(source.sae_cfg, source.where)
    hook_name, reshape = transformer_lens_hook(source.site, source.model_cfg)
    merged = merge_tp_shards(source.shards, str(path))
    n, d = merged["W_enc"].shape
    if (n, d) != (source.sae_cfg.num_latents, source.d_in):
        raise ConfigError(f"{source.where}: the saved SAE is {n} latents x {d} inputs, its config says "
                          f"{source.sae_cfg.num_latents} x {source.d_in}")
    run_name = Path(source.provenance["run"]).name
    metadata = {"model_name": run_name, "context_size": source.run_cfg.data.seq_len, "prepend_bos": False}
    cfg = saelens_config(source.sae_cfg, d, hook_name, reshape, metadata)
    provenance = provenance_record(source.provenance, source.sae_cfg, source.site, hook_name, len(source.shards))
    return write_export(out, saelens_tensors(merged), cfg, provenance), cfg
