"""`tti circuit RUN --task TASK [--checkpoint STEP] [--batches B] [--steps S] [--lr LR]
[--lambdas L,...] [--target-loss X] [--nodes mlp,attn,resid] [--ablation mean|zero] [--seed S]
[--out FILE]`: circuit size by pruning (Gao et al. 2025), for the trained model and its two
controls (the model at initialisation, the random-label task); docs/circuits.md.

prepare_circuit checks the options, the run, its checkpoint and its data (the synthetic
corpus) in this process; then one rank (TP=1, the checkpoint consolidated) runs the search
(tti_dist.eval.circuit_run.run_circuit). The result is printed as JSON and written to --out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from tti_dist.commands.ranks import run_in_rank_sessions
from tti_dist.errors import ConfigError
from tti_dist.eval.circuit_plan import CircuitSettings, prepare_circuit
from tti_dist.utils.atomic_file import write_text_atomic


def _floats(text: str, field: str) -> tuple[float, ...]:
    """A comma list of numbers, or a one-line ConfigError naming `field`."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{field}: {text!r} is not a comma list of numbers") from None


def settings_from_args(args: argparse.Namespace) -> CircuitSettings:
    """The command line's options as CircuitSettings (checked by prepare_circuit)."""
    extra = {}
    if args.lambdas is not None:
        extra["lambdas"] = _floats(args.lambdas, "--lambdas")
    return CircuitSettings(task=args.task, steps=args.steps, lr=args.lr, target_loss=args.target_loss,
                           nodes=tuple(n.strip() for n in args.nodes.split(",")), ablation=args.ablation,
                           seed=args.seed, **extra)


def main(args: argparse.Namespace) -> int:
    plan, settings, layout = prepare_circuit(args.run_dir, settings_from_args(args), checkpoint=args.checkpoint,
                                             batches=args.batches)
    # lazy: megatron-core and the model load only after the input was checked
    from tti_dist.eval.circuit_run import run_circuit

    # One process at TP=1 (the checkpoint is consolidated); every expert on it (EP = 1).
    ep_size = 1 if plan.cfg.model.moe_num_experts else None
    results, code = run_in_rank_sessions("circuit", 1, plan.cfg, 1, ep_size, run_circuit, plan, settings, layout)
    if code is not None:
        return code
    # Indented, with each list of numbers (the kept nodes of a site) on one line.
    text = re.sub(r"\[[-\d.,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), json.dumps(results[0], indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0
