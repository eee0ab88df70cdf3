"""The training loop of one rank: forward, loss, DeepSpeed backward/step, eval, log, checkpoint.

Data flow per optimizer step (grad_accum_steps micro-steps):
    batch (this DP rank's slice; identical on the TP ranks of a DP group)
    -> engine(tokens) -> local logit shard -> vocab-parallel cross entropy (TP group)
    -> total loss = task loss + sum of weighted regularizer losses (each computed on this
       rank's captured activation shards, reduced over its documented group)
    -> engine.backward -> engine.step
Metrics are reduced over explicit groups (task loss: mean over the DP group) and only at
log steps, where the host syncs once. Rank 0 writes TensorBoard, Parquet and (logging.wandb) W&B.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from tti_dist.config.load import config_to_dict, dump_config
from tti_dist.config.schema import RunConfig
from tti_dist.data.loader import DistributedBatchLoader
from tti_dist.data.prepare import run_windows
from tti_dist.distributed.groups import ParallelGroups, enforce_collective_timeout
from tti_dist.capture.hookpoints import ActivationCapture
from tti_dist.metrics import open_metrics_writer
from tti_dist.regularizers.base import CoTrainedModule, build_regularizers
from tti_dist.models.gpt import GPT, lm_loss, tp_partition_dims
from tti_dist.train import checkpoint as ckpt
from tti_dist.rundir import RunDir, latest_tag
from tti_dist.runtime import stop_request
from tti_dist.train.engine import build_engine, global_grad_norm, grad_norm_now
from tti_dist.train.weight_sparsity import WeightSparsifier
from tti_dist.metrics.routing_probe import RoutingProbe
from tti_dist.metrics.routing_stats import RoutingStatsAccumulator, with_imbalance
from tti_dist.utils.memory import current_rss_bytes, peak_rss_bytes
from tti_dist.utils.seeding import seed_runtime, seed_weights

logger = logging.getLogger(__name__)


RESULT_HISTORY = 10_000
"""Logged steps a TrainResult keeps (the most recent): a record of every step would grow by
~100 bytes per step for the whole run (1 MB per 10,000 steps, measured by bench/soak.py).
The complete curves are in RUN/metrics.parquet."""


@dataclass
class TrainResult:
    """What a finished run reports (identical on every rank)."""

    final_step: int
    """Optimizer steps completed."""
    losses: dict[int, float] = field(default_factory=dict)
    """train/task_loss at the most recent RESULT_HISTORY logged steps of this process."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    """eval/loss at the most recent RESULT_HISTORY eval steps."""
    last_checkpoint: str | None = None
    """Tag of the last checkpoint saved."""
    stopped_by: str | None = None
    """The signal that stopped the run early ('SIGTERM'), after its checkpoint was saved."""
    nonfinite: str | None = None
    """Why a `train.nonfinite: stop` run ended early: the step and the first non-finite tag."""

    def record(self, history: dict[int, float], step: int, value: float) -> None:
        """history[step] = value, dropping the oldest entry beyond RESULT_HISTORY."""
        history[step] = value
        if len(history) > RESULT_HISTORY:
            del history[next(iter(history))]  # dicts keep insertion (= step) order


def build_data(cfg: RunConfig, groups: ParallelGroups) -> tuple[DistributedBatchLoader, list[dict[str, torch.Tensor]]]:
    """Train loader for this DP rank and the fixed validation micro-batches, each
    {"tokens": ..., "factor_<name>": ...} (the dataset's ground-truth factor columns, if any)."""
    windows = run_windows(cfg)
    train = DistributedBatchLoader(
        windows, "train", cfg.train.micro_batch_size, groups.dp_rank, groups.dp_size, cfg.train.seed
    )
    val = DistributedBatchLoader(
        windows, "val", cfg.train.micro_batch_size, groups.dp_rank, groups.dp_size, cfg.train.seed, shuffle=False
    )
    factors = tuple(c for c in windows.column_names if c.startswith("factor_"))
    return train, val.fixed_batches_columns(cfg.train.eval_batches, factors)


def dp_mean(value: torch.Tensor, groups: ParallelGroups) -> float:
    """Mean of a scalar over the data-parallel group (a host sync)."""
    return dp_means({"v": value}, groups)["v"]


def dp_means(values: dict[str, torch.Tensor], groups: ParallelGroups) -> dict[str, float]:
    """Means of several scalars over the data-parallel group: one all-reduce, one host sync."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()).to(groups.device) for v in values.values()])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=groups.dp_group)
    return dict(zip(values, (stacked / groups.dp_size).tolist()))


class NonFiniteStep(Exception):
    """A `train.nonfinite: stop` run met a non-finite loss or gradient (no update applied)."""


@dataclass
class StepVerdict:
    """What the ranks agreed on at an optimizer step (one all-reduce, train/trainer.py)."""

    nonfinite: bool
    """Some rank's loss or the gradient norm is inf or NaN."""
    stop_signal: int
    """The largest signal number any rank was sent (0: none): stop after this step."""


def step_verdict(total_loss_sum: torch.Tensor, grad_norm, device: torch.device) -> StepVerdict:
    """The ranks' common verdict on an optimizer step: one all-reduce (MAX over the world
    group) of [this rank's loss or the gradient norm is not finite, the signal this rank was
    sent], and one host sync, per optimizer step (bench/throughput.py --guard measures it)."""
    bad = ~torch.isfinite(total_loss_sum)
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=device))
    flags = torch.stack([bad.to(torch.float64),
                         torch.tensor(float(stop_request.requested()), dtype=torch.float64, device=device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
    nonfinite, signum = flags.tolist()
    return StepVerdict(nonfinite=bool(nonfinite), stop_signal=int(signum))


class StepObserver(Protocol):
    """Told about every optimizer step that logged scalars or saved a checkpoint.

    Called on every rank, in the same order, with the same (DP-reduced) scalars: a launcher
    can forward them (Ray Train's `ray.train.report`, itself a barrier over the workers)."""

    def __call__(self, step: int, scalars: dict[str, float], checkpoint_tag: str | None) -> None: ...


class Trainer:
    """Owns the engine, data and sinks of one rank for one run."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, groups: ParallelGroups, resume: bool = False,
                 resume_tag: str | None = None, observer: StepObserver | None = None):
        self.cfg = cfg
        self.observer = observer
        self.run_dir = Path(run_dir)
        self.run = RunDir(self.run_dir)
        self.ckpt_dir = self.run.checkpoints
        self.groups = groups
        seed_weights(cfg.train.seed)
        self.model = GPT(cfg.model, groups)
        enforce_collective_timeout(cfg.train.dist_timeout_s)  # also DeepSpeed's expert-parallel groups
        self.model.recompute_blocks = cfg.train.activation_checkpointing
        self.tp_layout = tp_partition_dims(self.model)
        seed_runtime(cfg.train.seed, groups.dp_rank)
        self.engine, self.ds_config = build_engine(self.model, cfg, groups)
        self.regularizers = build_regularizers(cfg.regularizers, self.engine.module, groups)
        self.co_trained = [reg for reg in self.regularizers if isinstance(reg, CoTrainedModule)]
        self.sparsifier = WeightSparsifier(cfg, self.engine.module, groups) if cfg.weight_sparsity else None
        """Regularizers that train modules of their own (the SAE): stepped after each optimizer step."""
        hookpoints = {hp.name: hp for reg in self.regularizers for hp in reg.captures}
        # One capture for the union of all regularizers' hookpoints, kept registered for the run.
        self.capture = ActivationCapture(list(hookpoints.values())).__enter__() if hookpoints else None
        if groups.is_writer:
            self._write_run_files()
        self.train_loader, val_batches = build_data(cfg, groups)
        self.val_batches = [b["tokens"] for b in val_batches]
        # MoE: routing counts per micro-step (moe/* train metrics) and a probe on the
        # validation batches for routing stability and expert specialization at eval steps.
        self.routing_stats = RoutingStatsAccumulator(self.engine.module)
        self.routing_probe = None
        if self.routing_stats:
            self.routing_probe = RoutingProbe(self.engine.module, val_batches, groups, cfg.model.vocab_size)
        self.step = 0
        self.tokens_per_step = (
            cfg.train.micro_batch_size * cfg.train.grad_accum_steps * groups.dp_size * cfg.data.seq_len
        )
        if resume:
            # A launcher that tracks checkpoints itself (Ray Train) names the one to load.
            tag = resume_tag or latest_tag(self.ckpt_dir)
            if tag is None:
                logger.warning("resume requested but %s holds no checkpoint; starting from step 0", self.ckpt_dir)
            else:
                state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag, groups)
                self.step = int(state["step"])
                self.train_loader.load_state_dict(state["loader"])
                saved = state.get("regularizers", {})
                for reg in self.regularizers:
                    if reg.spec.name in saved:
                        reg.load_state_dict(saved[reg.spec.name])
                if self.routing_probe is not None and "routing_probe" in state:
                    self.routing_probe.load_state_dict(state["routing_probe"])
        self.metrics = open_metrics_writer(
            self.run_dir,
            is_writer_rank=groups.is_writer,
            tensorboard=cfg.logging.tensorboard,
            parquet=cfg.logging.parquet,
            resume_step=self.step if resume else None,
            wandb=cfg.logging.wandb,
            run_config=config_to_dict(cfg),
        )

    def _write_run_files(self) -> None:
        """RUN/config.yaml (the resolved config) and RUN/deepspeed_config.json (as used)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run.config_file)
        self.run.deepspeed_config_file.write_text(json.dumps(self.ds_config, indent=2) + "\n")

    # -- one optimizer step --------------------------------------------------------------
    def _micro_step(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch = self.train_loader.next_batch().to(self.groups.device, non_blocking=True)
        logits = self.engine(batch[:, :-1])
        if self.routing_stats:
            self.routing_stats.add()
        task_loss = lm_loss(logits, batch[:, 1:]).mean()
        total_loss = task_loss
        reg_metrics: dict[str, torch.Tensor] = {}
        acts = self.capture.captured if self.capture is not None else {}
        for reg in self.regularizers:
            weighted, metrics = reg(acts, self.step)
            total_loss = total_loss + weighted
            reg_metrics.update(metrics)
        self.engine.backward(total_loss)
        if self.capture is not None:
            self.capture.clear()  # free the activations' graphs
        return task_loss.detach(), total_loss.detach(), reg_metrics

    def _optimizer_step(self, need_norm: bool):
        """One optimizer step: (mean task loss, mean total loss, mean reg metrics, grad norm,
        StepVerdict). Raises NonFiniteStep (before any update) under `train.nonfinite: stop`."""
        gas = self.cfg.train.grad_accum_steps
        task_sum = torch.zeros((), device=self.groups.device)
        total_sum = torch.zeros((), device=self.groups.device)
        reg_sums: dict[str, torch.Tensor] = {}
        norm = None
        for micro in range(gas):
            task, total, reg_metrics = self._micro_step()
            task_sum += task
            total_sum += total
            for k, v in reg_metrics.items():
                reg_sums[k] = reg_sums.get(k, 0.0) + v.float().to(self.groups.device)
            if micro < gas - 1:
                self.engine.step()  # DeepSpeed counts the micro-step; no update yet
                continue
            # The gradient-accumulation boundary: DeepSpeed updates the weights in step().
            if self._norm_before_step:
                norm = grad_norm_now(self.engine, self.groups)
            reg_means = {k: v / gas for k, v in reg_sums.items()}
            verdict = step_verdict(total_sum, norm, self.groups.device)
            if verdict.nonfinite and self.cfg.train.nonfinite == "stop":
                raise NonFiniteStep(self._first_nonfinite(task_sum / gas, reg_means, total_sum / gas, norm))
            self._step_engine(skip=verdict.nonfinite)
            if not verdict.nonfinite and not self.engine.was_step_applied():
                # ZeRO's and bf16's optimizers check the gradient norm themselves and skip
                # the update when it is not finite (consistently over their groups).
                verdict.nonfinite = True
                if self.cfg.train.nonfinite == "stop":
                    raise NonFiniteStep(f"train/grad_norm is not finite at step {self.step + 1} "
                                        "(DeepSpeed's optimizer skipped the update)")
            if self.sparsifier is not None:  # weights and master weights, every step (docs/methods.md)
                self.sparsifier.apply(self.step + 1)
            for module in self.co_trained:
                module.after_optimizer_step()
        if norm is None and need_norm:
            norm = global_grad_norm(self.engine)
        return task_sum / gas, total_sum / gas, {k: v / gas for k, v in reg_sums.items()}, norm, verdict

    @property
    def _norm_before_step(self) -> bool:
        # Plain fp32 data parallelism (stage 0) neither records the gradient norm nor checks
        # it, so the trainer takes it from the gradients before the update, every step.
        return self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled()

    def _first_nonfinite(self, task_loss, reg_means: dict[str, torch.Tensor], total_loss, norm) -> str:
        """'<tag> is <value> at step N': the first non-finite of the step's tags in logging
        order, over all ranks (a rank's own loss can be finite when another's is not)."""
        values = {"train/task_loss": task_loss, **reg_means, "train/total_loss": total_loss}
        if norm is not None:
            values["train/grad_norm"] = torch.as_tensor(norm)
        stacked = torch.stack([v.detach().float().reshape(()).to(self.groups.device) for v in values.values()])
        bad = (~torch.isfinite(stacked)).to(torch.float64)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
        first = next((i for i, b in enumerate(bad.tolist()) if b), len(values) - 1)
        tag = list(values)[first]
        local = stacked[first].item()
        shown = f"{local}" if not math.isfinite(local) else "not finite on another rank"
        return f"{tag} is {shown} at step {self.step + 1}"

    def _step_engine(self, skip: bool) -> None:
        """engine.step() at the accumulation boundary; with `skip`, an update of nothing.

        ZeRO's and bf16's optimizers find the non-finite gradients themselves and skip.
        Plain fp32 (stage 0) steps the torch optimizer directly, which has no such check:
        for this one call its `step` does nothing (the gradients are zeroed first so that
        DeepSpeed's clipping stays finite), and it carries DeepSpeed's `overflow` flag,
        which makes the engine count the step in `skipped_steps`, clear the gradients and
        hold the LR schedule, exactly as after ZeRO's own skip."""
        optimizer = self.engine.optimizer
        marked = skip and not hasattr(optimizer, "overflow")
        if marked:
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            optimizer.overflow = True
            optimizer.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            if marked:
                del optimizer.overflow
                del optimizer.step  # the class's step again

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation micro-batches, averaged over DP."""
        self.engine.eval()
        total = torch.zeros((), device=self.groups.device)
        for batch in self.val_batches:
            batch = batch.to(self.groups.device)
            total += lm_loss(self.engine(batch[:, :-1]), batch[:, 1:]).mean()
            if self.capture is not None:
                self.capture.clear()
        self.engine.train()
        return dp_mean(total / len(self.val_batches), self.groups)

    def save(self) -> str:
        """Checkpoint the current step (collective)."""
        client_state = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "loader": self.train_loader.state_dict(),
            # Samplers keyed on call counters (orthogonality, decorrelation): restoring the
            # counters makes a resumed run draw the samples the uninterrupted run draws.
            "regularizers": {reg.spec.name: reg.state_dict() for reg in self.regularizers},
        }
        if self.routing_probe is not None:
            # The last probe routing: a resumed run reports moe/*/stability against it.
            client_state["routing_probe"] = self.routing_probe.state_dict()
        tag = ckpt.save_checkpoint(
            self.engine, self.ckpt_dir, self.step, client_state, self.groups, self.tp_layout,
            self.cfg.checkpoint.keep_last,
        )
        # Make every metric row up to the checkpoint durable: a crash after this point
        # resumes from here and must find them (rows after it are discarded on resume).
        self.metrics.flush()
        return tag

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until train.steps; returns the logged losses."""
        cfg, total = self.cfg, self.cfg.train.steps
        result = TrainResult(final_step=self.step)
        progress = self._progress_bar(total)
        interval_start, interval_steps = time.perf_counter(), 0
        self.engine.train()
        try:
            while self.step < total:
                log_now = (self.step + 1) % cfg.logging.log_every == 0 or self.step + 1 == total
                try:
                    loss, total_loss, reg_metrics, norm, verdict = self._optimizer_step(need_norm=log_now)
                except NonFiniteStep as exc:
                    result.nonfinite = str(exc)
                    logger.error("%s: no update applied; stopping (train.nonfinite: stop); the latest checkpoint "
                                 "is %s", exc, latest_tag(self.ckpt_dir) or "none")
                    break
                self.step += 1
                interval_steps += 1
                scalars: dict[str, float] = {}
                if log_now:
                    # One all-reduce and one host sync per log step.
                    routing = self.routing_stats.metrics() if self.routing_stats else {}
                    reduced = dp_means({"train/task_loss": loss, "train/total_loss": total_loss, **reg_metrics,
                                        **routing}, self.groups)
                    if routing:
                        reduced = with_imbalance(reduced)
                    loss_value = reduced["train/task_loss"]
                    elapsed = time.perf_counter() - interval_start
                    scalars = {
                        **reduced,
                        "train/lr": self.engine.get_lr()[0],
                        "train/grad_norm": float(norm) if norm is not None else math.nan,
                        "perf/step_time_s": elapsed / interval_steps,
                        "perf/tokens_per_sec": self.tokens_per_step * interval_steps / elapsed,
                        "train/skipped_steps": float(self.engine.skipped_steps),
                    }
                    scalars.update(self._memory_scalars())
                    if self.sparsifier is not None:
                        scalars.update(self.sparsifier.metrics())
                    result.record(result.losses, self.step, loss_value)
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss_value:.4f}")
                    # The next interval starts now, so the metrics write below (and a flush
                    # it triggers) is part of the next step's time: a slow sink shows up in
                    # perf/step_time_s instead of hiding between intervals.
                    interval_start, interval_steps = time.perf_counter(), 0
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == total):
                    eval_start = time.perf_counter()
                    scalars["eval/loss"] = self.evaluate()
                    result.record(result.eval_losses, self.step, scalars["eval/loss"])
                    for module in self.co_trained:  # e.g. sae/<site>/* splice metrics
                        scalars.update(module.eval_metrics(self.engine.module, self.val_batches))
                    if self.routing_probe is not None:  # moe/*: stability, specialization (NMI)
                        scalars.update(self.routing_probe.measure(self.engine.module))
                    if self.capture is not None:
                        self.capture.clear()
                    interval_start += time.perf_counter() - eval_start  # evaluation is not step time
                if scalars:
                    self.metrics.log(self.step, self.step * self.tokens_per_step, scalars)
                if progress is not None:
                    progress.update(1)
                every = cfg.checkpoint.every
                saved = None
                stopping = verdict.stop_signal != 0 and self.step < total
                if ((every and self.step % every == 0) or (self.step == total and cfg.checkpoint.save_final)
                        or stopping):
                    save_start = time.perf_counter()
                    saved = result.last_checkpoint = self.save()
                    interval_start += time.perf_counter() - save_start  # nor is checkpointing
                if self.observer is not None and (scalars or saved):
                    self.observer(self.step, {"step": self.step, "tokens": self.step * self.tokens_per_step,
                                              **scalars}, saved)
                if stopping:
                    result.stopped_by = stop_request.signal_name(verdict.stop_signal)
                    logger.warning("stopped by %s after step %d; checkpoint %s saved", result.stopped_by,
                                   self.step, saved)
                    break
        finally:
            if progress is not None:
                progress.close()
            if self.capture is not None:
                self.capture.__exit__(None, None, None)
                self.capture = None
            self.metrics.close()
        result.final_step = self.step
        return result

    def _memory_scalars(self) -> dict[str, float]:
        """perf/* memory, each the maximum over all ranks (the rank nearest to running out):
        resident memory now and at its peak, and on CUDA the peak of allocated device memory.
        One all-reduce of three numbers over the world group, at log steps only."""
        cuda = self.groups.device.type == "cuda"
        rss = current_rss_bytes()
        values = torch.tensor(
            [peak_rss_bytes(), -1.0 if rss is None else rss,
             torch.cuda.max_memory_allocated(self.groups.device) if cuda else -1.0],
            dtype=torch.float64, device=self.groups.device,
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
        peak, now, cuda_peak = (v / 2**30 for v in values.tolist())
        out = {"perf/peak_rss_gib": peak}
        if now >= 0:
            out["perf/rss_gib"] = now
        if cuda:
            out["perf/cuda_peak_allocated_gib"] = cuda_peak
        return out

    def _progress_bar(self, total: int):
        if not (self.groups.is_writer and self.cfg.logging.progress_bar):
            return None
        return tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
