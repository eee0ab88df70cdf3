"""Scale and offset of a replicated site's activations on a run's validation batches: what
an SAE reconstruction loss normalised by the input norm (Lai et al.) rewards and an FVU does
not (docs/experiments/lai_joint_sae.md, "Why the earlier co-training experiment pointed the
other way").

    python experiments/site_norms.py RUN [RUN ...] --site blocks.2.resid_post

Per run, on the run's fixed validation batches (train.eval_batches micro-batches) of its
latest checkpoint, at TP=1:

    norm    = mean_t ||x_t||_2                  (the denominator of recon_normalize: input_norm)
    offset  = ||mean_t x_t||_2                  (the shared part, which b_pre reconstructs for free)
    spread  = sqrt(mean_t ||x_t - mean x||^2)   (what an FVU's denominator measures)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
from tti_dist.commands.ranks import run_in_rank_sessions
from tti_dist.data.loader import DistributedBatchLoader
from tti_dist.data.prepare import resolve_dataset, run_windows
from tti_dist.rundir import RunDir
from tti_dist.train.export import load_frozen_model


def measure(run_dir: str, site_name: str, groups) -> dict[str, float]:
    run = RunDir(Path(run_dir))
    cfg, dataset = resolve_dataset(run.load_config(), Path(run_dir))
    model = load_frozen_model(cfg, run.checkpoints, run.resolve_checkpoint(None), groups)
    site = next(hp for hp in list_hookpoints(model) if hp.name == site_name)
    val = DistributedBatchLoader(run_windows(cfg, dataset), "val", cfg.train.micro_batch_size, 0, 1, cfg.train.seed,
                                 shuffle=False)
    xs = []
    with ActivationCapture([site]) as capture, torch.no_grad():
        for batch in val.fixed_batches(max(1, cfg.train.eval_batches)):
            model(batch[:, :-1])
            xs.append(capture.captured[site_name].reshape(-1, site.global_dim).double())
            capture.clear()
    x = torch.cat(xs)
    mean = x.mean(dim=0)
    return {"norm": float(x.norm(dim=-1).mean()), "offset": float(mean.norm()),
            "spread": float((x - mean).pow(2).sum(-1).mean().sqrt())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--site", required=True)
    args = parser.parse_args()
    print(f"| run | mean ||x|| | ||mean x|| | sqrt(mean ||x - mean x||^2) |")
    print("|---|---|---|---|")
    for run_dir in args.runs:
        cfg = RunDir(Path(run_dir)).load_config()
        results, code = run_in_rank_sessions("site norms", 1, cfg, 1, None, measure, run_dir, args.site)
        if code is not None:
            raise SystemExit(code)
        r = results[0]
        print(f"| {run_dir} | {r['norm']:.3f} | {r['offset']:.3f} | {r['spread']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
