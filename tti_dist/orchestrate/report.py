"""`tti report DIR`: the summary table, Pareto frontiers and interpretability tax of a sweep.

Reads the records `tti sweep --out DIR` leaves, DIR/runs/<trial>/trial.json, and writes

    DIR/summary.parquet        one row per trial (`collect_trials`)
    DIR/plots/pareto_<size>.png  eval/loss against every interpretability metric, per model size
    DIR/plots/tax.png          interpretability tax against parameter count
    DIR/report.md              the tables behind the plots

Definitions (docs/report.md has the long form):

- Metric orientation: each interpretability metric has a direction (`METRIC_DIRECTIONS`);
  o = m for "higher is better" metrics and o = -m for "lower is better" ones, so higher o is
  always more interpretable.
- Width: the tax compares model sizes at one level o*, so its default (headline) metrics are
  width-independent ones (`width_independent`: l0_frac, gaussian_tc_per_unit_bc, mono_*,
  mig_hist20, k-sparse probes, ...; docs/evaluation.md, "Width and sample size"). A
  width-dependent metric (l0, mig_ksg, dense probes, |cos|) can still be chosen with
  --metric; the tax then notes that it depends on width.
- Pareto frontier: trial i is dominated when some trial j is no worse in both objectives
  (o_j >= o_i and L_j <= L_i) and strictly better in one (o_j > o_i or L_j < L_i), with L the
  validation loss `eval/loss`; the frontier is the set of trials nobody dominates.
- Target level: o* = min over (size, seed) of max_i o_i over that seed's trials of that size,
  the most interpretable level every size reaches with every seed (or the user's target).
- Tax at matched interpretability, per size s and seed r:
      tax(s, r) = L_F(s, r)(o*) - L_base(s, r),
  L_F(o*) the loss of the (s, r) frontier linearly interpolated at o* (sorted by o; the loss
  of the cheapest frontier point when it already reaches o*), L_base the loss of the seed's
  baseline trial (all regularizer coefficients 0). Reported per size: mean over seeds and the
  sample standard deviation (ddof=1; 0 with one seed).

No Ray import: the report only reads files, so it runs anywhere the sweep directory is.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

LOSS = "eval/loss"
"""The capability axis of every frontier: validation loss (nats/token), lower is better."""

METRIC_DIRECTIONS: dict[str, tuple[str, str]] = {
    # suffix of interp/<site>/<suffix>: (direction, why). Formulas: docs/evaluation.md.
    "l0": ("lower", "fewer active units per token: each token is explained by fewer units"),
    "l0_frac": ("lower", "l0 / num_units: the active share of the site's units, comparable across widths"),
    "dead_frac": ("lower", "dead units carry nothing to interpret and waste width"),
    "dense_1pct_frac": ("lower", "units firing on >1% of tokens respond to too much to be specific"),
    "dense_10pct_frac": ("lower", "units firing on >10% of tokens respond to too much to be specific"),
    "gaussian_tc_per_unit_bc": ("lower", "less redundancy (Gaussian total correlation per unit, bias-corrected) "
                                "between units"),
    "mean_abs_cos": ("lower", "neuron directions closer to orthogonal: less superposition"),
    "max_abs_cos": ("lower", "no pair of neurons shares a direction: less superposition"),
    "mean_sq_cos_rel": ("lower", "d * mean cos^2 of neuron directions (1 = random): less superposition"),
    "mono_mean": ("higher", "units' entropy explained by their best ground-truth factor"),
    "mono_share": ("higher", "more units respond to a single ground-truth factor"),
    "mig_hist20": ("higher", "each factor has one dedicated unit (MIG, binned MI)"),
    "mig_ksg": ("higher", "each factor has one dedicated unit (MIG, k-NN MI)"),
}
PROBE_DIRECTION = ("higher", "a ground-truth factor is (k-sparsely) linearly decodable from the site")
"""Every interp/<site>/probe_* metric except probe_<factor>_chance (a reference level, no direction)."""

WIDTH_INDEPENDENT = frozenset({
    "l0_frac", "dead_frac", "dense_1pct_frac", "dense_10pct_frac", "gaussian_tc_per_unit_bc", "mean_sq_cos_rel",
    "mono_mean", "mono_share", "mig_hist20",
})
"""Suffixes of the metrics that compare across model widths at a fixed eval size (plus the
k-sparse probes, probe_k<k>_<factor>). The others with a direction depend on the number of
units: l0 (a count), mean/max_abs_cos (random directions: sqrt(2/(pi d))), mig_ksg (the
second-best of more noisy estimates) and the dense probes (more weights, same tokens).
docs/evaluation.md, "Width and sample size", has the measurements."""

_SPARSE_PROBE = re.compile(r"^probe_k\d+_")
_BLOCK_L0_FRAC = re.compile(r"^interp/blocks\.(\d+)\.mlp\.act/l0_frac$")
HEADLINE_FALLBACK = ("mono_share", "mig_hist20", "gaussian_tc_per_unit_bc", "mono_mean")
"""Default headline suffixes, in order, when the trials have no l0_frac."""


def metric_direction(tag: str) -> str | None:
    """"lower" or "higher" (is more interpretable) for an `interp/<site>/<suffix>` tag, else None."""
    if not tag.startswith("interp/") or tag.count("/") < 2:
        return None
    suffix = tag.rsplit("/", 1)[1]
    if suffix in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[suffix][0]
    if suffix.startswith("probe_") and not suffix.endswith("_chance"):
        return PROBE_DIRECTION[0]
    return None


def metric_reason(tag: str) -> str:
    suffix = tag.rsplit("/", 1)[1]
    return METRIC_DIRECTIONS[suffix][1] if suffix in METRIC_DIRECTIONS else PROBE_DIRECTION[1]


def width_independent(tag: str) -> bool:
    """Whether an `interp/<site>/<suffix>` metric with a direction compares across model
    widths (`WIDTH_INDEPENDENT`, or a k-sparse probe)."""
    if metric_direction(tag) is None:
        return False
    suffix = tag.rsplit("/", 1)[1]
    return suffix in WIDTH_INDEPENDENT or bool(_SPARSE_PROBE.match(suffix))


# ---------------------------------------------------------------------------------------------
# Reading the sweep


def _number(value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def _axis_text(value) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


_BLOCK_SITE = re.compile(r"^interp/blocks\.(\d+)\.(.+)$")

LAST_BLOCK = "blocks.last"
"""Site prefix of the derived metrics of each trial's last block (models differ in depth)."""


def derived_metrics(final: dict) -> dict[str, float]:
    """Metrics that compare across model sizes, computed from a trial's final scalars:

    - interp/<site>/l0_frac = l0 / num_units (the share of the site's units active per token;
      l0 itself grows with width);
    - interp/blocks.last.<rest> = interp/blocks.<L>.<rest> for the trial's deepest block L
      (a 2-layer and a 4-layer model have no block index in common at the top)."""
    out: dict[str, float] = {}
    for tag, value in final.items():
        if tag.startswith("interp/") and tag.endswith("/l0"):
            units = final.get(tag[: -len("l0")] + "num_units")
            if isinstance(units, (int, float)) and units > 0 and isinstance(value, (int, float)):
                out[tag + "_frac"] = float(value) / float(units)
    merged = {**final, **out}
    blocks = [int(m.group(1)) for t in merged if (m := _BLOCK_SITE.match(t))]
    if blocks:
        last = max(blocks)
        for tag, value in merged.items():
            m = _BLOCK_SITE.match(tag)
            if m and int(m.group(1)) == last:
                out[f"interp/{LAST_BLOCK}.{m.group(2)}"] = value
    return out


def _read_trials(sweep_dir: str | Path) -> list[dict]:
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ConfigError(f"DIR: '{sweep_dir}' does not exist or is not a directory")
    files = sorted(root.glob("runs/*/trial.json"))
    if not files:
        raise ConfigError(f"DIR: '{sweep_dir}' holds no trials (no runs/*/trial.json); "
                          "is it a tti sweep --out directory?")
    records = []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: must hold a JSON object (a trial record), got {type(record).__name__}")
        record.setdefault("trial", path.parent.name)
        final = record.get("final")
        if isinstance(final, dict):
            record["final"] = {**final, **derived_metrics(final)}
        records.append(record)
    return records


def collect_trials(sweep_dir: str | Path) -> pa.Table:
    """One row per DIR/runs/*/trial.json (sorted by run directory).

    Columns: trial, model_size, setting (strings), seed, num_params, tokens (int64), status,
    error (strings), baseline (bool: every regularizer coefficient is 0, or there is none),
    `axis/<key>` for every sweep axis (the value as text: JSON for numbers and booleans),
    `coeff/<name>` for every regularizer coefficient, and every key of the trial's "final"
    scalars as a float64 column (`eval/loss`, `interp/<site>/<metric>`, ...). Values a trial
    lacks are null.
    """
    records = _read_trials(sweep_dir)
    axes = sorted({k for r in records for k in (r.get("axes") or {})})
    coeffs = sorted({k for r in records for k in (r.get("coefficients") or {})})
    finals = sorted({k for r in records for k in (r.get("final") or {})})
    columns: dict[str, list] = {k: [] for k in ("trial", "model_size", "setting", "seed", "num_params", "tokens",
                                                "status", "error", "baseline")}
    columns.update({f"axis/{k}": [] for k in axes})
    columns.update({f"coeff/{k}": [] for k in coeffs})
    columns.update({k: [] for k in finals})
    for r in records:
        c = r.get("coefficients") or {}
        a = r.get("axes") or {}
        f = r.get("final") or {}
        columns["trial"].append(str(r["trial"]))
        columns["model_size"].append(None if r.get("model_size") is None else str(r["model_size"]))
        columns["setting"].append(None if r.get("setting") is None else str(r["setting"]))
        for key in ("seed", "num_params", "tokens"):
            columns[key].append(_number(r.get(key), int))
        columns["status"].append(None if r.get("status") is None else str(r["status"]))
        columns["error"].append(None if r.get("error") is None else str(r["error"]))
        columns["baseline"].append(all(_number(v, float) == 0.0 for v in c.values()))
        for k in axes:
            columns[f"axis/{k}"].append(_axis_text(a.get(k)))
        for k in coeffs:
            columns[f"coeff/{k}"].append(_number(c.get(k), float))
        for k in finals:
            columns[k].append(_number(f.get(k), float))
    types = {"seed": pa.int64(), "num_params": pa.int64(), "tokens": pa.int64(), "baseline": pa.bool_()}
    fields = []
    for name in columns:
        if name in types:
            fields.append(pa.field(name, types[name]))
        elif name.startswith("coeff/") or name in finals:
            fields.append(pa.field(name, pa.float64()))
        else:
            fields.append(pa.field(name, pa.string()))
    return pa.table(columns, schema=pa.schema(fields))


def interp_metrics(table: pa.Table) -> list[str]:
    """The interpretability metrics of a trials table: `interp/*` columns with a known
    direction and at least one value, sorted."""
    return sorted(c for c in table.column_names
                  if metric_direction(c) is not None and table.column(c).null_count < table.num_rows)


def headline_metrics(available: list[str], metrics: list[str] | None = None) -> list[str]:
    """The metrics the trials table and the tax report on.

    Default, always a width-independent metric (the tax compares model sizes at one level of
    it): interp/blocks.last.mlp.act/l0_frac (the active share of the MLP units of each
    trial's deepest block: comparable across depths and widths), else
    interp/blocks.<i>.mlp.act/l0_frac with the highest i, else the first interp/*/l0_frac,
    else the first width-independent metric (`width_independent`), those of
    blocks.last.mlp.act first and the HEADLINE_FALLBACK suffixes in order first; [] when
    there is none (raw l0, mig_ksg, dense probes only: choose with --metric). `metrics`
    chooses; each must be one of `available`.
    """
    if metrics:
        for m in metrics:
            if m not in available:
                allowed = ", ".join(available) if available else "none (the trials hold no interp/* metrics)"
                raise ConfigError(f"--metric: '{m}' is not an interpretability metric of this sweep "
                                  f"with a known direction; available: {allowed}")
        return list(dict.fromkeys(metrics))
    preferred = f"interp/{LAST_BLOCK}.mlp.act/l0_frac"
    if preferred in available:
        return [preferred]
    blocks = [(int(mt.group(1)), m) for m in available if (mt := _BLOCK_L0_FRAC.match(m))]
    if blocks:
        return [max(blocks)[1]]
    fracs = [m for m in available if m.endswith("/l0_frac")]
    if fracs:
        return [fracs[0]]
    comparable = [m for m in available if width_independent(m)]
    rank = {suffix: i for i, suffix in enumerate(HEADLINE_FALLBACK)}
    comparable.sort(key=lambda m: (not m.startswith(f"interp/{LAST_BLOCK}.mlp.act/"),
                                   rank.get(m.rsplit("/", 1)[1], len(rank)), m))
    return comparable[:1]


PARETO_SUFFIXES = ("l0_frac", "dead_frac", "gaussian_tc_per_unit_bc", "mono_mean", "mono_share", "mig_hist20")
"""Metrics of the headline metric's site that the Pareto plots show by default: all
width-independent (`WIDTH_INDEPENDENT`), so that the panels of different model sizes share
their scale."""


def pareto_metrics(available: list[str], headline: list[str], chosen: list[str] | None = None) -> list[str]:
    """The metrics of the Pareto plots and frontier tables.

    A full evaluation reports hundreds of interp/* tags; by default the plots show the
    headline metrics, the unit metrics (PARETO_SUFFIXES) of each headline metric's site, and
    the width-normalised direction cosines (mean_sq_cos_rel) of that block's MLP input
    weights. `--metric` chooses instead."""
    if chosen:
        return list(dict.fromkeys(chosen))
    picked = list(headline)
    for metric in headline:
        site = metric[len("interp/"):].rsplit("/", 1)[0]
        picked += [f"interp/{site}/{suffix}" for suffix in PARETO_SUFFIXES]
        block = re.match(r"(blocks\.(?:\d+|last))\.", site)  # blocks.last: LAST_BLOCK
        if block:
            picked.append(f"interp/{block.group(1)}.mlp.fc1/mean_sq_cos_rel")
    return [m for m in dict.fromkeys(picked) if m in available]


# ---------------------------------------------------------------------------------------------
# Frontier and tax


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


def _size_key(row: dict):
    return row.get("model_size")


def size_label(size) -> str:
    return "default" if size is None else str(size)


def _completed(table: pa.Table) -> list[dict]:
    """Completed trials with a finite validation loss (the only ones plots and the tax use)."""
    if LOSS not in table.column_names:
        return []
    return [r for r in table.to_pylist()
            if r["status"] == "completed" and r[LOSS] is not None and math.isfinite(r[LOSS])]


def _sizes(rows: list[dict]) -> list:
    """Model sizes in order of parameter count (median over their trials), then name."""
    params: dict = {}
    for r in rows:
        params.setdefault(_size_key(r), []).append(r["num_params"])

    def order(size):
        values = [p for p in params[size] if p is not None]
        return (float(np.median(values)) if values else math.inf, size_label(size))

    return sorted(params, key=order)


def _size_params(rows: list[dict], size) -> int | None:
    values = [r["num_params"] for r in rows if _size_key(r) == size and r["num_params"] is not None]
    return int(np.median(values)) if values else None


def interpretability_tax(table: pa.Table, metric: str, target: float | None = None) -> dict:
    """The loss cost of reaching interpretability level m* on `metric`, per model size.

    With o = m ("higher" metrics) or o = -m ("lower" ones), per size s and seed r over the
    completed trials of (s, r) with a finite loss and metric:

        o*        = min over (s, r) of max_i o_i      (or the oriented `target`)
        tax(s, r) = L_F(s, r)(o*) - L_base(s, r)

    L_F is `frontier_loss_at` on the (s, r) trials' frontier; L_base the loss of the (s, r)
    baseline trial (coefficients all 0; the lowest loss when there are several). Only (s, r)
    with a baseline count; with a `target`, seeds whose frontier does not reach it are left
    out. Per size: mean and sample standard deviation (ddof=1; 0 for one seed) over seeds.

    Returns {"metric", "direction", "m_star" (in the metric's units), "rows": [{"size",
    "num_params", "mean", "std", "seeds", "per_seed": {seed: tax}}], "notes": [str]}.
    """
    direction = metric_direction(metric)
    if direction is None:
        raise ConfigError(f"--metric: '{metric}' has no known direction; interpretability metrics are "
                          f"interp/<site>/<{'|'.join(METRIC_DIRECTIONS)}|probe_*>")
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target: {target} must be a finite number")
    sign = 1.0 if direction == "higher" else -1.0
    rows = _completed(table)
    notes: list[str] = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((_size_key(r), r["seed"]), []).append(r)
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
        notes.append(f"{metric} depends on the model's width (docs/evaluation.md, \"Width and sample size\"), "
                     "so one level of it means different things at different sizes; prefer a width-independent "
                     "metric (l0_frac, gaussian_tc_per_unit_bc, mono_share, mig_hist20, probe_k*)")
    if target is not None:
        o_star = sign * float(target)
    elif usable:
        o_star = min(max(o for o, _ in points) for _, points in usable.values())
    else:
        o_star = math.nan
    out_rows = []
    for size in _sizes(rows):
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
        out_rows.append({
            "size": size, "num_params": _size_params(rows, size),
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else math.nan),
            "seeds": int(values.size), "per_seed": per_seed,
        })
    for note in notes:
        logger.info("tax on %s: %s", metric, note)
    return {"metric": metric, "direction": direction, "m_star": sign * o_star, "rows": out_rows, "notes": notes}


# ---------------------------------------------------------------------------------------------
# Outputs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, bbox_inches="tight" if tight else None, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _file_part(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def _short(metric: str) -> str:
    return metric.removeprefix("interp/")


def plot_pareto(rows: list[dict], metrics: list[str], title: str, path: Path) -> Path:
    """eval/loss against each metric (one subplot each) for one model size: every trial a point
    coloured by setting, the pooled frontier (all seeds) as a line."""
    plt = _pyplot()
    settings = sorted({str(r["setting"]) for r in rows})
    cmap = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    colour = {s: cmap(i % cmap.N) for i, s in enumerate(settings)}
    ncols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    # A fixed grid in inches, not constrained layout: a deep eval has hundreds of metrics and
    # the layout solver would cost seconds per subplot row.
    legend_cols = min(4, len(settings) + 1)
    legend_rows = math.ceil((len(settings) + 1) / legend_cols)
    cell_w, cell_h, top, bottom = 3.8, 3.0, 0.9, 0.6 + 0.2 * legend_rows
    height = cell_h * nrows + top + bottom
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_w * ncols, height), squeeze=False)
    fig.subplots_adjust(left=0.7 / (cell_w * ncols), right=1 - 0.15 / (cell_w * ncols), top=1 - top / height,
                        bottom=bottom / height, wspace=0.35, hspace=0.6)
    for ax, metric in zip(axes.flat, metrics):
        pts = [(r[metric], r[LOSS], str(r["setting"])) for r in rows
               if r.get(metric) is not None and math.isfinite(r[metric])]
        for setting in settings:
            xs = [p[0] for p in pts if p[2] == setting]
            ys = [p[1] for p in pts if p[2] == setting]
            if xs:
                ax.scatter(xs, ys, s=22, color=colour[setting], label=setting, zorder=3)
        front = pareto_frontier([(p[0], p[1]) for p in pts], metric_direction(metric))
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        order = np.argsort(fx, kind="stable")
        ax.plot(np.array(fx)[order], np.array(fy)[order], color="black", lw=1.2, marker="o", ms=8, mfc="none",
                zorder=2, label="frontier")
        arrow = "lower" if metric_direction(metric) == "lower" else "higher"
        ax.set_title(f"{_short(metric)}\n({arrow} is more interpretable)", fontsize=8)
        ax.set_xlabel(metric.rsplit("/", 1)[1], fontsize=8)
        ax.set_ylabel(LOSS, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[s], label=s) for s in settings]
    handles.append(plt.Line2D([], [], color="black", marker="o", ms=8, mfc="none", label="Pareto frontier (all seeds)"))
    fig.legend(handles=handles, loc="lower center", ncols=legend_cols, fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.25 / height)
    return _save(fig, plt, path, tight=False)


def plot_tax(taxes: list[dict], path: Path) -> Path:
    """Mean tax against parameter count (log x), error bars = std over seeds, one line per metric."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for tax in taxes:
        pts = [r for r in tax["rows"] if r["num_params"] is not None and r["seeds"] > 0]
        if not pts:
            continue
        rel = "<=" if tax["direction"] == "lower" else ">="
        ax.errorbar([r["num_params"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                    marker="o", capsize=3, label=f"{_short(tax['metric'])} {rel} {tax['m_star']:.4g}")
        for r in pts:
            ax.annotate(size_label(r["size"]), (r["num_params"], r["mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"interpretability tax ({LOSS} above baseline)")
    ax.set_title("Loss cost of matched interpretability (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return lines


def _sweep_name(root: Path) -> str:
    path = root / "sweep.yaml"
    if path.is_file():
        import yaml

        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            logger.warning("%s: not valid YAML (%s); naming the sweep after its directory", path,
                           str(exc).splitlines()[0])
            spec = None
        if isinstance(spec, dict) and spec.get("name") is not None:
            return str(spec["name"])
    return root.resolve().name


def write_report(sweep_dir: str | Path, metrics: list[str] | None = None, target: float | None = None) -> dict:
    """Write DIR/summary.parquet, DIR/plots/pareto_<size>.png, DIR/plots/tax.png and DIR/report.md.

    metrics: the headline metrics (trials table, tax and tax.png); default `headline_metrics`.
    target: the interpretability level of the tax in the metrics' own units (replaces m*).
    Failed trials are listed in the trials table and left out of plots, frontiers and the tax.

    Returns {"summary", "report": Path, "plots": [Path], "metrics": [str], "taxes": [the
    `interpretability_tax` results], "notes": [str]}.
    """
    root = Path(sweep_dir)
    table = collect_trials(root)
    available = interp_metrics(table)
    headline = headline_metrics(available, metrics)
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target: {target} must be a finite number")
    if target is not None and not headline:
        raise ConfigError("--target: the trials hold no width-independent interpretability metric to apply it "
                          "to; choose one with --metric")

    import pyarrow.parquet as pq

    summary = root / "summary.parquet"
    tmp = summary.with_name(summary.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(summary)

    rows = _completed(table)
    notes: list[str] = []
    failed = [r for r in table.to_pylist() if r["status"] != "completed"]
    if failed:
        notes.append(f"{len(failed)} trial(s) did not complete ({', '.join(r['trial'] for r in failed)}); "
                     "they are left out of the plots, frontiers and tax")
    used_trials = {r["trial"] for r in rows}
    incomplete = [r for r in table.to_pylist() if r["status"] == "completed" and r["trial"] not in used_trials]
    if incomplete:
        notes.append(f"{len(incomplete)} completed trial(s) have no {LOSS}; left out of the plots, frontiers and tax")

    plots: list[Path] = []
    frontiers: dict = {}
    sizes = _sizes(rows)
    if not rows:
        notes.append(f"no completed trial with {LOSS}: no plots, frontiers or tax")
    elif not available:
        notes.append("the trials hold no interpretability metric (interp/*) with a known direction: "
                     "no Pareto plots or tax")
    else:
        shown = pareto_metrics(available, headline, metrics)
        for size in sizes:
            size_rows = [r for r in rows if _size_key(r) == size]
            present = [m for m in shown if any(r.get(m) is not None for r in size_rows)]
            if not present:
                continue
            path = root / "plots" / f"pareto_{_file_part(size_label(size))}.png"
            plots.append(plot_pareto(size_rows, present, f"size {size_label(size)}: {LOSS} vs interpretability",
                                     path))
            frontiers[size] = {}
            for m in present:
                pts = [r for r in size_rows if r.get(m) is not None and math.isfinite(r[m])]
                idx = pareto_frontier([(r[m], r[LOSS]) for r in pts], metric_direction(m))
                frontiers[size][m] = [pts[i] for i in idx]

    taxes: list[dict] = []
    tax_skip = None
    if rows and available and not headline:
        tax_skip = ("the trials hold no width-independent interpretability metric to default to "
                    f"({', '.join(sorted(WIDTH_INDEPENDENT))}, probe_k*); choose one with --metric")
        logger.info("interpretability tax skipped: %s", tax_skip)
    if rows and headline:
        if not any(r["baseline"] for r in rows):
            tax_skip = ("the sweep has no completed baseline trial (all regularizer coefficients 0), so there "
                        "is no loss to measure the tax against; add 0 to a coefficient axis")
            logger.info("interpretability tax skipped: %s", tax_skip)
        else:
            taxes = [interpretability_tax(table, m, target) for m in headline]
            if any(r["seeds"] > 0 and r["num_params"] is not None for t in taxes for r in t["rows"]):
                plots.append(plot_tax(taxes, root / "plots" / "tax.png"))
    report = root / "report.md"
    text = _markdown(root, table, headline, frontiers, taxes, tax_skip, notes, plots, target)
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(report)
    return {"summary": summary, "report": report, "plots": plots, "metrics": headline, "taxes": taxes,
            "notes": notes + ([tax_skip] if tax_skip else []) + [n for t in taxes for n in t["notes"]]}


def _markdown(root: Path, table: pa.Table, headline: list[str], frontiers: dict, taxes: list[dict],
              tax_skip: str | None, notes: list[str], plots: list[Path], target: float | None) -> str:
    lines = [f"# Sweep report: {_sweep_name(root)}", ""]
    lines += [f"{table.num_rows} trials from `{root}/runs/*/trial.json` (all of them in `summary.parquet`). "
              f"Capability: `{LOSS}` (validation loss, nats/token; lower is better). "
              "Formulas: docs/report.md.", ""]
    for note in notes:
        lines.append(f"- {note}")
    if notes:
        lines.append("")

    lines += ["## Trials", ""]
    trials = table.to_pylist()
    header = ["trial", "size", "setting", "seed", "params", "tokens", "status", LOSS] + headline
    body = [[r["trial"], size_label(r["model_size"]), r["setting"], r["seed"], r["num_params"], r["tokens"],
             r["status"] if r["status"] != "failed" or not r["error"] else f"failed: {r['error']}",
             r.get(LOSS)] + [r.get(m) for m in headline] for r in trials]
    lines += _table(header, body) + [""]

    lines += ["## Interpretability tax", ""]
    if tax_skip:
        lines += [f"Not computed: {tax_skip}.", ""]
    elif not taxes:
        lines += ["Not computed: no completed trial with an interpretability metric.", ""]
    else:
        how = (f"the level given with --target ({target:.4g})" if target is not None else
               "m*, the most interpretable level every model size reaches with every seed")
        lines += [f"tax = L_frontier(m*) - L_baseline per size and seed, at {how}; mean and sample std "
                  "(ddof=1) over seeds.", ""]
        body = []
        for t in taxes:
            rel = "<=" if t["direction"] == "lower" else ">="
            for r in t["rows"]:
                per_seed = ", ".join(f"{s}: {v:.4g}" for s, v in r["per_seed"].items())
                body.append([size_label(r["size"]), r["num_params"], t["metric"], f"{rel} {t['m_star']:.4g}",
                             r["mean"], r["std"], r["seeds"], per_seed])
        lines += _table(["size", "params", "metric", "m*", "mean tax", "std", "seeds", "per seed"], body) + [""]
        for t in taxes:
            lines += [f"- {t['metric']}: {n}" for n in t["notes"]]
        if (root / "plots" / "tax.png") in plots:
            lines += ["", "![interpretability tax](plots/tax.png)"]
        lines.append("")

    lines += ["## Pareto frontiers", "",
              f"Per model size, the trials no other trial beats on both `{LOSS}` and the metric "
              "(all seeds pooled); the numbers behind each plot.", ""]
    if not frontiers:
        lines += ["No frontiers (see the notes above).", ""]
    for size, per_metric in frontiers.items():
        lines += [f"### Size {size_label(size)}", ""]
        body = []
        for m, pts in per_metric.items():
            for r in pts:
                body.append([m, metric_direction(m), r["trial"], r["setting"], r["seed"], r[m], r[LOSS]])
        lines += _table(["metric", "better", "trial", "setting", "seed", "value", LOSS], body) + [""]
        lines += [f"![Pareto frontier, size {size_label(size)}](plots/pareto_{_file_part(size_label(size))}.png)", ""]

    used = sorted({m for per_metric in frontiers.values() for m in per_metric} | set(headline))
    if used:
        lines += ["## Metric directions", ""]
        lines += _table(["metric", "more interpretable", "across widths", "why"],
                        [[m, metric_direction(m), "comparable" if width_independent(m) else "width-dependent",
                          metric_reason(m)] for m in used]) + [""]
    return "\n".join(lines)


def format_tax(taxes: list[dict]) -> str:
    """A short plain-text table of the tax (for the command line)."""
    lines = [f"{'size':<10} {'params':>12} {'metric':<36} {'m*':>12} {'mean tax':>10} {'std':>10} {'seeds':>5}"]
    for t in taxes:
        rel = "<=" if t["direction"] == "lower" else ">="
        for r in t["rows"]:
            lines.append(f"{size_label(r['size']):<10} {_fmt(r['num_params']):>12} {_short(t['metric']):<36} "
                         f"{rel + ' ' + format(t['m_star'], '.4g'):>12} {_fmt(r['mean']):>10} {_fmt(r['std']):>10} "
                         f"{r['seeds']:>5}")
    return "\n".join(lines)
