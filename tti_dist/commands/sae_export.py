"""`tti sae export RUN|FIT_DIR --out DIR [--checkpoint STEP|TAG] [--name ENTRY]`: an SAE in
SAELens's on-disk format (tti_dist.sae.saelens_format; docs/sae.md, "Export to SAELens").

RUN: a run's co-trained SAE (a `type: sae` regularizer entry; --name picks one of several)
at a checkpoint (default: the latest). FIT_DIR: a `tti sae fit` output directory.
"""

from __future__ import annotations

import argparse

from tti_dist.sae.saelens_format import export_saelens


def main(args: argparse.Namespace) -> int:
    out, cfg = export_saelens(args.source, args.out, checkpoint=args.checkpoint, name=args.name)
    kind = f"topk, k={cfg['k']}" if cfg["architecture"] == "topk" else "standard (ReLU)"
    print(f"SAE {cfg['d_in']} -> {cfg['d_sae']} latents ({kind}) at {cfg['metadata']['hook_name']}")
    print(f"wrote {out} (load with sae_lens.SAE.load_from_disk)")
    return 0
