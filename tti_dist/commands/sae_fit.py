"""`tti sae fit RUN --site SITE [--site SITE ...] --latents N --k K [...]`: a fresh TopK SAE
per site on a run's frozen activations, its splice metrics, and with several sites the
metrics of all of them spliced in at once.

prepare_fit (tti_dist.sae.fit_plan) checks everything before a rank starts; the ranks fit
and measure (tti_dist.train.sae_fit.run_fit); rank 0 writes OUT/sae_metrics.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tti_dist.commands.ranks import run_in_rank_sessions
from tti_dist.rundir import RunDir
from tti_dist.sae.fit_plan import METRICS_FILE, compound_metrics_path, prepare_fit


def main(args: argparse.Namespace) -> int:
    plans = prepare_fit(args.run_dir, args.site, args.latents, args.k, checkpoint=args.checkpoint, steps=args.steps,
                        lr=args.lr, out=args.out, seed=args.seed, nproc=args.nproc)
    plan = plans[0]
    # lazy: megatron-core and the model load only after the input was checked
    from tti_dist.train.sae_fit import run_fit

    ep_size = plan.cfg.parallel.ep_size if plan.cfg.model.moe_num_experts else None
    results, code = run_in_rank_sessions("sae fit", plan.nproc, plan.cfg, plan.cfg.parallel.tp_size, ep_size,
                                         run_fit, plans)
    if code is not None:
        return code
    result = results[min(results)]
    for site_plan in plans:
        print(f"SAE on {site_plan.site} of {site_plan.run_dir} ({site_plan.tag}): {site_plan.sae_cfg.num_latents} "
              f"latents, k={site_plan.sae_cfg.k}, {site_plan.steps} steps")
        print(format_table(result["sites"][site_plan.site]["metrics"], site_plan.site))
        print(f"wrote {Path(site_plan.out_dir) / METRICS_FILE}")
    if result["compound"] is not None:
        print(f"all {len(plans)} SAEs spliced in at once:")
        for name, value in result["compound"].items():
            print(f"  {name.rsplit('/', 1)[-1]:<22} {value:10.4f}")
        print(f"wrote {compound_metrics_path(RunDir(Path(plan.run_dir)), plan.sae_cfg.num_latents, plan.sae_cfg.k)}")
    return 0


def format_table(metrics: dict[str, float], site: str) -> str:
    """A short human-readable table of the headline metrics."""
    names = ("ce_loss_recovered", "delta_lm_loss", "kl_score", "ev", "l0", "dead_fraction",
             "dense_fraction_10pct", "shrinkage", "redundancy", "ce_clean", "ce_spliced", "ce_zero")
    lines = [f"sae/{site}:"]
    for n in names:
        v = metrics.get(f"sae/{site}/{n}")
        if v is not None:
            lines.append(f"  {n:<22} {v:10.4f}")
    return "\n".join(lines)
