"""`tti circuit`'s search on one process (TP=1): the pruning of the trained model and its
two controls to one target task loss (the job is checked first by
tti_dist.eval.circuit_plan.prepare_circuit).

The three entries of the output, each pruned to the same target
(tti_dist.eval.circuit_masks.prune):
- `trained`: the run's checkpoint, TP shards and ZeRO partitions consolidated
  (`consolidated_state_dict`, the `tti export` path), loaded into a GPT built at TP=1;
- `init`: the same config with the weights the run started from (seeded with the run's
  train.seed, as the trainer seeds them; no checkpoint read): how small a circuit the mask
  search finds in a network that learned nothing;
- `random_labels`: the trained model on the nonsense task (the task's labels permuted,
  tti_dist.eval.circuit_tasks.random_labels): how small a circuit the search finds for a
  task the model cannot have learned.

Each entry also counts its circuit's edges, the nonzero block weights between kept nodes
(tti_dist.eval.circuit_edges); `edges_total` counts them in the whole trained model.

The target is `--target-loss`, or by default the trained model's full (unpruned) task loss
plus DEFAULT_TARGET_MARGIN nats, fixed once and used for all three entries, as the paper
compares circuit sizes at one target loss.
"""

from __future__ import annotations

import dataclasses

from tti_dist.data.synthetic_vocab import VocabLayout
from tti_dist.eval.circuit_edges import circuit_edges
from tti_dist.eval.circuit_masks import NodeMasker, TaskData, evaluate, node_sites, prune, total_nodes
from tti_dist.eval.circuit_plan import DEFAULT_TARGET_MARGIN, CircuitSettings, task_examples
from tti_dist.eval.circuit_tasks import random_labels
from tti_dist.eval.plan import EvalPlan
from tti_dist.models.gpt import GPT
from tti_dist.train.export import consolidated_state_dict
from tti_dist.utils.seeding import seed_weights


def _model(plan: EvalPlan, groups, state: dict | None) -> GPT:
    """The run's GPT at TP=1 (EP=1), frozen, with `state`, or as initialised (state None)."""
    seed_weights(plan.cfg.train.seed)
    model = GPT(plan.cfg.model, groups)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.to(groups.device).eval().requires_grad_(False)


def run_circuit(plan: EvalPlan, settings: CircuitSettings, layout: VocabLayout, groups) -> dict:
    """Prune the trained model, the model at initialisation and the trained model on the
    random-label task to one target; the JSON-ready result (one process, TP=1)."""
    dev = groups.device
    inputs, examples = task_examples(plan, settings.task, layout)
    inputs = [x.to(dev) for x in inputs]
    moved = [dataclasses.replace(e, rows=e.rows.to(dev), positions=e.positions.to(dev),
                                 classes=e.classes.to(dev), labels=e.labels.to(dev)) for e in examples]
    data = TaskData(inputs, moved)
    nonsense = TaskData(inputs, random_labels(moved, settings.seed))
    _, state, tag = consolidated_state_dict(plan.run_dir, plan.tag)
    trained = _model(plan, groups, state)
    sites = node_sites(trained, settings.nodes)
    search = dict(lambdas=settings.lambdas, steps=settings.steps, lr=settings.lr, ablation=settings.ablation)
    from_full = settings.target_loss is None
    target = settings.target_loss
    if from_full:
        target = evaluate(trained, NodeMasker([], {}), data, None)[0] + DEFAULT_TARGET_MARGIN
    result = {
        "task": settings.task,
        "run": plan.run_dir,
        "checkpoint": tag,
        "examples": data.num_examples,
        "classes": moved[0].num_classes if moved else 0,
        "target_loss": round(target, 6),
        "target_rule": (f"trained full task loss + {DEFAULT_TARGET_MARGIN}" if from_full else "--target-loss"),
        "nodes_total": total_nodes(sites),
        "settings": {"batches": plan.batches, "steps": settings.steps, "lr": settings.lr,
                     "lambdas": list(settings.lambdas), "nodes": list(settings.nodes),
                     "ablation": settings.ablation, "seed": settings.seed},
        "edges_total": circuit_edges(trained, None),
    }
    result["trained"] = prune(trained, sites, data, target, **search)
    init = _model(plan, groups, None)
    result["init"] = prune(init, node_sites(init, settings.nodes), data, target, **search)
    result["random_labels"] = prune(trained, sites, nonsense, target, **search)
    # Edges between the kept nodes (tti_dist.eval.circuit_edges): where weight sparsity shows.
    for entry, model in (("trained", trained), ("init", init), ("random_labels", trained)):
        result[entry]["edges_kept"] = circuit_edges(model, result[entry]["kept"])
    return result
