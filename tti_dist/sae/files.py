"""The SAE files `tti sae fit` writes and `tti inspect --sae` reads: one per TP rank.

    OUT/sae_tp_rank<R>.safetensors
        tensors   W_enc [n/tp, d], b_enc [n/tp], W_dec [d, n/tp], b_pre [d]  (rank R's latents)
        metadata  format = "tti_dist.sae"
                  sae    = JSON {sae_config: SAEConfig fields, d_model, tp_rank, tp_size, seed}

safetensors, not a pickle: reading a shared SAE runs no code. Directories written by older
tti versions hold `sae_tp_rank<R>.pt` (torch.save of {"sae": state_dict, "sae_config",
"d_model", "tp_rank", "tp_size", "seed"}); they are read with torch's weights-only unpickler
and no allowlist (tensors and plain data only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tti_dist.errors import RefusedFileError
from tti_dist.utils.safe_load import load_torch_file

FORMAT = "tti_dist.sae"
"""The `format` metadata entry of an SAE shard."""

META_KEYS = ("sae_config", "d_model", "tp_rank", "tp_size", "seed")
"""The entries of the `sae` metadata JSON."""


def shard_name(tp_rank: int) -> str:
    """The file of TP rank `tp_rank`'s shard."""
    return f"sae_tp_rank{tp_rank:02d}.safetensors"


def shard_files(sae_dir: str | Path) -> list[Path]:
    """The shards in `sae_dir`, by TP rank; the `.pt` files of older versions when it holds no
    safetensors shard."""
    sae_dir = Path(sae_dir)
    return sorted(sae_dir.glob("sae_tp_rank*.safetensors")) or sorted(sae_dir.glob("sae_tp_rank*.pt"))


def write_shard(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write one shard: `state` (the SAE's state_dict) and `meta` (META_KEYS, JSON-serializable)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "sae": json.dumps({k: meta[k] for k in META_KEYS})})


def read_meta(path: str | Path) -> dict[str, Any]:
    """A shard's metadata (META_KEYS) without reading its tensors; RefusedFileError (one line)
    for a file that is not a shard written by tti."""
    return _read(Path(path), tensors=False)[0]


def read_shard(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, state_dict) of a shard; RefusedFileError (one line) for a file that is not a
    shard written by tti."""
    return _read(Path(path), tensors=True)


def _read(path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if path.suffix == ".pt":
        legacy = load_torch_file(path)
        try:
            return {k: legacy[k] for k in META_KEYS}, dict(legacy["sae"])
        except (KeyError, TypeError, ValueError):
            raise RefusedFileError(f"{path}: not an SAE shard written by tti sae fit") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise RefusedFileError(f"{path}: not an SAE shard written by tti sae fit (no {FORMAT} metadata)")
            meta = json.loads(metadata["sae"])
            missing = [k for k in META_KEYS if k not in meta]
            if missing:
                raise RefusedFileError(f"{path}: not an SAE shard written by tti sae fit (no {', '.join(missing)})")
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        if isinstance(exc, RefusedFileError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RefusedFileError(f"{path}: not a safetensors SAE shard ({reason})") from None
    return meta, state
