"""`tti eval RUN [--checkpoint STEP] [--data DIR ...] [--weights FILE] [--nproc P] [--batches B]
[--max-tokens N]`: score a checkpoint on capability and interpretability metrics.

prepare_eval checks the run, checkpoint, datasets and options in this process; then each
rank evaluates (tti_dist.eval.evaluate.run_eval) and rank 0 writes RUN/eval/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tti_dist.commands.ranks import run_in_rank_sessions
from tti_dist.eval.plan import prepare_eval


def main(args: argparse.Namespace) -> int:
    plan = prepare_eval(args.run_dir, checkpoint=args.checkpoint, data=args.data, weights=args.weights,
                        nproc=args.nproc, batches=args.batches, max_tokens=args.max_tokens)
    # lazy: megatron-core and the model load only after the input was checked
    from tti_dist.eval.evaluate import run_eval

    # Every rank holds every expert (the layout merges expert-parallel shards): EP = 1.
    ep_size = 1 if plan.cfg.model.moe_num_experts else None
    results, code = run_in_rank_sessions("eval", plan.nproc, plan.cfg, plan.nproc, ep_size, run_eval, plan)
    if code is not None:
        return code
    print((Path(plan.out_dir) / f"{plan.out_name}.md").read_text(), end="")
    print(f"wrote {plan.out_dir}/{plan.out_name}.parquet, {plan.out_name}.json, {plan.out_name}.md, summary.md and tb/")
    return 0
