"""`tti sae fit`: train a fresh TopK SAE on a trained run's frozen activations, then measure it.

    tti sae fit RUN --site SITE --latents N --k K [--checkpoint STEP] [--steps S] [--lr LR]
                    [--out DIR] [--seed S] [--nproc P]

1. `prepare_fit` (launching process, no process group): reads RUN/config.yaml, resolves the
   checkpoint, checks the site, the SAE shape and the data; every problem is a one-line
   ConfigError (the CLI prints `tti: error: ...`, exit 2).
2. `launch_fit` runs `fit_worker` on P ranks (default: the run's world size; P must be a
   multiple of the run's tp_size, the rest is data parallel), in-process for one rank,
   otherwise through torch's elastic agent exactly like `tti train`.
3. Each rank builds the GPT at the run's TP layout and loads its TP shard's fp32 weights
   from the checkpoint with the export path (`tti_dist.train.export.tp_rank_state_dict`:
   module states for ZeRO-0, DeepSpeed's zero_to_fp32 for ZeRO 1-3, so every stage that
   `tti export` reads works; no DeepSpeed engine is built). The model is frozen (eval mode,
   requires_grad False).
4. The SAE (ParallelSAE, TopK, latents sharded over TP) trains on the site's activations of
   the training split, read by the training data loader (same windows, seed and DP split),
   one micro-batch of train.micro_batch_size windows per DP rank per step: b_pre from the
   first batch (geometric median over DP), loss = MSE + AuxK/32 (dead latents from a
   FiringTracker), gradients averaged over DP (one all-reduce per step), the decoder's
   parallel gradient removed, its own Adam step, decoder columns renormalized.
5. `splice_metrics` (tti_dist.sae.splice) on the run's fixed validation batches
   (max(1, train.eval_batches) micro-batches per DP rank); rank 0 writes OUT/sae_metrics.json
   and each DP-rank-0 rank its SAE shard OUT/sae_tp_rank<R>.safetensors (tti_dist.sae.files).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tti_dist.config.schema import RunConfig
from tti_dist.distributed.zero_config import engine_zero_stage
from tti_dist.errors import ConfigError
from tti_dist.sae.model import SAEConfig

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 500
DEFAULT_LR = 1e-3
METRICS_FILE = "sae_metrics.json"


@dataclass(frozen=True)
class FitPlan:
    """A validated `tti sae fit` job (built by prepare_fit, read by every rank)."""

    run_dir: str
    """The trained run's directory."""
    cfg: RunConfig
    """The run's resolved config (RUN/config.yaml)."""
    ckpt_dir: str
    """RUN/checkpoints."""
    tag: str
    """Checkpoint tag loaded, e.g. global_step20."""
    site: str
    """Replicated hookpoint the SAE reads."""
    site_dim: int
    """Width d of the site."""
    sae_cfg: SAEConfig
    """The SAE (TopK)."""
    steps: int
    """SAE optimizer steps (one micro-batch per DP rank each)."""
    lr: float
    """Adam learning rate (constant)."""
    seed: int
    """SAE initialisation seed."""
    out_dir: str
    """Where sae_metrics.json and the SAE shards go."""
    nproc: int
    """Processes; a multiple of the run's tp_size."""

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks of the fit job."""
        return self.nproc // self.cfg.parallel.tp_size


def _replicated_hint(cfg) -> str:
    from tti_dist.capture.hookpoints import summarize_names
    from tti_dist.models.layout import gpt_hookpoint_names, is_tp_sharded

    return summarize_names([n for n in gpt_hookpoint_names(cfg.model) if not is_tp_sharded(n)])


def prepare_fit(run_dir: str | Path, site: str, num_latents: int, k: int, checkpoint: str | None = None,
                steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, out: str | Path | None = None, seed: int = 0,
                nproc: int | None = None) -> FitPlan:
    """Validate everything before any process starts; raise a one-line ConfigError on a user error."""
    from tti_dist.capture.hookpoints import summarize_names
    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import resolve_dataset, run_windows
    from tti_dist.models.layout import gpt_hookpoint_names, hookpoint_width, is_tp_sharded
    from tti_dist.train.export import resolve_checkpoint

    run_dir = Path(run_dir)
    cfg, ckpt_dir, tag = resolve_checkpoint(run_dir, checkpoint)
    names = gpt_hookpoint_names(cfg.model)
    if site not in names:
        raise ConfigError(f"--site: {site!r} is not a hookpoint of this run's model; available: {summarize_names(names)}")
    if is_tp_sharded(site):
        raise ConfigError(f"--site: {site} is split across tensor-parallel ranks; an SAE needs a replicated site "
                          f"({_replicated_hint(cfg)})")
    tp = cfg.parallel.tp_size
    if num_latents < 2:
        raise ConfigError(f"--latents: {num_latents} must be an integer >= 2")
    if num_latents % tp:
        raise ConfigError(f"--latents: {num_latents} must be divisible by the run's parallel.tp_size {tp}")
    if not 1 <= k <= num_latents:
        raise ConfigError(f"--k: {k} must be in 1..latents ({num_latents})")
    if steps < 1:
        raise ConfigError(f"--steps: {steps} must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr: {lr!r} must be a finite number > 0")
    if seed < 0:
        raise ConfigError(f"--seed: {seed} must be >= 0")
    nproc = cfg.parallel.world_size if nproc is None else nproc
    if nproc < 1 or nproc % tp:
        raise ConfigError(f"--nproc: {nproc} must be a positive multiple of the run's parallel.tp_size {tp}")
    if not (ckpt_dir / tag / "tp_layout.json").is_file():
        raise ConfigError(f"--checkpoint: {ckpt_dir / tag} has no tp_layout.json; not a tti checkpoint")
    d = hookpoint_width(site, cfg.model)
    tokens_per_step = cfg.train.micro_batch_size * (nproc // tp) * cfg.data.seq_len
    # Short fits: a latent counts as dead after a quarter of the fit's tokens (at most the
    # default dead_window_tokens, 10M), so AuxK can act at all.
    window = max(1, min(10_000_000, steps * tokens_per_step // 4))
    sae_cfg = SAEConfig(num_latents=num_latents, activation="topk", k=k, dead_window_tokens=window)
    sae_cfg.validate(d, tp, "sae")
    cfg, dataset = resolve_dataset(cfg, run_dir)
    windows = run_windows(cfg, dataset)
    for split in ("train", "val"):
        DistributedBatchLoader(windows, split, cfg.train.micro_batch_size, 0, nproc // tp, cfg.train.seed)
    out_dir = Path(out) if out is not None else run_dir / "sae_fit" / f"{site}-n{num_latents}-k{k}"
    return FitPlan(run_dir=str(run_dir), cfg=cfg, ckpt_dir=str(ckpt_dir), tag=tag, site=site, site_dim=d,
                   sae_cfg=sae_cfg, steps=steps, lr=lr, seed=seed, out_dir=str(out_dir), nproc=nproc)


def launch_fit(plan: FitPlan) -> dict:
    """Run `fit_worker` on plan.nproc local ranks (in-process for one); returns {rank: result}."""
    from tti_dist.train.launcher import launch_ranks

    return launch_ranks(fit_worker, plan.nproc, plan, name="tti-sae")


def fit_worker(plan: FitPlan) -> dict:
    """One rank of the fit job: process groups, fit, metrics, teardown."""
    from tti_dist.train.worker import rank_session

    with rank_session(plan.cfg, plan.cfg.parallel.tp_size) as groups:
        return run_fit(plan, groups)


def load_frozen_model(plan: FitPlan, groups):
    """The run's GPT at its TP layout with this TP rank's checkpoint weights, frozen, in eval mode."""
    from tti_dist.models.gpt import GPT
    from tti_dist.train.export import tp_rank_state_dict
    from tti_dist.train.seeding import seed_weights

    seed_weights(plan.cfg.train.seed)
    model = GPT(plan.cfg.model, groups.tp_group, plan.cfg.parallel.ep_size)
    state = tp_rank_state_dict(Path(plan.ckpt_dir), plan.tag, groups.tp_rank, engine_zero_stage(plan.cfg))
    model.load_state_dict(state, strict=True)
    model.to(groups.device).eval().requires_grad_(False)
    return model


def run_fit(plan: FitPlan, groups) -> dict:
    """Train the SAE on this rank's share and measure it; returns {"metrics", "train_log"} (same on all ranks)."""
    from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import run_windows
    from tti_dist.sae.model import FiringTracker, ParallelSAE
    from tti_dist.sae.splice import splice_metrics

    cfg = plan.cfg
    model = load_frozen_model(plan, groups)
    site = next(hp for hp in list_hookpoints(model) if hp.name == plan.site)
    tp_group = groups.tp_group if groups.tp_size > 1 else None
    dp_group = groups.dp_group if groups.dp_size > 1 else None
    sae = ParallelSAE(plan.site_dim, plan.sae_cfg, tp_group, groups.tp_size, groups.tp_rank, seed=plan.seed,
                      device=groups.device)
    tracker = FiringTracker(sae.num_local_latents, plan.sae_cfg.dead_window_tokens, dp_group=dp_group,
                            device=groups.device)
    opt = torch.optim.Adam(sae.parameters(), lr=plan.lr)
    windows = run_windows(cfg)
    mbs = cfg.train.micro_batch_size
    train = DistributedBatchLoader(windows, "train", mbs, groups.dp_rank, groups.dp_size, cfg.train.seed)
    val = DistributedBatchLoader(windows, "val", mbs, groups.dp_rank, groups.dp_size, cfg.train.seed, shuffle=False)
    val_batches = val.fixed_batches(max(1, cfg.train.eval_batches))
    log_every = max(1, plan.steps // 10)
    train_log = []
    with ActivationCapture([site]) as capture:
        for step in range(1, plan.steps + 1):
            batch = train.next_batch().to(groups.device)
            with torch.no_grad():
                model(batch[:, :-1])
            acts = capture.captured[site.name].detach()
            capture.clear()
            if step == 1:
                sae.init_b_pre(acts.reshape(-1, plan.site_dim), dp_group=dp_group)
            out = sae(acts)
            dead = tracker.dead_mask() if tracker.may_have_dead() else None
            loss, parts = sae.training_loss(out.x_in, out, dead)
            loss.backward()
            _dp_mean_grads(sae, dp_group, groups.dp_size)
            sae.remove_parallel_gradient()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sae.normalize_decoder()
            tracker.update(out.latents)
            if step % log_every == 0 or step == plan.steps:
                from tti_dist.sae.metrics import explained_variance

                vals = torch.stack([parts["mse"].double(), explained_variance(out.x_in, out.x_hat)]).to(groups.device)
                if dp_group is not None:
                    dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=dp_group)
                mse, ev = (vals / groups.dp_size).tolist()
                train_log.append({"step": step, "mse": mse, "ev": ev})
                if groups.is_writer:
                    logger.info("sae fit step %d/%d: mse %.5g, ev %.4f", step, plan.steps, mse, ev)
    metrics = splice_metrics(model, sae, site, val_batches, groups)
    out_dir = Path(plan.out_dir)
    if groups.dp_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        from tti_dist.sae.files import shard_name, write_shard

        write_shard(out_dir / shard_name(groups.tp_rank), sae.state_dict(),
                    {"sae_config": asdict(plan.sae_cfg), "d_model": plan.site_dim, "tp_rank": groups.tp_rank,
                     "tp_size": groups.tp_size, "seed": plan.seed})
    if groups.is_writer:
        tokens = plan.steps * cfg.train.micro_batch_size * groups.dp_size * cfg.data.seq_len
        record = {
            "run": plan.run_dir, "checkpoint": plan.tag, "site": plan.site, "d_model": plan.site_dim,
            "num_latents": plan.sae_cfg.num_latents, "k": plan.sae_cfg.k, "steps": plan.steps, "lr": plan.lr,
            "seed": plan.seed, "tp_size": groups.tp_size, "dp_size": groups.dp_size, "train_tokens": tokens,
            "eval_batches": len(val_batches), "dead_window_tokens": plan.sae_cfg.dead_window_tokens,
            "metrics": metrics, "train_log": train_log,
        }
        (out_dir / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if groups.world_size > 1:
        dist.barrier()
    return {"metrics": metrics, "train_log": train_log}


@torch.no_grad()
def _dp_mean_grads(sae, dp_group, dp_size: int) -> None:
    """Average the SAE's gradients over the DP group (one all-reduce of all local gradients)."""
    if dp_group is None:
        return
    params = [p for p in sae.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=dp_group)
    flat /= dp_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


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
