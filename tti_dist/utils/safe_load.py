"""Load `torch.save` files without running code from them.

A `torch.save` file is a pickle, and unpickling with `weights_only=False` calls whatever the
file names (`os.system`, ...): a shared run directory could run code on the reader's machine.
tti reads DeepSpeed's checkpoint files (`*model_states.pt`, `*optim_states.pt`) and the
files of older tti versions only through `load_torch_file`: torch's weights-only unpickler
(tensors, containers, numbers, strings, and the classes of an explicit allowlist, nothing
called that is not on it), with a refusal turned into a one-line `RefusedFileError` naming
the file and what it asked for. Files tti writes itself are not pickles at all (RNG state:
JSON; SAE shards: safetensors). docs/reliability.md lists every file and its format.

The allowlist is exact: torch's own weights-only set plus the names given here. What other
libraries registered process-wide is set aside while a file loads (megatron-core, at import,
registers numpy arrays, paths, `argparse.Namespace` and its config classes).
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from tti_dist.errors import RefusedFileError
from tti_dist.utils.deepspeed_import import import_deepspeed
from tti_dist.utils.environ import environ_set

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # optim_states["loss_scaler"] (also for fp32 and bf16)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # optim_states["zero_stage"]
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 optim_states["param_slice_mappings"]
)
"""Everything beyond torch's weights-only set in the DeepSpeed checkpoint files tti reads
(DeepSpeed 0.19; ZeRO 0-3, fp32 and bf16, TP, MoE expert files, found by listing the pickle
globals of real checkpoints). Model-state and expert files need none of them."""

LEGACY_RNG_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)
"""What a `rng_rank<R>.pt` of older tti versions needs beyond torch's set: numpy's MT19937 key
array (a uint32 ndarray, rebuilt from its raw bytes)."""

_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _resolve(name: str) -> Any | None:
    """The object a dotted name names; None when the installed versions have no such thing
    (numpy 1.x has no numpy._core): nothing can unpickle to it then, so nothing to allow."""
    module, _, attr = name.rpartition(".")
    if module.startswith("deepspeed"):
        # DeepSpeed picks its accelerator at import; on CPU it must be told first.
        import_deepspeed()
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


@contextlib.contextmanager
def exact_allowlist(names: Iterable[str]) -> Iterator[None]:
    """Inside the block torch's weights-only unpickler accepts its own set plus `names` and
    nothing else; the process-wide registrations are restored afterwards."""
    objects = [obj for obj in map(_resolve, names) if obj is not None]
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        torch.serialization.add_safe_globals(objects)
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _reason(exc: BaseException) -> str:
    """The cause in torch's multi-paragraph weights-only message, as one clause."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"refused to unpickle {m.group(1)} (not in tti's allowlist)"
    # Otherwise the first line that is not torch's advice around the cause.
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.replace("WeightsUnpickler error:", "\n").splitlines()]
    cause = next((line for line in lines if line and not line.startswith(boilerplate)), type(exc).__name__)
    return f"refused by torch's weights-only unpickler: {cause}"


def refusal(path: str | Path, exc: BaseException) -> RefusedFileError:
    """The one-line error for `path` whose weights-only load raised `exc`."""
    return RefusedFileError(f"{path}: {_reason(exc)}; checkpoint files hold only tensors and plain data, "
                            "and loading this one could run code from it")


def load_torch_file(path: str | Path, allowed: Iterable[str] = (), mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU, accepting torch's weights-only set
    plus exactly `allowed` (dotted names). RefusedFileError (one line) for a file that names
    anything else, or that is not a zip file written by `torch.save`.

    The file's globals are listed first (a static pass over its pickle, nothing executed), so
    that an allowlisted name is imported only when the file names it (DeepSpeed only for
    optimizer files); allowlisted names of packages already imported are always passed (a
    class met only while unpickling, such as numpy's UInt32DType of an array's dtype).
    """
    path = Path(path)
    allowed = set(allowed)
    try:
        with exact_allowlist(()):
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except FileNotFoundError:
        raise
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise RefusedFileError(f"{path}: not a torch.save file tti can read "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    refused = sorted(named - allowed)
    if refused:
        raise RefusedFileError(f"{path}: refused to unpickle {', '.join(refused)} (not in tti's allowlist); "
                               "checkpoint files hold only tensors and plain data, and loading this one could run "
                               "code from it")
    try:
        present = named | {n for n in allowed if n.split(".")[0] in sys.modules}
        with exact_allowlist(sorted(present)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise refusal(path, exc) from None


@contextlib.contextmanager
def weights_only_loads(allowed: Iterable[str]) -> Iterator[None]:
    """Every `torch.load` inside the block uses the weights-only unpickler with exactly
    `allowed`, including those that pass `weights_only=False` themselves (DeepSpeed's
    zero_to_fp32): torch honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over the argument."""
    with environ_set({_FORCE_ENV: "1"}), exact_allowlist(allowed):
        yield
