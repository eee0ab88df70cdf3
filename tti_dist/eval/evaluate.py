"""`tti eval`: score a checkpoint for capability and interpretability (definitions: docs/metrics.md).

    tti eval RUN [--checkpoint STEP] [--data DIR ...] [--weights FILE] [--nproc P]
                 [--batches B] [--max-tokens N]

B defaults to the run's train.eval_batches x dp_size (the windows its eval read).

1. `prepare_eval` (tti_dist/eval/plan.py; launching process, no process group) reads
   RUN/config.yaml, resolves the checkpoint and the datasets, and checks the options; every
   problem is a one-line ConfigError (exit 2).
2. `tti eval` (tti_dist/commands/eval.py) runs `run_eval` on P ranks, P = the run's tp_size (default) or 1 with
   `--weights` (an exported, TP-merged file): every rank builds the GPT at that TP degree
   and loads its shard (the export path: any ZeRO stage, MoE experts gathered), frozen.
3. `run_eval` reads `--batches` fixed micro-batches of each dataset's validation split
   (unshuffled, the run's micro_batch_size), computes the next-token loss, and captures the
   hookpoints; TP-sharded activations are all-gathered over TP, so rank 0 holds every
   site's full-width activations of the first `--max-tokens` tokens. Rank 0 computes the
   metrics (tti_dist/eval/metrics.py) and writes (tti_dist/eval/outputs.py)
   RUN/eval/<STEP>.parquet and <STEP>.json, TensorBoard (RUN/eval/tb: scalars and density
   histograms) and a summary (RUN/eval/<STEP>.md, copied to RUN/eval/summary.md). MoE models add
   their routing metrics on the same batches, co-trained SAEs their splice metrics.

Evaluation runs at data-parallel size 1: the numbers do not depend on the training layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
from tti_dist.data.loader import DistributedBatchLoader
from tti_dist.data.prepare import run_windows
from tti_dist.distributed.collectives import all_gather_concat
from tti_dist.eval.metrics import compute_metrics
from tti_dist.eval.plan import EvalPlan
from tti_dist.eval.outputs import write_outputs
from tti_dist.metrics.routing_probe import RoutingProbe
from tti_dist.models.gpt import lm_loss
from tti_dist.models.layout import model_layout
from tti_dist.regularizers.base import REGISTRY, CoTrainedModule, build_regularizers
from tti_dist.rundir import model_states_file
from tti_dist.sae.ground_truth import ground_truth_scores
from tti_dist.train.export import load_frozen_model
from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file

logger = logging.getLogger(__name__)


def eval_batches(plan: EvalPlan, dataset_dir: str) -> list[dict[str, torch.Tensor]]:
    """The first plan.batches micro-batches of the dataset's validation split (unshuffled), with
    its factor columns ({"tokens": [B, T+1], "factor_<name>": [B, T+1]})."""
    cfg = dataclasses.replace(plan.cfg, data=dataclasses.replace(plan.cfg.data, path=dataset_dir))
    windows = run_windows(cfg)
    loader = DistributedBatchLoader(windows, "val", cfg.train.micro_batch_size, 0, 1, cfg.train.seed, shuffle=False)
    factors = tuple(c for c in windows.column_names if c.startswith("factor_"))
    return loader.fixed_batches_columns(plan.batches, factors)


@torch.no_grad()
def run_eval(plan: EvalPlan, groups) -> dict:
    """Evaluate; rank 0 computes the metrics and writes the outputs. Returns the scalars (rank 0)."""
    model = load_frozen_model(plan.cfg, Path(plan.ckpt_dir), plan.tag, groups, plan.weights)
    layout = model_layout(plan.cfg.model)
    sites = [hp for hp in list_hookpoints(model) if layout.hookpoint(hp.name).is_float]
    scalars: dict[str, float] = {}
    collected = None
    for name, path in plan.datasets:
        batches = eval_batches(plan, path)
        losses = []
        keep = name == "val"  # activations (interpretability metrics) on the run's own data
        acts: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in sites} if keep else {}
        labels: dict[str, list[torch.Tensor]] = {}
        num_kept = 0
        with ActivationCapture(sites if keep else []) as capture:
            for batch in batches:
                tokens = batch["tokens"].to(groups.device)
                losses.append(lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).mean())
                if keep and num_kept < plan.max_tokens:
                    take = min(plan.max_tokens - num_kept, tokens[:, :-1].numel())
                    for hp in sites:
                        a = capture.captured[hp.name].detach().float()
                        if hp.tp_sharded and groups.tp_size > 1:
                            a = all_gather_concat(a, groups.tp_group, dim=-1)
                        acts[hp.name].append(a.reshape(-1, a.shape[-1])[:take].cpu())
                    for key, col in batch.items():
                        labels.setdefault(key, []).append(col[:, :-1].reshape(-1)[:take])
                    num_kept += take
                capture.clear()
        loss = torch.stack(losses).mean().item()
        prefix = "eval/" if name == "val" else f"eval/{name}/"
        scalars[prefix + "loss"] = loss
        scalars[prefix + "ppl"] = math.exp(loss)
        if keep:
            collected = ({k: torch.cat(v) for k, v in acts.items()}, {k: torch.cat(v) for k, v in labels.items()},
                         batches)
    weights = _direction_weights(model, groups)
    moe = {}
    if plan.cfg.model.moe_num_experts:

        probe = RoutingProbe(model, collected[2], groups, plan.cfg.model.vocab_size)
        moe = probe.measure(model)
    sae = co_trained_sae_metrics(plan, model, collected[2], groups)
    result: dict = {}
    if groups.is_writer:
        acts, labels, _ = collected
        metrics, histograms = compute_metrics(plan, acts, labels, weights)
        scalars.update(metrics)
        scalars.update(moe)
        scalars.update(sae)
        write_outputs(plan, scalars, histograms)
        result = scalars
    if groups.world_size > 1:
        dist.barrier()
    return result


def co_trained_sae_metrics(plan: EvalPlan, model, batches: list[dict[str, torch.Tensor]], groups) -> dict[str, float]:
    """Splice metrics (`sae/<site>/*`, tti_dist.sae.splice) of every SAE co-trained with the
    model (`type: sae` regularizers; `type: transcoder`: `transcoder/blocks.<i>.mlp/*`, the
    replacement metrics), restored from the checkpoint's client state: each TP
    rank's shard is in its `mp_rank_XX_model_states.pt`. On the synthetic language (batches
    with factor columns) also the latents' ground-truth scores `sae/<site>/gt_*`
    (tti_dist.sae.ground_truth). Collective; {} with --weights (an export holds no SAE) or
    without SAE regularizers."""
    specs = [r for r in plan.cfg.regularizers if issubclass(REGISTRY[r.type], CoTrainedModule)]
    if plan.weights is not None or not specs:
        return {}

    states = load_torch_file(Path(plan.ckpt_dir) / plan.tag / model_states_file(groups.tp_rank),
                             DEEPSPEED_GLOBALS).get("regularizers", {})
    out: dict[str, float] = {}
    for reg in build_regularizers(specs, model, groups):
        if reg.spec.name not in states:
            logger.warning("checkpoint %s holds no state of SAE %s; skipped", plan.tag, reg.spec.name)
            continue
        reg.load_state_dict(states[reg.spec.name])
        out.update(reg.eval_metrics(model, [b["tokens"] for b in batches]))
        sae = getattr(reg, "sae", None)
        if sae is not None:  # an SAE, or a transcoder (reading its input site, tags under its metric_prefix)
            sae.eval()  # inference form (e.g. BatchTopK's learned threshold)
            prefix = getattr(reg, "metric_prefix", None) or f"sae/{reg.site.name}/"
            out.update(ground_truth_scores(model, lambda a: sae(a).latents, reg.site, batches, groups, prefix))
    return out


def _direction_weights(model, groups) -> dict[str, torch.Tensor]:
    """Full neuron-direction matrices of each dense MLP, gathered over TP: `blocks.{i}.mlp.fc1`
    (rows of fc1.weight: each hidden unit's input direction, [ffn, d]) and `blocks.{i}.mlp.fc2`
    (columns of fc2.weight, transposed: each unit's output direction, [ffn, d]). Which layers
    exist and where their directions lie comes from the model's layout (MoE blocks have none)."""
    out = {}
    for lin in model_layout(model.cfg).linears:
        if lin.role not in ("mlp.fc1", "mlp.fc2"):
            continue
        w = model.get_submodule(lin.name).weight.detach().float()
        dirs = w.t() if lin.directions == "columns" else w  # [ffn/tp, d]
        if groups.tp_size > 1:
            dirs = all_gather_concat(dirs, groups.tp_group, dim=0)
        out[lin.name] = dirs.cpu()
    return out
