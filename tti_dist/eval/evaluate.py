"""`tti eval`: score a checkpoint for capability and interpretability (definitions: docs/metrics.md).

    tti eval RUN [--checkpoint STEP] [--data DIR ...] [--weights FILE] [--nproc P]
                 [--batches B] [--max-tokens N]

B defaults to the run's train.eval_batches x dp_size (the windows its eval read).

1. `prepare_eval` (launching process, no process group) reads RUN/config.yaml, resolves the
   checkpoint and the datasets, and checks the options; every problem is a one-line
   ConfigError (exit 2).
2. `launch_eval` runs `eval_worker` on P ranks, P = the run's tp_size (default) or 1 with
   `--weights` (an exported, TP-merged file): every rank builds the GPT at that TP degree
   and loads its shard (the export path: any ZeRO stage, MoE experts gathered), frozen.
3. `run_eval` reads `--batches` fixed micro-batches of each dataset's validation split
   (unshuffled, the run's micro_batch_size), computes the next-token loss, and captures the
   hookpoints; TP-sharded activations are all-gathered over TP, so rank 0 holds every
   site's full-width activations of the first `--max-tokens` tokens. Rank 0 computes the
   metrics (tti_dist/eval/report.py) and writes RUN/eval/<STEP>.parquet and <STEP>.json,
   TensorBoard (RUN/eval/tb: scalars and density histograms) and a summary
   (RUN/eval/<STEP>.md, copied to RUN/eval/summary.md). MoE models add
   their routing metrics on the same batches, co-trained SAEs their splice metrics.

Evaluation runs at data-parallel size 1: the numbers do not depend on the training layout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tti_dist.config.schema import RunConfig
from tti_dist.distributed.zero_config import engine_zero_stage
from tti_dist.errors import ConfigError
from tti_dist.models.layout import model_layout

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 4096
DEFAULT_PROBE_SITES = ("blocks.*.resid_post",)
DEFAULT_UNIT_SITES = ("blocks.*.mlp.act",)


@dataclass(frozen=True)
class EvalPlan:
    """A validated `tti eval` job (built by prepare_eval, read by every rank)."""

    run_dir: str
    """The trained run's directory."""
    cfg: RunConfig
    """The run's resolved config (RUN/config.yaml)."""
    ckpt_dir: str
    """RUN/checkpoints."""
    tag: str
    """Checkpoint tag evaluated (global_step<N>), or the weights file's name."""
    step: int
    """Optimizer step of the checkpoint (the TensorBoard step); -1 for --weights."""
    datasets: tuple[tuple[str, str], ...]
    """(name, dataset directory): 'val' for the run's own data first, then each --data."""
    weights: str | None
    """An exported safetensors file to evaluate instead of a checkpoint (TP=1)."""
    nproc: int
    """Ranks = tensor-parallel degree of the evaluation."""
    batches: int
    """Validation micro-batches per dataset."""
    max_tokens: int
    """Tokens whose activations are kept for the interpretability metrics."""
    probe_sites: tuple[str, ...] = DEFAULT_PROBE_SITES
    """Hookpoint globs for the linear / sparse probes."""
    unit_sites: tuple[str, ...] = DEFAULT_UNIT_SITES
    """Hookpoint globs for MIG and per-unit monosemanticity."""
    out_dir: str = ""
    """RUN/eval."""

    @property
    def out_name(self) -> str:
        """Output file stem: the checkpoint's step (RUN/eval/<STEP>.parquet), or the weights
        file's stem for --weights."""
        return str(self.step) if self.weights is None else self.tag


def prepare_eval(run_dir: str | Path, checkpoint: str | None = None, data: list[str] | None = None,
                 weights: str | None = None, nproc: int | None = None, batches: int | None = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> EvalPlan:
    """Validate everything before any process starts; raise a one-line ConfigError on a user error.

    `batches` defaults to train.eval_batches x dp_size: at DP=1 those are exactly the windows
    the trainer's eval read (every DP rank's slice of its first eval_batches global
    micro-steps), so `eval/loss` of the final checkpoint reproduces the logged one."""
    from tti_dist.data.arrow_dataset import open_dataset
    from tti_dist.train.export import resolve_checkpoint
    from tti_dist.train.checkpoint import tag_step

    run_dir = Path(run_dir)
    cfg, ckpt_dir, tag = resolve_checkpoint(run_dir, checkpoint) if weights is None else _weights_only(run_dir)
    if batches is None:
        batches = cfg.train.eval_batches * cfg.parallel.dp_size
    if batches < 1:
        raise ConfigError(f"--batches: {batches} must be >= 1")
    if max_tokens < 16:
        raise ConfigError(f"--max-tokens: {max_tokens} must be >= 16")
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"--weights: '{weights}' does not exist")
        _check_weights_model(weights, cfg)
        if nproc not in (None, 1):
            raise ConfigError(f"--nproc: {nproc} is not allowed with --weights (an exported model is evaluated on 1 rank)")
        nproc = 1
    else:
        nproc = cfg.parallel.tp_size if nproc is None else nproc
        if nproc != cfg.parallel.tp_size:
            raise ConfigError(f"--nproc: {nproc} must equal the run's parallel.tp_size {cfg.parallel.tp_size} "
                              "(export the run and use --weights to evaluate at TP=1)")
    if cfg.data.path is None:
        raise ConfigError(f"RUN: '{run_dir}/config.yaml' has no data.path; was it written by tti train?")
    datasets = [("val", cfg.data.path)] + [(Path(p).name, p) for p in (data or [])]
    names = [n for n, _ in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data: dataset names must be unique (directory names), got {names}")
    for name, path in datasets:
        where = "--data" if name != "val" else "data.path"
        if not (Path(path) / "manifest.json").is_file():
            raise ConfigError(f"{where}: '{path}' is not a dataset directory (no manifest.json)")
        ds = open_dataset(path, verify=False)
        if "val" not in ds.splits:
            raise ConfigError(f"{where}: '{path}' has no val split")
        if ds.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"{where}: '{path}' has a vocabulary of {ds.vocab_size} tokens, more than the "
                              f"model's model.vocab_size {cfg.model.vocab_size}")
        if ds.num_tokens("val") < cfg.train.micro_batch_size * (cfg.data.seq_len + 1):
            raise ConfigError(f"{where}: '{path}' val split has fewer tokens than one micro-batch "
                              f"({cfg.train.micro_batch_size} x {cfg.data.seq_len + 1})")
    step = tag_step(tag) if weights is None else -1
    return EvalPlan(run_dir=str(run_dir), cfg=cfg, ckpt_dir=str(ckpt_dir), tag=tag if weights is None else Path(weights).stem,
                    step=step if step is not None else -1, datasets=tuple(datasets), weights=weights, nproc=nproc,
                    batches=batches, max_tokens=max_tokens, out_dir=str(run_dir / "eval"))


def _check_weights_model(weights: str, cfg: RunConfig) -> None:
    """ConfigError unless `weights` is a `tti export` file of the run's model (metadata only)."""
    import dataclasses
    import json

    from safetensors import safe_open

    from tti_dist.config.load import section_from_dict
    from tti_dist.config.schema import ModelConfig

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors files
        raise ConfigError(f"--weights: '{weights}' is not a safetensors file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != "tti_dist.gpt" or "model_config" not in meta:
        raise ConfigError(f"--weights: '{weights}' was not written by tti export (no tti_dist.gpt metadata)")
    model_cfg = section_from_dict(ModelConfig, json.loads(meta["model_config"]), "model.")
    if dataclasses.asdict(model_cfg) != dataclasses.asdict(cfg.model):
        raise ConfigError(f"--weights: '{weights}' holds a different model than RUN/config.yaml")


def _weights_only(run_dir: Path):
    import yaml

    from tti_dist.config.load import config_from_dict

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"RUN: '{run_dir}' is not a tti run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(config_file.read_text())), run_dir / "checkpoints", "weights"


def launch_eval(plan: EvalPlan) -> dict:
    """Run `eval_worker` on plan.nproc local ranks (in-process for one); returns {rank: result}."""
    from tti_dist.train.launcher import launch_ranks

    return launch_ranks(eval_worker, plan.nproc, plan, name="tti-eval")


def eval_worker(plan: EvalPlan) -> dict:
    """One rank of the eval job: process groups, evaluation, teardown."""
    from tti_dist.train.worker import rank_session

    with rank_session(plan.cfg, plan.nproc) as groups:
        return run_eval(plan, groups)


def load_eval_model(plan: EvalPlan, groups):
    """The run's GPT at TP = plan.nproc (EP = 1) with its checkpoint (or exported) weights, frozen."""
    from tti_dist.models.gpt import GPT
    from tti_dist.train.export import load_exported, tp_rank_state_dict
    from tti_dist.train.seeding import seed_weights

    seed_weights(plan.cfg.train.seed)
    model = GPT(plan.cfg.model, groups.tp_group, 1)
    if plan.weights is not None:
        _, state = load_exported(plan.weights)  # its model was checked by prepare_eval
    else:
        # MoE: the export path returns every expert under its global id = its id at EP=1.
        state = tp_rank_state_dict(Path(plan.ckpt_dir), plan.tag, groups.tp_rank, engine_zero_stage(plan.cfg))
    model.load_state_dict(state, strict=True)
    model.to(groups.device).eval().requires_grad_(False)
    return model


def eval_batches(plan: EvalPlan, dataset_dir: str) -> list[dict[str, torch.Tensor]]:
    """The first plan.batches micro-batches of the dataset's validation split (unshuffled), with
    its factor columns ({"tokens": [B, T+1], "factor_<name>": [B, T+1]})."""
    import dataclasses

    from tti_dist.data.loader import DistributedBatchLoader
    from tti_dist.data.prepare import run_windows

    cfg = dataclasses.replace(plan.cfg, data=dataclasses.replace(plan.cfg.data, path=dataset_dir))
    windows = run_windows(cfg)
    loader = DistributedBatchLoader(windows, "val", cfg.train.micro_batch_size, 0, 1, cfg.train.seed, shuffle=False)
    factors = tuple(c for c in windows.column_names if c.startswith("factor_"))
    return loader.fixed_batches_columns(plan.batches, factors)


@torch.no_grad()
def run_eval(plan: EvalPlan, groups) -> dict:
    """Evaluate; rank 0 computes the metrics and writes the outputs. Returns the scalars (rank 0)."""
    from tti_dist.capture.hookpoints import ActivationCapture, list_hookpoints
    from tti_dist.eval.report import compute_metrics, write_outputs
    from tti_dist.models.gpt import lm_loss

    model = load_eval_model(plan, groups)
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
                            a = _gather_last_dim(a, groups.tp_group, groups.tp_size)
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
        from tti_dist.metrics.routing_probe import RoutingProbe

        probe = RoutingProbe(model, collected[2], groups, plan.cfg.model.vocab_size)
        moe = probe.measure(model)
    sae = co_trained_sae_metrics(plan, model, [b["tokens"] for b in collected[2]], groups)
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


def co_trained_sae_metrics(plan: EvalPlan, model, batches: list[torch.Tensor], groups) -> dict[str, float]:
    """Splice metrics (`sae/<site>/*`, tti_dist.sae.splice) of every SAE co-trained with the
    model (`type: sae` regularizers), restored from the checkpoint's client state: each TP
    rank's shard is in its `mp_rank_XX_model_states.pt`. Collective; {} with --weights (an
    export holds no SAE) or without SAE regularizers."""
    from tti_dist.regularizers.base import build_regularizers, parse_specs

    specs = [s for s in parse_specs(plan.cfg.regularizers, plan.cfg.model, plan.cfg.parallel.tp_size) if s.type == "sae"]
    if plan.weights is not None or not specs:
        return {}
    from tti_dist.utils.safe_load import DEEPSPEED_GLOBALS, load_torch_file

    states = load_torch_file(Path(plan.ckpt_dir) / plan.tag / f"mp_rank_{groups.tp_rank:02d}_model_states.pt",
                             DEEPSPEED_GLOBALS).get("regularizers", {})
    out: dict[str, float] = {}
    for reg in build_regularizers(specs, model, groups):
        if reg.spec.name not in states:
            logger.warning("checkpoint %s holds no state of SAE %s; skipped", plan.tag, reg.spec.name)
            continue
        reg.load_state_dict(states[reg.spec.name])
        out.update(reg.eval_metrics(model, batches))
    return out


def _gather_last_dim(x: torch.Tensor, group, size: int) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


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
            dirs = _gather_rows(dirs, groups)
        out[lin.name] = dirs.cpu()
    return out


def _gather_rows(x: torch.Tensor, groups) -> torch.Tensor:
    pieces = [torch.empty_like(x) for _ in range(groups.tp_size)]
    dist.all_gather(pieces, x.contiguous(), group=groups.tp_group)
    return torch.cat(pieces, dim=0)
