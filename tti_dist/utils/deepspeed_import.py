"""Import DeepSpeed the one way that works on CPU and GPU machines alike.

DeepSpeed picks its accelerator at import time; on a machine without a GPU it must be told
first (DS_ACCELERATOR=cpu), and it then falls back to gloo when oneCCL is absent. Every
module that needs DeepSpeed imports it through `import_deepspeed`, inside a function, never
at package import: a Ray driver on a CPU-only head must not import it, and the environment
variable must be set before the first import.
"""

from __future__ import annotations

import os

import torch


def import_deepspeed():
    """The `deepspeed` module, imported with the CPU accelerator when no GPU is visible."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # lazy: the accelerator must be chosen before the first import

    return deepspeed
