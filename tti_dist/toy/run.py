"""`tti toy`: train a toy-model sparsity sweep and write its run directory.

RUN/
  toy.parquet          one row per (instance, feature); columns in `TABLE_COLUMNS`
  summary.json         per-sparsity numbers (represented features, D*, fraction shares, loss)
  config.yaml          the resolved ToyConfig
  figures/wtw.png      W^T W per sparsity (tti_dist.toy.figures.plot_wtw)
  figures/dimensionality.png   D_i and D* vs 1/(1-S) (plot_dimensionality)
  figures/dimensionality_clusters.png   D_i vs 1/(1-S) beside their histogram, with the
                       fraction lines (plot_dimensionality_clusters)

Nothing is written before training ends, and every file is written to a temporary name and
renamed, so an interrupted run leaves no half-written outputs. An existing RUN/toy.parquet is
only replaced with `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from tti_dist.errors import ConfigError
from tti_dist.toy import metrics as M
from tti_dist.toy.config import ToyConfig, load_toy_config, toy_config_to_dict
from tti_dist.toy.figures import plot_dimensionality, plot_dimensionality_clusters, plot_wtw
from tti_dist.toy.model import ToyResult, train_toy

logger = logging.getLogger(__name__)

TABLE_FILE = "toy.parquet"
PHASE_TABLE_FILE = "phase.parquet"
"""The table of a phase_diagram run (tti_dist.toy.phase_run)."""
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
WTW_FIGURE = "figures/wtw.png"
DIMENSIONALITY_FIGURE = "figures/dimensionality.png"
CLUSTERS_FIGURE = "figures/dimensionality_clusters.png"
FRACTION_TOLERANCE = 0.02
"""A D_i counts as "at" a fraction when within this distance of it (fractions are >= 0.025 apart)."""

TABLE_COLUMNS = {
    "sparsity": "S of the instance",
    "instance": "instance index in the batched program",
    "repeat": "repeat index within the sparsity",
    "feature": "feature index i (importance decreases with i)",
    "importance": "I_i = importance_decay ** i",
    "norm": "||W_i||",
    "D_i": "feature dimensionality ||W_i||^2 / sum_j (W_i_hat . W_j)^2 (0 for a zero column)",
    "superposition": "sum_{j != i} (W_i_hat . W_j)^2",
    "represented": "||W_i|| > represented_threshold",
    "fraction": "label of the nearest of 1, 3/4, 2/3, 1/2, 2/5, 3/8, 0",
    "fraction_distance": "|D_i - that fraction|",
    "bias": "b_i",
    "w": "the column W_i (m floats)",
    "D_star": "per instance: m / ||W||_F^2",
    "num_represented": "per instance: features with ||W_i|| > represented_threshold",
    "max_abs_cos": "per instance: max |cos(W_i, W_j)| over pairs of represented features",
    "loss": "per instance: final importance-weighted MSE on a fresh batch",
}
"""Columns of toy.parquet and their meaning (per-instance values repeat on each feature row)."""


def prepare_toy(config: str | Path | None, overrides: list[str], run_dir: str | Path,
                overwrite: bool = False) -> tuple[ToyConfig, Path]:
    """Load and validate the config and check the run directory; writes nothing."""
    cfg = load_toy_config(config, overrides)
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--run-dir: '{run}' exists and is not a directory")
    for table in (TABLE_FILE, PHASE_TABLE_FILE):  # either experiment's outputs
        if (run / table).exists() and not overwrite:
            raise ConfigError(f"--run-dir: '{run}' already holds {table}; pass --overwrite to replace it "
                              "or choose another directory")
    return cfg, run


def analyse(result: ToyResult, cfg: ToyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(table columns, summary) of a trained sweep; metrics computed in float64."""
    W = result.W.double()
    num, m, n = W.shape
    norms = M.feature_norms(W)
    D = M.feature_dimensionality(W)
    sup = M.superposition(W)
    d_star = M.dimensions_per_feature(W)
    represented = norms > cfg.represented_threshold
    count = represented.sum(dim=-1)
    max_cos = M.max_abs_cosine(W, represented)
    best, dist = M.nearest_fraction(D)
    labels = [label for label, _ in M.FRACTIONS]

    def per_row(values) -> np.ndarray:
        return np.repeat(np.asarray(values), n)

    table = {
        "sparsity": per_row(result.sparsity).astype(np.float64),
        "instance": per_row(np.arange(num)).astype(np.int32),
        "repeat": per_row(result.repeat).astype(np.int32),
        "feature": np.tile(np.arange(n), num).astype(np.int32),
        "importance": np.tile(result.importance.double().numpy(), num),
        "norm": norms.reshape(-1).numpy(),
        "D_i": D.reshape(-1).numpy(),
        "superposition": sup.reshape(-1).numpy(),
        "represented": represented.reshape(-1).numpy(),
        "fraction": np.array([labels[k] for k in best.reshape(-1).tolist()]),
        "fraction_distance": dist.reshape(-1).numpy(),
        "bias": result.b.double().reshape(-1).numpy(),
        "w": result.W.transpose(1, 2).reshape(num * n, m).numpy(),
        "D_star": per_row(d_star.numpy()),
        "num_represented": per_row(count.numpy()).astype(np.int32),
        "max_abs_cos": per_row(max_cos.numpy()),
        "loss": per_row(result.loss.double().numpy()),
    }
    for name, value in result.penalties.items():
        table[f"penalty_{name}"] = per_row(value.double().numpy())

    sparsity = torch.tensor(result.sparsity, dtype=torch.float64)
    groups = []
    for s in cfg.sparsities:
        idx = (sparsity == s).nonzero().reshape(-1)
        rep_D = D[idx][represented[idx]]
        groups.append({
            "sparsity": s,
            "inverse_density": 1.0 / (1.0 - s),
            "num_represented": count[idx].tolist(),
            "D_star": [d if np.isfinite(d) else None for d in d_star[idx].tolist()],  # None: W = 0
            "max_abs_cos_represented": max_cos[idx].tolist(),
            "mean_D_represented": float(rep_D.mean()) if rep_D.numel() else 0.0,
            "fraction_shares": M.fraction_shares(rep_D, FRACTION_TOLERANCE),
            "loss": result.loss[idx].tolist(),
        })
    summary = {
        "num_features": n,
        "num_hidden": m,
        "num_instances": num,
        "train_seconds": round(result.seconds, 3),
        "fraction_tolerance": FRACTION_TOLERANCE,
        "fraction_shares_all_represented": M.fraction_shares(D[represented], FRACTION_TOLERANCE),
        "by_sparsity": groups,
    }
    return table, summary


def write_outputs(run_dir: Path, cfg: ToyConfig, result: ToyResult, table: dict[str, Any],
                  summary: dict[str, Any]) -> list[Path]:
    """Write the table, summary, config and figures into run_dir (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = {}
    for name, values in table.items():
        if name == "w":
            columns[name] = pa.array(list(values.astype(np.float32)), type=pa.list_(pa.float32()))
        else:
            columns[name] = pa.array(values)
    written = []
    out = run_dir / TABLE_FILE
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(out)
    written.append(out)
    written.append(write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n"))
    written.append(write_text(run_dir / CONFIG_FILE,
                               yaml.safe_dump(toy_config_to_dict(cfg), sort_keys=False, default_flow_style=None)))
    W = result.W.double().numpy()
    written.append(plot_wtw(W, result.sparsity, result.repeat,
                            np.asarray(table["superposition"]).reshape(W.shape[0], W.shape[2]),
                            run_dir / WTW_FIGURE))
    instance_rows = slice(0, None, W.shape[2])
    written.append(plot_dimensionality(table["sparsity"], table["D_i"], table["represented"],
                                       table["D_star"][instance_rows], table["sparsity"][instance_rows],
                                       run_dir / DIMENSIONALITY_FIGURE, M.FRACTIONS))
    written.append(plot_dimensionality_clusters(table["sparsity"], table["D_i"], table["represented"],
                                                run_dir / CLUSTERS_FIGURE, M.FRACTIONS))
    return written


def write_text(path: Path, text: str) -> Path:
    """Write `text` to a temporary name beside `path`, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def run_toy(cfg: ToyConfig, run_dir: Path) -> dict[str, Any]:
    """Train the sweep, write RUN, return the summary (a phase_diagram runs in tti_dist.toy.phase_run)."""
    if cfg.experiment != "sparsity_sweep":
        raise ValueError(f"run_toy runs experiment 'sparsity_sweep', not {cfg.experiment!r}")
    logger.info("toy sweep: %d instances (%d sparsities x %d), n=%d, m=%d, %d steps",
                cfg.num_instances, len(cfg.sparsities), cfg.instances_per_sparsity, cfg.num_features,
                cfg.num_hidden, cfg.steps)
    result = train_toy(cfg)
    table, summary = analyse(result, cfg)
    write_outputs(run_dir, cfg, result, table, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A small text table: per sparsity, represented features, D*, mean D_i, max |cos|, loss."""
    lines = [f"{'S':>7} {'1/(1-S)':>8} {'represented':>12} {'D*':>12} {'mean D_i':>9} {'max|cos|':>9} {'loss':>10}"]
    for g in summary["by_sparsity"]:
        rep = "/".join(str(c) for c in g["num_represented"])
        d_star = "/".join("inf" if d is None else f"{d:.2f}" for d in g["D_star"])
        cos = max(g["max_abs_cos_represented"])
        loss = sum(g["loss"]) / len(g["loss"])
        lines.append(f"{g['sparsity']:>7.4g} {g['inverse_density']:>8.3g} {rep:>12} {d_star:>12} "
                     f"{g['mean_D_represented']:>9.3f} {cos:>9.3f} {loss:>10.3e}")
    shares = summary["fraction_shares_all_represented"]
    text = ", ".join(f"{k}: {v:.0%}" for k, v in shares.items() if v > 0)
    lines.append(f"D_i of represented features within {summary['fraction_tolerance']} of a fraction: {text}")
    lines.append(f"trained {summary['num_instances']} instances in {summary['train_seconds']:.1f} s")
    return "\n".join(lines)
