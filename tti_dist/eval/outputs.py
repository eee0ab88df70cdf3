"""What `tti eval` writes: the metrics of one checkpoint as files, and a short summary.

Outputs under RUN/eval/: <STEP>.parquet (one row: step, tokens, one column per tag) and
<STEP>.json, tb/ (TensorBoard scalars and histograms at the checkpoint's step), and the
summary <STEP>.md, also written as summary.md (the latest evaluation).

The metrics themselves (every tag and formula): tti_dist/eval/metrics.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.tensorboard import SummaryWriter

from tti_dist.eval.metrics import SPARSE_PROBE_KS
from tti_dist.rundir import TENSORBOARD_DIR

logger = logging.getLogger(__name__)


def write_outputs(plan, scalars: dict[str, float], histograms: dict[str, np.ndarray]) -> None:
    """RUN/eval/<STEP>.{parquet,json,md}, summary.md and tb/ (files written atomically)."""
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = max(plan.step, 0)
    cfg = plan.cfg
    tokens = step * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.dp_size * cfg.data.seq_len
    columns = {"step": [step], "tokens": [tokens]}
    columns.update({k: [float(v)] for k, v in sorted(scalars.items())})
    name = plan.out_name
    tmp = out / f".{name}.parquet.tmp"
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, out / f"{name}.parquet")
    with SummaryWriter(str(out / TENSORBOARD_DIR)) as writer:
        for k, v in sorted(scalars.items()):
            writer.add_scalar(k, float(v), step)
        for k, v in sorted(histograms.items()):
            writer.add_histogram(k, v, step)
    text = summary_markdown(plan, scalars)
    for target in (f"{name}.md", "summary.md"):  # summary.md: the latest evaluation
        tmp = out / f".{target}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / target)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps({k: float(v) for k, v in sorted(scalars.items())}, indent=1) + "\n")
    os.replace(tmp, out / f"{name}.json")
    logger.info("wrote %s/%s.{parquet,json,md}, summary.md and tb/", out, name)


def summary_markdown(plan, scalars: dict[str, float]) -> str:
    """A short human-readable summary: capability, then per-site headline metrics."""
    lines = [f"# tti eval: {plan.run_dir} @ {plan.tag}", "", "## Capability", "",
             "| data | loss (nats/token) | perplexity |", "|---|---|---|"]
    for name, _ in plan.datasets:
        prefix = "eval/" if name == "val" else f"eval/{name}/"
        lines.append(f"| {name} | {scalars[prefix + 'loss']:.4f} | {scalars[prefix + 'ppl']:.3f} |")
    sites = sorted({k.split("/")[1] for k in scalars if k.startswith("interp/")})
    cols = ("l0", "l0_frac", "dead_frac", "dense_10pct_frac", "gaussian_tc_per_unit_bc", "mig_hist20", "mono_share",
            "mean_sq_cos_rel")
    lines += ["", "## Interpretability (per site)", "", "| site | " + " | ".join(cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for site in sites:
        vals = [scalars.get(f"interp/{site}/{c}") for c in cols]
        lines.append(f"| {site} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals) + " |")
    probes = sorted(k for k in scalars if k.startswith("interp/") and "/probe_" in k and not k.endswith("_chance")
                    and "/probe_k" not in k)
    if probes:
        lines += ["", "## Linear probes (accuracy / chance)", "", "| site | factor | accuracy | chance | k=1 | k=2 | k=5 |",
                  "|---|---|---|---|---|---|---|"]
        for k in probes:
            site, factor = k.split("/")[1], k.rsplit("/probe_", 1)[1]
            base = f"interp/{site}/"
            ks = [scalars.get(f"{base}probe_k{j}_{factor}") for j in SPARSE_PROBE_KS]
            lines.append(f"| {site} | {factor} | {scalars[k]:.3f} | {scalars[base + 'probe_' + factor + '_chance']:.3f} | "
                         + " | ".join("" if v is None else f"{v:.3f}" for v in ks) + " |")
    moe = sorted(k for k in scalars if k.startswith("moe/"))
    if moe:
        lines += ["", "## MoE routing", ""] + [f"- `{k}`: {scalars[k]:.4f}" for k in moe]
    lines += ["", "Every tag is in the .parquet/.json next to this file and in TensorBoard (RUN/eval/tb).", ""]
    return "\n".join(lines)
