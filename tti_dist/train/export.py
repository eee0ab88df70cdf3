"""Export a checkpoint as one consolidated fp32 safetensors file (TP shards merged).

The result loads with `load_state_dict(strict=True)` into a GPT built at tp_size=1 (and
ep_size=1 for MoE models: every expert under its global id).

Two layers of sharding are undone:
- data-parallel ZeRO partitioning, by DeepSpeed's own `zero_to_fp32` consolidation
  (`get_fp32_state_dict_from_zero_checkpoint`), which reads the fp32 master weights out of
  the optimizer-state files. That tool knows nothing of tensor parallelism: it expects the
  files of one model-parallel rank named `mp_rank_00`. So for each TP rank r we point it
  at a directory of symlinks presenting rank r's files under the mp_rank_00 names.
  (ZeRO stage 0 has no partitioned optimizer files; there the module weights in
  `mp_rank_XX_model_states.pt` are read directly.)
- tensor parallelism, by concatenating each parameter's shards along the dimension
  recorded in the checkpoint's tp_layout.json (megatron's `partition_dim`); replicated
  parameters are taken from TP rank 0 after checking that all ranks agree.

Every file is read with torch's weights-only unpickler and tti's allowlist
(tti_dist.utils.safe_load), zero_to_fp32's own loads included; `RunDir.resolve_checkpoint` loads
them all (memory-mapped) before any rank starts, so a file that asks for anything else is a
one-line error from every command that reads a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tti_dist.config.load import config_to_dict
from tti_dist.config.schema import ModelConfig, RunConfig
from tti_dist.config.sections import section_from_dict
from tti_dist.distributed.groups import ParallelGroups
from tti_dist.distributed.zero_config import engine_zero_stage
from tti_dist.models.gpt import GPT
from tti_dist.rundir import (
    EXPERT_FILE,
    LATEST_FILE,
    TP_LAYOUT_FILE,
    RunDir,
    model_states_file,
    tp_rank_file_pattern,
)
from tti_dist.utils.deepspeed_import import import_deepspeed
from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file, refusal, weights_only_loads
from tti_dist.utils.seeding import seed_weights

logger = logging.getLogger(__name__)

def _rank_view(ckpt_dir: Path, tag: str, tp_rank: int, view_root: Path) -> None:
    """Symlink TP rank `tp_rank`'s files of `tag` into view_root/tag under mp_rank_00 names."""
    src = ckpt_dir / tag
    dst = view_root / tag
    dst.mkdir(parents=True)
    pattern = tp_rank_file_pattern(tp_rank)
    for f in src.iterdir():
        if pattern.search(f.name) and not EXPERT_FILE.match(f.name):
            os.symlink(f.resolve(), dst / pattern.sub("mp_rank_00", f.name))
    (view_root / LATEST_FILE).write_text(tag)


def moe_tp_rank_state_dict(ckpt_dir: Path, tag: str, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's shard of an MoE checkpoint: the module weights DeepSpeed saved for the
    non-expert parameters (`mp_rank_XX_model_states.pt`) plus every expert's file (written
    by the ranks holding it, keyed by global expert id, so the result is an EP=1 model).

    DeepSpeed's zero_to_fp32 cannot consolidate MoE optimizer groups (it fails on the
    expert partitions), so these are the module weights, not the ZeRO fp32 master copies:
    identical in fp32 training, rounded to bf16 in bf16 training.
    """
    states = load_torch_file(ckpt_dir / tag / model_states_file(tp_rank), DEEPSPEED_GLOBALS)
    out = {k: v.float() for k, v in states["module"].items() if isinstance(v, torch.Tensor)}
    for f in sorted((ckpt_dir / tag).iterdir()):
        m = EXPERT_FILE.match(f.name)
        if m and int(m.group(3)) == tp_rank:
            expert = load_torch_file(f, DEEPSPEED_GLOBALS)
            out.update({k: v.float() for k, v in expert.items() if not k.endswith("._extra_state")})
    return out


def global_expert_layout(layout: dict[str, int | None], state_keys) -> dict[str, int | None]:
    """tp_layout.json names rank 0's local experts only; give every expert of `state_keys`
    the partition dim of the same parameter of local expert 0."""
    full = {k: v for k, v in layout.items() if ".deepspeed_experts." not in k}
    for key in state_keys:
        if ".deepspeed_experts." in key:
            head, rest = key.split(".deepspeed_experts.", 1)
            _, tail = rest.split(".", 1)
            full[key] = layout[f"{head}.deepspeed_experts.0.{tail}"]
    return full


def tp_rank_state_dict(ckpt_dir: Path, tag: str, tp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full (DP-consolidated) fp32 weights of one TP rank's shard."""
    if any(EXPERT_FILE.match(f.name) for f in (ckpt_dir / tag).iterdir()):
        return moe_tp_rank_state_dict(ckpt_dir, tag, tp_rank)
    if zero_stage == 0:
        states = load_torch_file(ckpt_dir / tag / model_states_file(tp_rank), DEEPSPEED_GLOBALS)
        return {k: v.float() for k, v in states["module"].items() if isinstance(v, torch.Tensor)}
    import_deepspeed()
    # lazy: deepspeed is imported only to consolidate ZeRO-partitioned checkpoints
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="tti-export-") as tmp:
        _rank_view(ckpt_dir, tag, tp_rank, Path(tmp))
        # zero_to_fp32 prints its progress; stdout is for the commands' results. It passes
        # weights_only=False to torch.load itself: weights_only_loads overrides that.
        try:
            with contextlib.redirect_stdout(sys.stderr), weights_only_loads(DEEPSPEED_GLOBALS):
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)
        except pickle.UnpicklingError as exc:
            raise refusal(ckpt_dir / tag, exc) from None
        return {k: v.float().clone() for k, v in sd.items()}


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], layout: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """Concatenate sharded parameters along their partition dim; check replicated ones agree."""
    merged: dict[str, torch.Tensor] = {}
    for name, dim in layout.items():
        pieces = [s[name] for s in shards]
        if dim is None:
            for r, piece in enumerate(pieces[1:], start=1):
                if not torch.equal(piece, pieces[0]):
                    diff = (piece - pieces[0]).abs().max().item()
                    raise RuntimeError(f"replicated parameter {name} differs between TP rank 0 and {r} (max |diff| {diff:g})")
            merged[name] = pieces[0].contiguous()
        else:
            merged[name] = torch.cat(pieces, dim=dim).contiguous()
    return merged


def consolidated_state_dict(run_dir: str | Path, checkpoint: str | None = None) -> tuple[RunConfig, dict[str, torch.Tensor], str]:
    """The whole model's fp32 weights from a checkpoint, any TP/ZeRO layout."""
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    tag = run.resolve_checkpoint(checkpoint)
    ckpt_dir = run.checkpoints
    layout = json.loads((ckpt_dir / tag / TP_LAYOUT_FILE).read_text())
    shards = [tp_rank_state_dict(ckpt_dir, tag, r, engine_zero_stage(cfg)) for r in range(cfg.parallel.tp_size)]
    if cfg.model.moe_num_experts:
        layout = global_expert_layout(layout, shards[0])
    return cfg, merge_tp_shards(shards, layout), tag


def export_safetensors(run_dir: str | Path, out: str | Path, checkpoint: str | None = None) -> Path:
    """Write the consolidated weights to `out` (atomically) with the model config as metadata."""
    cfg, state, tag = consolidated_state_dict(run_dir, checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    metadata = {"model_config": json.dumps(config_to_dict(cfg.model)), "checkpoint": tag, "format": "tti_dist.gpt"}
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    logger.info("exported %s (%d tensors) to %s", tag, len(state), out)
    return out


def load_exported(path: str | Path):
    """(ModelConfig, state_dict) from a file written by export_safetensors."""
    with safe_open(str(path), framework="pt") as f:
        model_cfg = section_from_dict(ModelConfig, json.loads(f.metadata()["model_config"]), "model.")
        state = {k: f.get_tensor(k) for k in f.keys()}
    return model_cfg, state


def load_frozen_model(cfg: RunConfig, ckpt_dir: Path, tag: str, groups: ParallelGroups,
                      weights: str | None = None) -> GPT:
    """The run's GPT at `groups`' TP degree with its checkpoint weights (this TP rank's shard,
    any ZeRO stage; MoE: every expert under its global id, an EP=1 model), or with an
    exported file's weights (`weights`, TP=1), frozen: eval mode, no gradients.

    The weights are seeded as at training start first, so buffers and anything the state
    dict does not hold match the trained model's."""
    seed_weights(cfg.train.seed)
    model = GPT(cfg.model, groups)
    if weights is not None:
        _, state = load_exported(weights)
    else:
        state = tp_rank_state_dict(ckpt_dir, tag, groups.tp_rank, engine_zero_stage(cfg))
    model.load_state_dict(state, strict=True)
    model.to(groups.device).eval().requires_grad_(False)
    return model
