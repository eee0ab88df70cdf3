"""`tti sae fit RUN --site SITE [--site SITE ...] --latents N [--k K] [--activation A] [...]`: a
fresh SAE (TopK by default; relu, batchtopk, jumprelu, matryoshka) per site on a run's frozen
activations, its splice metrics, and with several sites the metrics of all of them spliced in
at once. With `--target blocks.<i>.mlp.out [--skip]` (and the one site blocks.<i>.resid_mid):
a (skip) transcoder of that MLP and its replacement metrics (tti_dist/sae/transcoder.py).

The activation's options come from their own flags (--l1-coefficient for relu,
--l0-coefficient for jumprelu, --matryoshka-prefixes for matryoshka); a flag given with
another activation, or a malformed value, is a one-line ConfigError (exit 2).

prepare_fit (tti_dist.sae.fit_plan) checks everything before a rank starts; the ranks fit
and measure (tti_dist.train.sae_fit.run_fit); rank 0 writes OUT/sae_metrics.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tti_dist.commands.ranks import run_in_rank_sessions
from tti_dist.config.sae import ACTIVATIONS, K_ACTIVATIONS, SAEConfig
from tti_dist.errors import ConfigError
from tti_dist.rundir import RunDir
from tti_dist.sae.fit_plan import METRICS_FILE, compound_metrics_path, prepare_fit

OPTION_FLAGS = (("l1_coefficient", "--l1-coefficient", "relu"), ("l0_coefficient", "--l0-coefficient", "jumprelu"),
                ("matryoshka_prefixes", "--matryoshka-prefixes", "matryoshka"))
"""(SAEConfig field, flag, the activation that uses it) of the activation-specific flags."""


def _number(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{flag}: {text!r} must be a finite number >= 0")
    return value


def _prefixes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--matryoshka-prefixes: {text!r} must be comma-separated integers, e.g. 256,1024") from None


def sae_options(args: argparse.Namespace) -> tuple[int, dict]:
    """(k, sae_options for prepare_fit) from the command line; one-line ConfigError on a bad
    activation, a missing --k for a k-sparse activation, or an option of another activation."""
    activation = args.activation
    if activation not in ACTIVATIONS:
        raise ConfigError(f"--activation: {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if args.k is None and activation in K_ACTIVATIONS:
        raise ConfigError(f"--k: required with --activation {activation} (active latents per token)")
    options = {}
    for field, flag, owner in OPTION_FLAGS:
        text = getattr(args, field, None)
        if text is None:
            continue
        if activation != owner:
            raise ConfigError(f"{flag}: only used with --activation {owner} (activation is {activation})")
        options[field] = _prefixes(text) if field == "matryoshka_prefixes" else _number(flag, text)
    return (SAEConfig.k if args.k is None else args.k), options


def main(args: argparse.Namespace) -> int:
    k, options = sae_options(args)
    plans = prepare_fit(args.run_dir, args.site, args.latents, k, checkpoint=args.checkpoint, steps=args.steps,
                        lr=args.lr, out=args.out, seed=args.seed, nproc=args.nproc, activation=args.activation,
                        sae_options=options, target=getattr(args, "target", None), skip=getattr(args, "skip", False))
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
        sae_cfg = site_plan.sae_cfg
        sparsity = f"k={sae_cfg.k}" if sae_cfg.activation in K_ACTIVATIONS else "no k"
        what = f"SAE on {site_plan.site}" if site_plan.target is None else (
            f"{'skip ' if site_plan.skip else ''}transcoder {site_plan.site} -> {site_plan.target}")
        print(f"{what} of {site_plan.run_dir} ({site_plan.tag}): {sae_cfg.num_latents} "
              f"latents, {sae_cfg.activation}, {sparsity}, {site_plan.steps} steps")
        prefix = f"sae/{site_plan.site}" if site_plan.target is None else f"transcoder/blocks.{site_plan.block}.mlp"
        print(format_table(result["sites"][site_plan.site]["metrics"], prefix))
        print(f"wrote {Path(site_plan.out_dir) / METRICS_FILE}")
    if result["compound"] is not None:
        print(f"all {len(plans)} SAEs spliced in at once:")
        for name, value in result["compound"].items():
            print(f"  {name.rsplit('/', 1)[-1]:<22} {value:10.4f}")
        path = compound_metrics_path(RunDir(Path(plan.run_dir)), plan.sae_cfg.num_latents, plan.sae_cfg.k,
                                     plan.sae_cfg.activation)
        print(f"wrote {path}")
    return 0


def format_table(metrics: dict[str, float], prefix: str) -> str:
    """A short human-readable table of the headline metrics tagged `<prefix>/<name>`
    (sae/<site> or transcoder/blocks.<i>.mlp)."""
    names = ("ce_loss_recovered", "delta_lm_loss", "kl_score", "ev", "fvu", "l0", "dead_fraction",
             "dense_fraction_10pct", "shrinkage", "redundancy", "ce_clean", "ce_spliced", "ce_zero")
    lines = [f"{prefix}:"]
    for n in names:
        v = metrics.get(f"{prefix}/{n}")
        if v is not None:
            lines.append(f"  {n:<22} {v:10.4f}")
    return "\n".join(lines)
