"""Pareto frontiers of validation loss against interpretability, and the interpretability tax.

Definitions (docs/report.md has the long form; o is the oriented metric of
tti_dist/report/interp_metrics.py, higher = more interpretable):

- Pareto frontier: trial i is dominated when some trial j is no worse in both objectives
  (o_j >= o_i and L_j <= L_i) and strictly better in one (o_j > o_i or L_j < L_i), with L the
  validation loss `eval/loss`; the frontier is the set of trials nobody dominates.
- Target level: o* = min over (size, seed) of max_i o_i over that seed's trials of that size,
  the most interpretable level every size reaches with every seed (or the user's target).
- Tax at matched interpretability, per size s and seed r:
      tax(s, r) = L_F(s, r)(o*) - L_base(s, r),
  L_F(o*) the loss of the (s, r) frontier linearly interpolated at o* (sorted by o; the loss
  of the cheapest frontier point when it already reaches o*), L_base the loss of the seed's
  baseline trial (all regularizer coefficients 0, no architectural sparsity). Reported per size: mean over seeds and the
  sample standard deviation (ddof=1; 0 with one seed).
- Noise floor, per size over its n seeds (tti_dist/report/noise.py): SE = sd / sqrt(n) of the
  paired per-seed taxes; the tax is distinguishable from zero when n >= 2 and
  |mean| > t(0.975, n-1) SE (Student's t, two-sided 95%);
  beside it the baselines' own spread, sd over seeds (ddof=1) of L_base(s, r).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from tti_dist.errors import ConfigError
from tti_dist.report.interp_metrics import METRIC_DIRECTIONS, metric_direction, width_independent
from tti_dist.report.noise import seed_spread, tax_noise

logger = logging.getLogger(__name__)

LOSS = "eval/loss"
"""The capability axis of every frontier: validation loss (nats/token), lower is better."""


def pareto_frontier(points, direction: str) -> list[int]:
    """Indices of the non-dominated points, in order of increasing loss (ties: by index).

    points: (metric value, loss) pairs; direction: "lower" or "higher" (is better) for the
    metric; loss is always minimized. Point i is dominated when another point j is no worse in
    both (m_j no worse than m_i in `direction`, L_j <= L_i) and strictly better in one.
    Identical points do not dominate each other, so all copies stay on the frontier. Points
    with a NaN or missing coordinate are left out.
    """
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', got {direction!r}")
    sign = 1.0 if direction == "higher" else -1.0
    arr = np.array([[np.nan if v is None else float(v) for v in p] for p in points], dtype=float).reshape(-1, 2)
    valid = np.flatnonzero(np.isfinite(arr).all(axis=1))
    o, loss = sign * arr[valid, 0], arr[valid, 1]
    no_worse = (o[None, :] >= o[:, None]) & (loss[None, :] <= loss[:, None])  # [i, j]: j no worse than i
    better = (o[None, :] > o[:, None]) | (loss[None, :] < loss[:, None])
    keep = ~(no_worse & better).any(axis=1)
    front = valid[keep]
    return [int(i) for i in sorted(front, key=lambda i: (arr[i, 1], i))]


def frontier_loss_at(oriented, losses, level: float) -> float:
    """L_F(level): the loss of the Pareto frontier of (o, L) points linearly interpolated at o = level.

    o is the oriented metric (higher = more interpretable). Along the frontier sorted by o
    (loss rises with o), the two frontier points around `level` are interpolated; when the
    cheapest frontier point already has o >= level its loss is the answer (the lowest loss
    among points reaching the level); NaN when no point reaches it.
    """
    idx = pareto_frontier(list(zip(oriented, losses)), "higher")
    if not idx:
        return math.nan
    o = np.array([oriented[i] for i in idx], dtype=float)
    loss = np.array([losses[i] for i in idx], dtype=float)
    order = np.argsort(o, kind="stable")
    o, loss = o[order], loss[order]
    if level > o[-1]:
        return math.nan
    return float(np.interp(level, o, loss))  # left of o[0]: loss[0], the cheapest point


def size_key(row: dict):
    """The model size of a trials-table row (None: the sweep has no model_size axis)."""
    return row.get("model_size")


def size_label(size) -> str:
    """A model size as shown in tables, plots and file names ("default" for None)."""
    return "default" if size is None else str(size)


def completed_trials(table: pa.Table) -> list[dict]:
    """Completed trials with a finite validation loss (the only ones plots and the tax use)."""
    if LOSS not in table.column_names:
        return []
    return [r for r in table.to_pylist()
            if r["status"] == "completed" and r[LOSS] is not None and math.isfinite(r[LOSS])]


def model_sizes(rows: list[dict]) -> list:
    """Model sizes in order of parameter count (median over their trials), then name."""
    params: dict = {}
    for r in rows:
        params.setdefault(size_key(r), []).append(r["num_params"])

    def order(size):
        values = [p for p in params[size] if p is not None]
        return (float(np.median(values)) if values else math.inf, size_label(size))

    return sorted(params, key=order)


def baseline_losses(rows: list[dict]) -> dict:
    """L_base(s, r) of completed trials: {size: {seed: loss}}, the lowest loss among the
    baseline trials (all coefficients 0, no architectural sparsity) of each size and seed, seeds in ascending order."""
    out: dict = {}
    for r in sorted((r for r in rows if r["baseline"]), key=lambda r: (r["seed"] is None, r["seed"] or 0)):
        seeds = out.setdefault(size_key(r), {})
        seeds[r["seed"]] = min(seeds.get(r["seed"], math.inf), r[LOSS])
    return out


def _size_params(rows: list[dict], size) -> int | None:
    values = [r["num_params"] for r in rows if size_key(r) == size and r["num_params"] is not None]
    return int(np.median(values)) if values else None


def interpretability_tax(table: pa.Table, metric: str, target: float | None = None) -> dict:
    """The loss cost of reaching interpretability level m* on `metric`, per model size.

    With o = m ("higher" metrics) or o = -m ("lower" ones), per size s and seed r over the
    completed trials of (s, r) with a finite loss and metric:

        o*        = min over (s, r) of max_i o_i      (or the oriented `target`)
        tax(s, r) = L_F(s, r)(o*) - L_base(s, r)

    L_F is `frontier_loss_at` on the (s, r) trials' frontier; L_base the loss of the (s, r)
    baseline trial (coefficients all 0, no architectural sparsity; the lowest loss when there are several). Only (s, r)
    with a baseline count; with a `target`, seeds whose frontier does not reach it are left
    out. Per size: mean and sample standard deviation (ddof=1; 0 for one seed) over seeds,
    and the noise floor of tti_dist/report/noise.py: SE = std / sqrt(n), t_crit =
    t(0.975, n - 1), the verdict (n >= 2 and |mean| > t_crit SE: distinguishable from zero),
    and the baselines' own seed spread.

    Returns {"metric", "direction", "m_star" (in the metric's units), "rows": [{"size",
    "num_params", "mean", "std", "seeds", "per_seed": {seed: tax}, "se", "t_crit" (NaN for
    fewer than 2 seeds), "verdict", "distinguishable" (None for fewer than 2 seeds),
    "baseline_sd", "baseline_mean", "baseline_seeds"}], "notes": [str], "warnings": [str] (a
    width-dependent metric compared across sizes)}.
    """
    direction = metric_direction(metric)
    if direction is None:
        raise ConfigError(f"--metric: '{metric}' has no known direction; interpretability metrics are "
                          f"interp/<site>/<{'|'.join(METRIC_DIRECTIONS)}|probe_*>")
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target: {target} must be a finite number")
    sign = 1.0 if direction == "higher" else -1.0
    rows = completed_trials(table)
    notes: list[str] = []
    warnings: list[str] = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((size_key(r), r["seed"]), []).append(r)
    usable: dict = {}
    for (size, seed), trials in groups.items():
        base = [r[LOSS] for r in trials if r["baseline"]]
        points = [(sign * r[metric], r[LOSS]) for r in trials if r.get(metric) is not None and math.isfinite(r[metric])]
        if not base:
            notes.append(f"size {size_label(size)} seed {seed}: no completed baseline trial; left out of the tax")
            continue
        if not points:
            notes.append(f"size {size_label(size)} seed {seed}: no trial with {metric}; left out of the tax")
            continue
        if len(base) > 1:
            notes.append(f"size {size_label(size)} seed {seed}: {len(base)} baseline trials; "
                         "the lowest loss is the baseline")
        usable[(size, seed)] = (min(base), points)
    if len({size for size, _ in usable}) > 1 and not width_independent(metric):
        warnings.append(f"{metric} depends on the model's width (docs/evaluation.md, \"Width and sample size\"), "
                     "so one level of it means different things at different sizes; prefer a width-independent "
                     "metric (l0_frac, gaussian_tc_per_unit_bc, mono_share, mig_hist20, probe_k*)")
    if target is not None:
        o_star = sign * float(target)
    elif usable:
        o_star = min(max(o for o, _ in points) for _, points in usable.values())
    else:
        o_star = math.nan
    baselines = baseline_losses(rows)
    out_rows = []
    for size in model_sizes(rows):
        per_seed = {}
        for (s, seed), (base_loss, points) in sorted(usable.items(), key=lambda kv: (kv[0][1] is None, kv[0][1])):
            if s != size:
                continue
            lf = frontier_loss_at([p[0] for p in points], [p[1] for p in points], o_star)
            if math.isnan(lf):
                best = sign * max(p[0] for p in points)
                notes.append(f"size {size_label(size)} seed {seed}: best {metric} {best:.4g} does not reach "
                             f"{sign * o_star:.4g}; left out of the tax")
                continue
            per_seed[seed] = lf - base_loss
        if not any(s == size for s, _ in usable):
            continue
        values = np.array(list(per_seed.values()), dtype=float)
        spread = seed_spread(baselines.get(size, {}))
        out_rows.append({
            "size": size, "num_params": _size_params(rows, size),
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else math.nan),
            "seeds": int(values.size), "per_seed": per_seed, **tax_noise(per_seed),
            "baseline_sd": spread["sd"], "baseline_mean": spread["mean"], "baseline_seeds": spread["n"],
        })
    for note in notes:
        logger.info("tax on %s: %s", metric, note)
    for warning in warnings:
        logger.warning("tax on %s: %s", metric, warning)
    return {"metric": metric, "direction": direction, "m_star": sign * o_star, "rows": out_rows, "notes": notes,
            "warnings": warnings}
