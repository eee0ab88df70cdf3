"""`tti inspect RUN --site SITE --unit U [--top N] [--checkpoint STEP] [--batches B]
[--context C] [--sae DIR]`: the top-activating contexts of one unit or SAE latent.

prepare_inspect checks every option (and opens every SAE shard) before a rank starts; the
ranks compute the contexts (tti_dist.eval.inspect.top_contexts); rank 0's are printed.
"""

from __future__ import annotations

import argparse

from tti_dist.capture.hookpoints import summarize_names
from tti_dist.commands.ranks import run_in_rank_sessions
from tti_dist.errors import ConfigError
from tti_dist.eval.plan import EvalPlan, prepare_eval
from tti_dist.models.layout import gpt_hookpoint_names, hookpoint_width
from tti_dist.sae.files import read_meta, shard_files


def prepare_inspect(run_dir, site: str, unit: int, top: int = 20, checkpoint: str | None = None,
                    batches: int = 8, context: int = 12, sae: str | None = None) -> tuple[EvalPlan, dict]:
    """(EvalPlan, settings) after validating every option (one-line ConfigError)."""
    plan = prepare_eval(run_dir, checkpoint=checkpoint, batches=batches)
    names = [n for n in gpt_hookpoint_names(plan.cfg.model) if n != "tokens" and not n.endswith("moe.expert")]
    if site not in names:
        raise ConfigError(f"--site: {site!r} is not a hookpoint of this run's model; available: {summarize_names(names)}")
    width = hookpoint_width(site, plan.cfg.model)
    if sae is not None:
        files = shard_files(sae)
        if not files:
            raise ConfigError(f"--sae: '{sae}' holds no SAE (sae_tp_rank*.safetensors from tti sae fit)")
        # Every shard is opened here, before any rank starts: a refused file is one line.
        meta = [read_meta(f) for f in files][0]
        if len(files) != meta["tp_size"]:
            raise ConfigError(f"--sae: '{sae}' has {len(files)} of its {meta['tp_size']} TP shards")
        if meta["d_model"] != width:
            raise ConfigError(f"--sae: the SAE in '{sae}' reads a {meta['d_model']}-wide site; {site} is {width} wide")
        width = meta["sae_config"]["num_latents"]
    if not 0 <= unit < width:
        what = "latent" if sae is not None else "unit"
        raise ConfigError(f"--unit: {unit} is not a {what} of {site} (0..{width - 1})")
    if top < 1:
        raise ConfigError(f"--top: {top} must be >= 1")
    if context < 0:
        raise ConfigError(f"--context: {context} must be >= 0")
    return plan, dict(site=site, unit=unit, top=top, context=context, sae=sae)


def format_contexts(settings: dict, contexts: list) -> str:
    """One line per context: rank, activation, the text with «token», factor values."""
    what = f"latent {settings['unit']} of the SAE in {settings['sae']}" if settings["sae"] else f"unit {settings['unit']}"
    lines = [f"top {len(contexts)} activations of {settings['site']} {what}:"]
    for i, c in enumerate(contexts, 1):
        factors = "  " + " ".join(f"{k}={v}" for k, v in c.factors.items() if v >= 0) if c.factors else ""
        lines.append(f"{i:3d}  {c.value:9.4f}  {c.text}{factors}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    plan, settings = prepare_inspect(args.run_dir, args.site, args.unit, top=args.top, checkpoint=args.checkpoint,
                                     batches=args.batches, context=args.context, sae=args.sae)
    # lazy: megatron-core and the model load only after the options were checked
    from tti_dist.eval.inspect import top_contexts

    # Every rank holds every expert (the layout merges expert-parallel shards): EP = 1.
    ep_size = 1 if plan.cfg.model.moe_num_experts else None
    results, code = run_in_rank_sessions("inspect", plan.nproc, plan.cfg, plan.nproc, ep_size, top_contexts,
                                         plan, settings)
    if code is not None:
        return code
    print(format_contexts(settings, results[0]))
    return 0
