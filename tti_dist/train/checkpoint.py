"""Atomic DeepSpeed checkpoints with the state needed for exact resume.

Layout under RUN/checkpoints/ (its names: tti_dist.rundir):

    latest                      the tag to resume from (DeepSpeed's convention)
    global_step<N>/             a complete checkpoint (DeepSpeed's file names:
        mp_rank_XX_model_states.pt, *_optim_states.pt, ...)
        rng_rank<R>.json        per-rank RNG states (torch, cuda, numpy, python; JSON, not a pickle)
        tp_layout.json          TP partition dim of every parameter (for export)
    zero_to_fp32.py             DeepSpeed's consolidation script (copied by DeepSpeed)

Why this is atomic: DeepSpeed writes into `global_step<N>.partial/` with `save_latest=False`;
each rank adds its RNG state; after a barrier rank 0 renames the directory to
`global_step<N>` and only then replaces `latest` (write to a temp file, fsync,
`os.replace`). A crash at any point leaves `latest` naming the previous complete
checkpoint; a stale `.partial` directory is never read and is removed by the next save.
The training position (step, tokens, data loader state) travels in DeepSpeed's
client_state.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from tti_dist.errors import RefusedFileError, RunWriteError, os_reason
from tti_dist.rundir import LATEST_FILE, TP_LAYOUT_FILE, checkpoint_tag, complete_tags, latest_tag, rng_file_name, tag_step
from tti_dist.utils.atomic_file import write_text_atomic
from tti_dist.utils.safe_load import LEGACY_RNG_GLOBALS, load_torch_file

if TYPE_CHECKING:  # runtime import would pull megatron into `tti train`'s validation path
    from tti_dist.distributed.groups import ParallelGroups

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: {"torch": uint8 tensor, "numpy": np.random.get_state()
    tuple, "python": random.getstate() tuple, "cuda": [uint8 tensor per device] with a GPU}."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RNG_FORMAT = "tti_dist.rng_state/1"


def _bytes_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _b64_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """capture_rng_state's result as JSON data: generator states of torch and CUDA as base64
    bytes, numpy's MT19937 state and python's as numbers (floats round-trip exactly)."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    py_version, py_internal, py_gauss = state["python"]
    out = {
        "format": RNG_FORMAT,
        "torch": _bytes_to_b64(state["torch"]),
        "numpy": {"bit_generator": np_name, "key": [int(v) for v in np_key], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss},
    }
    if "cuda" in state:
        out["cuda"] = [_bytes_to_b64(s) for s in state["cuda"]]
    return out


def rng_state_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """Inverse of rng_state_to_json (ValueError, KeyError, TypeError or OverflowError on
    other data, including states of the wrong size)."""
    if not isinstance(data, dict) or data.get("format") != RNG_FORMAT:
        raise ValueError(f"format is not {RNG_FORMAT!r}")
    n, p = data["numpy"], data["python"]
    state = {
        "torch": _b64_to_bytes(data["torch"]),
        "numpy": (str(n["bit_generator"]), np.asarray(n["key"], dtype=np.uint32), int(n["pos"]),
                  int(n["has_gauss"]), float(n["cached_gaussian"])),
        "python": (int(p["version"]), tuple(int(v) for v in p["state"]),
                   None if p["gauss_next"] is None else float(p["gauss_next"])),
    }
    if "cuda" in data:
        state["cuda"] = [_b64_to_bytes(s) for s in data["cuda"]]
    sizes = {"torch": (state["torch"].numel(), torch.get_rng_state().numel()),
             "numpy key": (len(state["numpy"][1]), 624), "python": (len(state["python"][1]), 625)}
    for what, (got, want) in sizes.items():
        if got != want:
            raise ValueError(f"{what} state has {got} entries, not {want}")
    return state


def write_rng_state(path: Path) -> None:
    """This process's RNG states to `path` as JSON."""
    path.write_text(json.dumps(rng_state_to_json(capture_rng_state())))


def read_rng_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s RNG states of a checkpoint (for restore_rng_state). A checkpoint of an
    older tti holds `rng_rank<R>.pt` instead: a torch.save pickle, loaded with the weights-only
    unpickler and numpy's array classes only. RefusedFileError (one line) for anything else."""
    path = tag_dir / rng_file_name(rank)
    legacy = path.with_suffix(".pt")
    if not path.is_file() and legacy.is_file():
        path = legacy
    try:
        if path is legacy:
            # Through the JSON form: the same checks as a current file.
            return rng_state_from_json(rng_state_to_json(load_torch_file(legacy, LEGACY_RNG_GLOBALS)))
        return rng_state_from_json(json.loads(path.read_bytes()))
    except RefusedFileError:
        raise
    except FileNotFoundError:
        raise RefusedFileError(f"{path}: missing; every rank's RNG state is needed to resume") from None
    # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError) as exc:
        if isinstance(exc, KeyError):
            reason = f"no {exc.args[0]!r} entry"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RefusedFileError(f"{path}: not an RNG state file written by tti ({reason})") from None


def save_checkpoint(
    engine,
    ckpt_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    groups: ParallelGroups,
    tp_layout: dict[str, int | None],
    keep_last: int,
) -> str:
    """Save a complete checkpoint for `step` atomically; returns its tag. Collective over all ranks."""
    ckpt_dir = Path(ckpt_dir)
    tag = checkpoint_tag(step)
    staging = tag + PARTIAL_SUFFIX
    if groups.is_writer:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        # Left by a save that crashed; DeepSpeed would otherwise mix old and new files.
        shutil.rmtree(ckpt_dir / staging, ignore_errors=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=staging, client_state=client_state, save_latest=False)
        write_rng_state(ckpt_dir / staging / rng_file_name(groups.rank))
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as a RuntimeError from its zip writer.
        if not isinstance(exc, OSError) and not _is_torch_write_error(exc):
            raise
        raise _write_failed(ckpt_dir, staging, step, exc) from exc
    dist.barrier()
    if groups.is_writer:
        try:
            write_text_atomic(ckpt_dir / staging / TP_LAYOUT_FILE, json.dumps(tp_layout, indent=1))
            final = ckpt_dir / tag
            replaced = ckpt_dir / (tag + REPLACED_SUFFIX)
            if final.exists():  # the same step saved again (e.g. resumed at a saved step)
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            os.rename(ckpt_dir / staging, final)
            write_text_atomic(ckpt_dir / LATEST_FILE, tag)
        except OSError as exc:
            raise _write_failed(ckpt_dir, staging, step, exc) from exc
        shutil.rmtree(replaced, ignore_errors=True)
        _prune(ckpt_dir, keep_last, protect=tag)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return tag


def _is_torch_write_error(exc: RuntimeError) -> bool:
    """torch.save's zip writer failing to write (file size limit, disk full)."""
    text = str(exc)
    return "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text


def _write_failed(ckpt_dir: Path, staging: str, step: int, exc: Exception) -> RunWriteError:
    """The one-line error for a checkpoint that could not be written; the staging files are
    removed (they are never read) and `latest` still names the previous checkpoint."""
    path = Path(exc.filename) if getattr(exc, "filename", None) else ckpt_dir / staging
    shutil.rmtree(ckpt_dir / staging, ignore_errors=True)
    if isinstance(exc, RuntimeError) and not getattr(exc, "errno", None):
        # torch's zip writer names neither file nor cause.
        reason = "torch.save could not write its file (disk full, quota or file-size limit)"
    else:
        reason = os_reason(exc)
    return RunWriteError(f"{path}: could not write the checkpoint of step {step}: {reason}; the latest complete "
                         f"checkpoint is still {latest_tag(ckpt_dir) or 'none'}")


def _prune(ckpt_dir: Path, keep_last: int, protect: str) -> None:
    for stale in ckpt_dir.glob("*" + PARTIAL_SUFFIX):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep_last]:
        if tag != protect:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, groups: ParallelGroups) -> dict[str, Any]:
    """Load model, optimizer, LR scheduler and this rank's RNG states; return client_state.

    The RNG file is read first: a refused one stops the resume before DeepSpeed reads
    anything. DeepSpeed's engine.load_checkpoint unpickles its own files with
    weights_only=False (docs/reliability.md).
    """
    ckpt_dir = Path(ckpt_dir)
    rng_state = read_rng_state(ckpt_dir / tag, groups.rank)
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    restore_rng_state(rng_state)
    logger.info("resumed from %s (step %s)", ckpt_dir / tag, client_state.get("step"))
    return client_state
