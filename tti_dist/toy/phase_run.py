"""`tti toy` with `experiment: phase_diagram`: train the n = 2, m = 1 grid, keep the best restart
per cell, classify it, compare with the closed form, write the run directory.

Source: Elhage et al. 2022, "Toy Models of Superposition", section "Superposition as a Phase
Change" (phases and closed forms: tti_dist.toy.phase).

RUN/
  phase.parquet              one row per instance (cell x restart); columns in `PHASE_COLUMNS`
  summary.json               the grid axes, per-cell phase of the best restart, restart
                             agreement, the closed-form phase, counts
  config.yaml                the resolved ToyConfig
  figures/phase_diagram.png  empirical and closed-form phases over (r, 1 - S) (plot_phase_diagram)

As for the sparsity sweep, nothing is written before training ends and every file is written
to a temporary name and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from tti_dist.toy import phase as P
from tti_dist.toy.config import ToyConfig, toy_config_to_dict
from tti_dist.toy.figures import plot_phase_diagram
from tti_dist.toy.model import ToyResult, train_toy
from tti_dist.toy.run import CONFIG_FILE, PHASE_TABLE_FILE, SUMMARY_FILE, write_text

PHASE_FIGURE = "figures/phase_diagram.png"

PHASE_COLUMNS = {
    "sparsity": "S of the cell",
    "density": "1 - S",
    "relative_importance": "r, the importance of feature 2 (feature 1 has 1)",
    "instance": "instance index in the batched program",
    "restart": "restart index within the cell",
    "w1": "W[0, 0], feature 1's weight",
    "w2": "W[0, 1], feature 2's weight",
    "b1": "b_1",
    "b2": "b_2",
    "phase": "phase label of this restart (tti_dist.toy.phase.PHASES)",
    "expected_loss": "exact expected loss (quadrature), the criterion for the best restart",
    "sampled_loss": "loss on a fresh batch of eval_batch_size examples",
    "best": "whether this restart has the lowest expected_loss of its cell",
    "analytic_phase": "phase of the lowest closed-form configuration loss at this cell",
}
"""Columns of phase.parquet and their meaning."""


def importance_rows(cfg: ToyConfig) -> torch.Tensor:
    """The [num_instances, 2] importances [1, r] in instance order."""
    return torch.tensor([[1.0, r] for r in cfg.instance_relative_importances()], dtype=torch.float32)


def analyse_phase(result: ToyResult, cfg: ToyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(table columns, summary) of a trained phase grid; the best restart of each cell is the one
    with the lowest exact expected loss."""
    W, b = result.W.double(), result.b.double()
    num = W.shape[0]
    density = 1.0 - torch.tensor(result.sparsity, dtype=torch.float64)
    ratio = torch.tensor(cfg.instance_relative_importances(), dtype=torch.float64)
    importance = torch.stack([torch.ones_like(ratio), ratio], dim=-1)
    loss = P.expected_loss(W, b, importance, density)
    code = P.classify_phase(W, b, cfg.represented_threshold)
    k = cfg.instances_per_sparsity
    cells = num // k
    best_in_cell = loss.reshape(cells, k).argmin(dim=-1)  # restarts are innermost
    best = torch.zeros(num, dtype=torch.bool)
    best[torch.arange(cells) * k + best_in_cell] = True
    analytic = [P.analytic_phase(float(d), float(r)) for d, r in zip(density, ratio)]

    table = {
        "sparsity": np.asarray(result.sparsity, dtype=np.float64),
        "density": density.numpy(),
        "relative_importance": ratio.numpy(),
        "instance": np.arange(num, dtype=np.int32),
        "restart": np.asarray(result.repeat, dtype=np.int32),
        "w1": W[:, 0, 0].numpy(), "w2": W[:, 0, 1].numpy(),
        "b1": b[:, 0].numpy(), "b2": b[:, 1].numpy(),
        "phase": np.array([P.PHASES[c] for c in code.tolist()]),
        "expected_loss": loss.numpy(),
        "sampled_loss": result.loss.double().numpy(),
        "best": best.numpy(),
        "analytic_phase": np.array([P.PHASES[c] for c in analytic]),
    }

    shape = (len(cfg.sparsities), len(cfg.relative_importances))  # rows: sparsities, columns: r
    cell_code = code.reshape(cells, k)
    chosen = cell_code.gather(1, best_in_cell.unsqueeze(1)).squeeze(1)
    agreement = (cell_code == chosen.unsqueeze(1)).double().mean(dim=1)
    analytic_cell = torch.tensor(analytic[::k])
    match = chosen == analytic_cell
    best_loss = loss.reshape(cells, k).min(dim=-1).values
    counts = {name: int((chosen == c).sum()) for c, name in enumerate(P.PHASES)}
    summary = {
        "num_instances": num,
        "restarts": k,
        "train_seconds": round(result.seconds, 3),
        "represented_threshold": cfg.represented_threshold,
        "sparsities": list(cfg.sparsities),
        "densities": [1.0 - s for s in cfg.sparsities],
        "relative_importances": list(cfg.relative_importances),
        "phase": _labels(chosen, shape),
        "restart_agreement": agreement.reshape(shape).tolist(),
        "analytic_phase": _labels(analytic_cell, shape),
        "best_expected_loss": best_loss.reshape(shape).tolist(),
        "cells": cells,
        "phase_counts": counts,
        "cells_matching_analytic": int(match.sum()),
        "mismatches": [_mismatch(cfg, i, int(chosen[i]), int(analytic_cell[i]), float(best_loss[i]))
                       for i in (~match).nonzero().reshape(-1).tolist()],
        "restart_phase_counts": {name: int((code == c).sum()) for c, name in enumerate(P.PHASES)},
    }
    return table, summary


def _mismatch(cfg: ToyConfig, cell: int, chosen: int, analytic: int, loss: float) -> dict[str, Any]:
    """A cell whose trained phase differs from the closed form, with the trained loss beside the
    closed-form losses (a trained loss below all three shows the closed form's unit norms and
    zero bias are not optimal there)."""
    s = cfg.sparsities[cell // len(cfg.relative_importances)]
    r = cfg.relative_importances[cell % len(cfg.relative_importances)]
    return {"sparsity": s, "relative_importance": r, "phase": P.PHASES[chosen], "analytic_phase": P.PHASES[analytic],
            "expected_loss": loss, "closed_form_losses": P.configuration_losses(1.0 - s, r)}


def _labels(codes: torch.Tensor, shape: tuple[int, int]) -> list[list[str]]:
    return [[P.PHASES[c] for c in row] for row in codes.reshape(shape).tolist()]


def _codes(labels: list[list[str]]) -> np.ndarray:
    return np.array([[P.PHASES.index(x) for x in row] for row in labels])


def write_phase_outputs(run_dir: Path, cfg: ToyConfig, table: dict[str, Any], summary: dict[str, Any]) -> list[Path]:
    """Write phase.parquet, summary.json, config.yaml and the figure into run_dir (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / PHASE_TABLE_FILE
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.table({name: pa.array(values) for name, values in table.items()}), tmp)
    tmp.replace(out)
    written = [out, write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n"),
               write_text(run_dir / CONFIG_FILE,
                          yaml.safe_dump(toy_config_to_dict(cfg), sort_keys=False, default_flow_style=None))]
    densities, ratios = summary["densities"], summary["relative_importances"]
    order = np.ix_(np.argsort(densities), np.argsort(ratios))  # the figure wants both axes ascending
    r_line = np.geomspace(min(ratios) / 1.5, max(ratios) * 1.5, 200)
    written.append(plot_phase_diagram(
        density_edges=np.asarray(P.log_grid_edges(densities)), ratio_edges=np.asarray(P.log_grid_edges(ratios)),
        phase=_codes(summary["phase"])[order], analytic=_codes(summary["analytic_phase"])[order],
        labels=P.PHASES, boundary=(r_line, np.array([P.superposition_density(r) for r in r_line])),
        restarts=summary["restarts"], path=run_dir / PHASE_FIGURE))
    return written


def run_phase_diagram(cfg: ToyConfig, run_dir: Path) -> dict[str, Any]:
    """Train the grid, write RUN, return the summary."""
    result = train_toy(cfg, importance_rows(cfg))
    table, summary = analyse_phase(result, cfg)
    write_phase_outputs(run_dir, cfg, table, summary)
    return summary


def format_phase_summary(summary: dict[str, Any]) -> str:
    """The phase grid as text: one row per density (dense first), one letter per r
    (N not represented, D dedicated dimension, S superposition, O other; lower case where the
    closed form disagrees), then the counts."""
    letters = {"not represented": "N", "dedicated dimension": "D", "superposition": "S", "other": "O"}
    ratios = summary["relative_importances"]
    lines = ["1-S \\ r " + " ".join(f"{r:>5.3g}" for r in ratios)]
    for density, row, ana in zip(summary["densities"], summary["phase"], summary["analytic_phase"]):
        cells = [letters[p] if p == a else letters[p].lower() for p, a in zip(row, ana)]
        lines.append(f"{density:>7.3g} " + " ".join(f"{c:>5}" for c in cells))
    counts = ", ".join(f"{k}: {v}" for k, v in summary["phase_counts"].items())
    lines.append(f"cells: {counts}; {summary['cells_matching_analytic']}/{summary['cells']} match the closed form "
                 "(lower case: differs)")
    lines.append(f"trained {summary['num_instances']} instances ({summary['restarts']} restarts per cell) "
                 f"in {summary['train_seconds']:.1f} s")
    return "\n".join(lines)
