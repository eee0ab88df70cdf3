"""The ranks of `tti sae fit`: train a fresh TopK SAE on a trained run's frozen activations,
then measure it (the plan comes checked from tti_dist.sae.fit_plan).

    tti sae fit RUN --site SITE [--site SITE ...] --latents N --k K [--checkpoint STEP] [--steps S]
                    [--lr LR] [--out DIR] [--seed S] [--nproc P]

1. `prepare_fit` (tti_dist/sae/fit_plan.py; launching process, no process group): reads
   RUN/config.yaml, resolves the checkpoint, checks the site, the SAE shape and the data;
   every problem is a one-line ConfigError (the CLI prints `tti: error: ...`, exit 2).
2. `tti sae fit` (tti_dist/commands/sae_fit.py) runs `run_fit` on P ranks (default: the
   run's world size; P must be a multiple of the run's tp_size, the rest is data parallel),
   in-process for one rank, otherwise through torch's elastic agent exactly like `tti train`.
3. Each rank builds the GPT at the run's TP layout and loads its TP shard's fp32 weights
   from the checkpoint with the export path (`tti_dist.train.export.tp_rank_state_dict`:
   module states for ZeRO-0, DeepSpeed's zero_to_fp32 for ZeRO 1-3, so every stage that
   `tti export` reads works; no DeepSpeed engine is built). The model is frozen (eval mode,
   requires_grad False).
4. The SAE (ParallelSAE, TopK unless the plan names another activation, latents sharded
   over TP) trains on the site's activations of the training split, read by the training
   data loader (same windows, seed and DP split), one micro-batch of
   train.micro_batch_size windows per DP rank per step: b_pre from the first batch
   (geometric median over DP), loss = `training_loss` (TopK / BatchTopK / Matryoshka: MSE
   terms + AuxK/32 with dead latents from a FiringTracker; JumpReLU: MSE + L0 penalty),
   gradients averaged over DP (one all-reduce per step), the decoder's parallel gradient
   removed, its own Adam step, decoder columns renormalized. BatchTopK's running threshold
   is averaged over DP inside the forward; measurement runs in eval mode (its JumpReLU form).
5. `splice_metrics` (tti_dist.sae.splice) on the run's fixed validation batches
   (max(1, train.eval_batches) micro-batches per DP rank); on a corpus with factor columns
   (the synthetic language) also the latents' ground-truth scores `sae/<site>/gt_*`
   (tti_dist.metrics.dictionary_scoring) on the same batches; rank 0 writes OUT/sae_metrics.json
   and each DP-rank-0 rank its SAE shard OUT/sae_tp_rank<R>.safetensors (tti_dist.sae.files).
6. Several --site: steps 4-5 for each site in turn on the one loaded model, then all the
   SAEs spliced in at once (`compound_splice_metrics`) -> RUN/sae_fit/compound-n<N>-k<K>.json.
7. A transcoder (--site blocks.<i>.resid_mid --target blocks.<i>.mlp.out [--skip];
   tti_dist/sae/transcoder.py): steps 4-5 with the MLP's output as the target: biases from
   the first batch (`init_biases`), b_dec refitted to the batch's optimal bias by every
   training forward (b_dec_rate 1, as `type: transcoder`), loss = `training_loss(y, ...)`,
   the train log's EV that of y, then `transcoder_splice_metrics` (y_hat replacing the MLP's output) and the latents'
   ground-truth scores, tagged transcoder/blocks.<i>.mlp/*; its shards are
   OUT/transcoder_tp_rank<R>.safetensors (the SAE shard format under another name; the
   record names the target and the skip term).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
from tti_dist.data.loader import DistributedBatchLoader
from tti_dist.data.prepare import run_windows
from tti_dist.sae.files import shard_name, write_shard
from tti_dist.sae.firing_tracker import FiringTracker
from tti_dist.rundir import RunDir
from tti_dist.sae.fit_plan import METRICS_FILE, FitPlan, compound_metrics_path
from tti_dist.sae.ground_truth import ground_truth_scores
from tti_dist.sae.metrics import explained_variance
from tti_dist.sae.model import ParallelSAE
from tti_dist.sae.optimizer_step import sae_optimizer_step
from tti_dist.sae.splice import compound_splice_metrics, splice_metrics, transcoder_splice_metrics
from tti_dist.sae.transcoder import ParallelTranscoder, metric_prefix
from tti_dist.sae.transcoder import shard_name as transcoder_shard_name
from tti_dist.train.export import load_frozen_model
from tti_dist.utils.atomic_file import write_text_atomic

logger = logging.getLogger(__name__)


def run_fit(plans: tuple[FitPlan, ...], groups) -> dict:
    """Fit one SAE per plan (site) in turn on one loaded model and measure each; with several
    sites, also all of them spliced in at once (`compound_splice_metrics`), written by rank 0
    to RUN/sae_fit/compound-n<N>-k<K>.json. Returns {"sites": {site: {"metrics", "train_log"}},
    "compound": metrics or None}, the same on all ranks."""
    first = plans[0]
    model = load_frozen_model(first.cfg, Path(first.ckpt_dir), first.tag, groups)
    fitted = {plan.site: _fit_site(model, plan, groups) for plan in plans}
    compound = None
    if len(plans) > 1:
        saes = {site: sae for site, (sae, _, _) in fitted.items()}
        compound = compound_splice_metrics(model, saes, next(iter(fitted.values()))[2], groups)
        if groups.is_writer:
            path = compound_metrics_path(RunDir(Path(first.run_dir)), first.sae_cfg.num_latents, first.sae_cfg.k,
                                         first.sae_cfg.activation)
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"run": first.run_dir, "checkpoint": first.tag, "sites": list(fitted),
                      "num_latents": first.sae_cfg.num_latents, "k": first.sae_cfg.k,
                      "activation": first.sae_cfg.activation, "steps": first.steps,
                      "seed": first.seed, "metrics": compound,
                      "per_site_delta_lm_loss": {site: r[1]["metrics"][f"sae/{site}/delta_lm_loss"]
                                                 for site, r in fitted.items()}}
            write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        if groups.world_size > 1:
            dist.barrier()
    return {"sites": {site: result for site, (_, result, _) in fitted.items()}, "compound": compound}


def _fit_site(model, plan: FitPlan, groups) -> tuple[ParallelSAE, dict, list]:
    """Train one SAE on `plan.site` of the frozen model, measure it and write its files;
    returns (the SAE, {"metrics", "train_log"}, the validation batches it was measured on)."""
    cfg = plan.cfg
    hookpoints = {hp.name: hp for hp in list_hookpoints(model)}
    site = hookpoints[plan.site]
    target = None if plan.target is None else hookpoints[plan.target]
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    dp_group = groups.dp_group if groups.dp_size > 1 else None
    if target is None:
        sae = ParallelSAE(plan.site_dim, plan.sae_cfg, tp_group, groups.tp_size, groups.tp_rank, seed=plan.seed,
                          device=groups.device, dp_group=dp_group)
    else:
        sae = ParallelTranscoder(plan.site_dim, plan.sae_cfg, tp_group, groups.tp_size, groups.tp_rank,
                                 seed=plan.seed, skip=plan.skip, device=groups.device, dp_group=dp_group,
                                 b_dec_rate=1.0)  # b_dec refitted per batch, as in co-training
    tracker = FiringTracker(sae.num_local_latents, plan.sae_cfg.dead_window_tokens, dp_group=dp_group,
                            device=groups.device)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=plan.lr)
    windows = run_windows(cfg)
    mbs = cfg.train.micro_batch_size
    train = DistributedBatchLoader(windows, "train", mbs, groups.dp_rank, groups.dp_size, cfg.train.seed)
    val = DistributedBatchLoader(windows, "val", mbs, groups.dp_rank, groups.dp_size, cfg.train.seed, shuffle=False)
    val_batches = val.fixed_batches(max(1, cfg.train.eval_batches))
    log_every = max(1, plan.steps // 10)
    train_log = []
    with ActivationCapture([site] + ([target] if target is not None else [])) as capture:
        for step in range(1, plan.steps + 1):
            batch = train.next_batch().to(groups.device)
            with torch.no_grad():
                model(batch[:, :-1])
            acts = capture.captured[site.name].detach()
            ys = None if target is None else capture.captured[target.name].detach()
            capture.clear()
            if step == 1 and target is None:
                sae.init_b_pre(acts.reshape(-1, plan.site_dim), dp_group=dp_group)
            elif step == 1:
                sae.init_biases(acts, ys, dp_group=dp_group)
            out = sae(acts) if target is None else sae(acts, target=ys)
            goal = out.x_in if target is None else ys  # what x_hat (y_hat) is compared with
            dead = tracker.dead_mask() if tracker.may_have_dead() else None
            loss, parts = sae.training_loss(goal, out, dead)
            loss.backward()
            sae_optimizer_step(sae, opt, dp_group, groups.dp_size)
            tracker.update(out.latents)
            if step % log_every == 0 or step == plan.steps:
                vals = torch.stack([parts["mse"].double(), explained_variance(goal, out.x_hat)]).to(groups.device)
                if dp_group is not None:
                    dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=dp_group)
                mse, ev = (vals / groups.dp_size).tolist()
                train_log.append({"step": step, "mse": mse, "ev": ev})
                if groups.is_writer:
                    logger.info("sae fit step %d/%d: mse %.5g, ev %.4f", step, plan.steps, mse, ev)
    if target is None:
        metrics = splice_metrics(model, sae, site, val_batches, groups)
        prefix = f"sae/{site.name}/"
    else:
        metrics = transcoder_splice_metrics(model, sae, plan.block, val_batches, groups)
        prefix = metric_prefix(plan.block)
    metrics.update(_ground_truth_scores(model, sae, site, val, max(1, cfg.train.eval_batches), groups, prefix))
    out_dir = Path(plan.out_dir)
    if groups.dp_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = shard_name(groups.tp_rank) if target is None else transcoder_shard_name(groups.tp_rank)
        write_shard(out_dir / name, sae.state_dict(),
                    {"sae_config": asdict(plan.sae_cfg), "d_model": plan.site_dim, "tp_rank": groups.tp_rank,
                     "tp_size": groups.tp_size, "seed": plan.seed})
    if groups.is_writer:
        tokens = plan.steps * cfg.train.micro_batch_size * groups.dp_size * cfg.data.seq_len
        record = {
            "run": plan.run_dir, "checkpoint": plan.tag, "site": plan.site, "target": plan.target,
            "skip": plan.skip, "d_model": plan.site_dim,
            "num_latents": plan.sae_cfg.num_latents, "k": plan.sae_cfg.k, "activation": plan.sae_cfg.activation,
            "steps": plan.steps, "lr": plan.lr,
            "seed": plan.seed, "tp_size": groups.tp_size, "dp_size": groups.dp_size, "train_tokens": tokens,
            "eval_batches": len(val_batches), "dead_window_tokens": plan.sae_cfg.dead_window_tokens,
            "metrics": metrics, "train_log": train_log,
        }
        write_text_atomic(out_dir / METRICS_FILE, json.dumps(record, indent=2) + "\n")
    if groups.world_size > 1:
        dist.barrier()
    return sae, {"metrics": metrics, "train_log": train_log}, val_batches


@torch.no_grad()
def _ground_truth_scores(model, sae: ParallelSAE, site, val: DistributedBatchLoader, num_batches: int,
                         groups, prefix: str) -> dict[str, float]:
    """`<prefix>gt_*`: the SAE's (transcoder's) latents of `site`, in inference form, scored
    against the corpus's factor columns on the validation batches (tti_dist.sae.ground_truth;
    every rank returns the same); {} without factor columns. Collective over TP and DP."""
    columns = tuple(c for c in val.windows.column_names if c.startswith("factor_"))
    if not columns:
        return {}
    sae_training = sae.training
    sae.eval()
    try:
        return ground_truth_scores(model, lambda a: sae(a).latents, site,
                                   val.fixed_batches_columns(num_batches, columns), groups, prefix)
    finally:
        sae.train(sae_training)
