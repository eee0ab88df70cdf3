"""`tti export RUN --out OUT [--checkpoint STEP|TAG] [--format tti|hf]`: consolidated weights.

--format tti (default): one safetensors file of tti_dist's own GPT (TP shards merged).
--format hf: a transformers model directory, GPT-2 or GPT-NeoX (tti_dist.train.hf_export,
docs/interop.md).
"""

from __future__ import annotations

import argparse

from tti_dist.train.export import export_safetensors
from tti_dist.train.hf_export import export_hf


def main(args: argparse.Namespace) -> int:
    if args.format == "hf":
        out = export_hf(args.run_dir, args.out, args.checkpoint)
    else:
        out = export_safetensors(args.run_dir, args.out, args.checkpoint)
    print(f"wrote {out}")
    return 0
