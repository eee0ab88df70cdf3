"""The metrics `tti eval` reports, from full-width activations on one rank, and its outputs.

Tags (docs/evaluation.md has every formula):

    eval/loss, eval/ppl                      the run's validation split (eval/<name>/* for --data)
    interp/<site>/l0, l0_frac, num_units, dead_frac, dense_1pct_frac, dense_10pct_frac,
                  gaussian_tc_per_unit_bc, gaussian_tc_num_units
                                             every float hookpoint (activation statistics)
    interp/<site>/log10_density              TensorBoard histogram of the units' firing densities
    interp/blocks.{i}.mlp.fc1/mean_abs_cos, max_abs_cos, mean_sq_cos_rel   (and .fc2): neuron directions
    interp/<site>/probe_<factor>, probe_<factor>_chance, probe_k{1,2,5}_<factor>
                                             linear / k-sparse probes (probe sites)
    interp/<site>/mig_hist20, mig_ksg, mono_mean, mono_share
                                             MIG (two estimators) and per-unit monosemanticity (unit sites)
    moe/blocks.{i}/*                         MoE routing (tti_dist/metrics/routing_probe.py)

Which tags compare across model widths and eval sizes: docs/evaluation.md, "Width and
sample size".

Outputs under RUN/eval/: <STEP>.parquet (one row: step, tokens, one column per tag) and
<STEP>.json, tb/ (TensorBoard scalars and histograms at the checkpoint's step), and the
summary <STEP>.md, also written as summary.md (the latest evaluation).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SPARSE_PROBE_KS = (1, 2, 5)
MONOSEMANTIC_THRESHOLD = 0.5
KSG_MAX_TOKENS = 2048
"""Tokens (a seeded subsample) for the k-nearest-neighbour MI estimator: O(N log N) per unit."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def compute_metrics(plan, acts: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                    weights: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalars, histograms of log10 density) for the collected activations."""
    from tti_dist.metrics.activation_stats import (dead_and_dense, direction_cosines, gaussian_tc_per_unit, l0,
                                                   unit_density)

    scalars: dict[str, float] = {}
    histograms: dict[str, np.ndarray] = {}
    factors = {k.removeprefix("factor_"): v.numpy() for k, v in labels.items() if k.startswith("factor_")}
    for site, a in acts.items():
        x = a.numpy()
        prefix = f"interp/{site}/"
        density = unit_density(x)
        scalars[prefix + "l0"] = float(l0(x))
        scalars[prefix + "l0_frac"] = scalars[prefix + "l0"] / x.shape[1] if x.shape[1] else float("nan")
        scalars.update({prefix + k: float(v) for k, v in dead_and_dense(density).items()})
        tc = gaussian_tc_per_unit(x)
        scalars[prefix + "gaussian_tc_per_unit_bc"] = float(tc["tc_per_unit"])
        scalars[prefix + "gaussian_tc_num_units"] = float(tc["num_units_used"])
        histograms[prefix + "log10_density"] = np.log10(np.clip(density, 1e-6, None))
        if factors and _matches(site, plan.probe_sites):
            scalars.update(_probe_metrics(prefix, x, factors))
        if factors and _matches(site, plan.unit_sites):
            scalars.update(_unit_metrics(prefix, x, factors))
    for name, w in weights.items():
        cos = direction_cosines(w.numpy())
        scalars[f"interp/{name}/mean_abs_cos"] = float(cos["mean_abs_cos"])
        scalars[f"interp/{name}/max_abs_cos"] = float(cos["max_abs_cos"])
        scalars[f"interp/{name}/mean_sq_cos_rel"] = float(cos["mean_sq_cos_rel"])
    return scalars, histograms


def _probe_metrics(prefix: str, x: np.ndarray, factors: dict[str, np.ndarray]) -> dict[str, float]:
    from tti_dist.metrics.probes import linear_probe, sparse_probe, train_test_split_indices

    out = {}
    for name, y in factors.items():
        defined = y >= 0
        xs, ys = x[defined], y[defined]
        if len(np.unique(ys)) < 2 or len(ys) < 20:
            continue
        train, test = train_test_split_indices(len(ys), test_fraction=0.3, seed=0)
        full = linear_probe(xs[train], ys[train], xs[test], ys[test])
        out[f"{prefix}probe_{name}"] = float(full["accuracy"])
        out[f"{prefix}probe_{name}_chance"] = float(full["chance"])
        for k in SPARSE_PROBE_KS:
            if k <= x.shape[1]:
                out[f"{prefix}probe_k{k}_{name}"] = float(sparse_probe(xs[train], ys[train], xs[test], ys[test], k)["accuracy"])
    return out


def _unit_metrics(prefix: str, x: np.ndarray, factors: dict[str, np.ndarray]) -> dict[str, float]:
    from tti_dist.metrics.disentanglement import mig, monosemanticity

    out = {}
    hist = mig(x, factors, estimator="histogram", num_bins=20)
    out[prefix + "mig_hist20"] = float(hist["mig"])
    ksg = mig(x, factors, estimator="ksg", max_tokens=KSG_MAX_TOKENS, seed=0)
    out[prefix + "mig_ksg"] = float(ksg["mig"])
    mono = monosemanticity(x, factors, num_bins=20, threshold=MONOSEMANTIC_THRESHOLD)
    live_scores = np.asarray(mono["per_unit_score"])[np.asarray(mono["per_unit_live"], dtype=bool)]
    # Mean over live units (dead ones score 0 and would pull it down by dead_frac).
    out[prefix + "mono_mean"] = float(live_scores.mean()) if live_scores.size else float("nan")
    out[prefix + "mono_share"] = float(mono["share_above"])
    return out


def write_outputs(plan, scalars: dict[str, float], histograms: dict[str, np.ndarray]) -> None:
    """RUN/eval/<STEP>.{parquet,json,md}, summary.md and tb/ (files written atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.tensorboard import SummaryWriter

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
    with SummaryWriter(str(out / "tb")) as writer:
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
