"""`tti export RUN --out model.safetensors [--checkpoint STEP|TAG]`: consolidated weights."""

from __future__ import annotations

import argparse

from tti_dist.train.export import export_safetensors


def main(args: argparse.Namespace) -> int:
    out = export_safetensors(args.run_dir, args.out, args.checkpoint)
    print(f"wrote {out}")
    return 0
