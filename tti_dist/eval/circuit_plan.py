"""A checked `tti circuit` job, before any model is built: `prepare_circuit` ->
(EvalPlan, CircuitSettings, VocabLayout). Every user error is a one-line ConfigError naming
the option (exit 2). Light on purpose: no model code is imported (the search itself is
tti_dist.eval.circuit_run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tti_dist.data.dataset_reader import open_dataset
from tti_dist.data.loader import DistributedBatchLoader
from tti_dist.data.prepare import run_windows
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_dataset import SOURCE_KIND
from tti_dist.data.synthetic_vocab import VocabLayout
from tti_dist.errors import ConfigError
from tti_dist.eval.circuit_tasks import TASKS, TaskExamples
from tti_dist.eval.plan import EvalPlan, prepare_eval

NODE_KINDS = ("mlp", "attn", "resid")
"""Node types, in reporting order (tti_dist.eval.circuit_masks)."""
ABLATIONS = ("mean", "zero")
"""What a pruned node is replaced with."""

DEFAULT_TARGET_MARGIN = 0.05
"""Default target task loss: the trained model's full task loss plus this many nats."""
DEFAULT_LAMBDAS = (0.1,)
"""Default penalties (nats per fraction of nodes kept)."""


@dataclass(frozen=True)
class CircuitSettings:
    """The checked options of one `tti circuit` job."""

    task: str
    steps: int = 100
    lr: float = 0.1
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    target_loss: float | None = None
    nodes: tuple[str, ...] = NODE_KINDS
    ablation: str = "mean"
    seed: int = 0


def check_settings(s: CircuitSettings) -> CircuitSettings:
    """`s` if every option is allowed, else a one-line ConfigError naming it."""
    if s.task not in TASKS:
        raise ConfigError(f"--task: {s.task!r} is not a task; allowed: {', '.join(sorted(TASKS))}")
    if s.steps < 1:
        raise ConfigError(f"--steps: {s.steps} must be >= 1")
    if not s.lr > 0:
        raise ConfigError(f"--lr: {s.lr} must be > 0")
    if not s.lambdas or any(not lam > 0 for lam in s.lambdas):
        raise ConfigError(f"--lambdas: {','.join(map(str, s.lambdas))} must be one or more values > 0")
    if s.target_loss is not None and not s.target_loss > 0:
        raise ConfigError(f"--target-loss: {s.target_loss} must be > 0")
    bad = [n for n in s.nodes if n not in NODE_KINDS]
    if bad or not s.nodes:
        raise ConfigError(f"--nodes: {','.join(s.nodes)!r} is not allowed; use a comma list of {', '.join(NODE_KINDS)}")
    if s.ablation not in ABLATIONS:
        raise ConfigError(f"--ablation: {s.ablation!r} is not allowed; use one of {', '.join(ABLATIONS)}")
    return s


def synthetic_layout(dataset_dir: str, field: str = "RUN") -> VocabLayout:
    """The vocabulary layout of a synthetic-corpus dataset; ConfigError for any other data."""
    source = open_dataset(dataset_dir, verify=False).manifest.get("source") or {}
    kind = source.get("kind", "unknown") if isinstance(source, dict) else "unknown"
    if kind != SOURCE_KIND:
        raise ConfigError(f"{field}: the run's data ({dataset_dir}) is {kind!r}; tti circuit needs the synthetic "
                          f"corpus ({SOURCE_KIND!r}, data.source: synthetic:factored)")
    return VocabLayout.of(FactoredConfig.from_dict(source["config"]))


def task_examples(plan: EvalPlan, task: str, layout: VocabLayout) -> tuple[list[torch.Tensor], list[TaskExamples]]:
    """(inputs [B, T] per batch, the task's examples per batch) of the run's first
    plan.batches validation micro-batches."""
    batches = validation_batches(plan)
    fn = TASKS[task]
    return [b["tokens"][:, :-1] for b in batches], [fn(b["tokens"], b, layout) for b in batches]


def prepare_circuit(run_dir: str, settings: CircuitSettings, checkpoint: str | None = None,
                    batches: int = 4) -> tuple[EvalPlan, CircuitSettings, VocabLayout]:
    """Check everything before a model is built: options, run, checkpoint, data (the
    synthetic corpus), and that the batches hold examples of the task."""
    check_settings(settings)
    if batches < 1:
        raise ConfigError(f"--batches: {batches} must be >= 1")
    plan = prepare_eval(run_dir, checkpoint=checkpoint, batches=batches)
    layout = synthetic_layout(plan.cfg.data.path)
    _, examples = task_examples(plan, settings.task, layout)
    if sum(len(e) for e in examples) < 2:
        raise ConfigError(f"--batches: {batches} validation batches hold fewer than 2 examples of task "
                          f"{settings.task!r}; use more")
    return plan, settings, layout




def validation_batches(plan: EvalPlan) -> list[dict[str, torch.Tensor]]:
    """The run's first plan.batches validation micro-batches (unshuffled) with their factor
    columns: the windows `tti eval` reads ({"tokens": [B, T+1], "factor_<name>": [B, T+1]})."""
    windows = run_windows(plan.cfg)
    loader = DistributedBatchLoader(windows, "val", plan.cfg.train.micro_batch_size, 0, 1, plan.cfg.train.seed,
                                    shuffle=False)
    factors = tuple(c for c in windows.column_names if c.startswith("factor_"))
    return loader.fixed_batches_columns(plan.batches, factors)
