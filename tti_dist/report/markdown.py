"""The text of a sweep report: DIR/report.md (`report_markdown`: the warnings, the trials
table, the tax with its noise floor, the numbers behind each Pareto plot and the metrics'
directions) and the plain-text tax table `tti report` prints (`format_tax`), with one number
format for both.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pyarrow as pa
import yaml

from tti_dist.report.interp_metrics import metric_direction, metric_reason, short_name, width_independent
from tti_dist.report.noise import RULE
from tti_dist.report.pareto import LOSS, size_label
from tti_dist.report.plots import pareto_plot_name

logger = logging.getLogger(__name__)


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
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            logger.warning("%s: not valid YAML (%s); naming the sweep after its directory", path,
                           str(exc).splitlines()[0])
            spec = None
        if isinstance(spec, dict) and spec.get("name") is not None:
            return str(spec["name"])
    return root.resolve().name


def noise_floor_sentence(taxes: list[dict]) -> str:
    """The rule for reading the tax and, per size, the noise of its baselines (report.md, the
    command's output): "Noise floor: ...; <noise.RULE>."."""
    sizes = {}
    for t in taxes:
        for r in t["rows"]:
            sizes.setdefault(size_label(r["size"]), (r["baseline_sd"], r["baseline_seeds"]))
    floor = ", ".join(f"{label} {_fmt(sd) if n >= 2 else 'not measured'} ({n} seed{'s' if n != 1 else ''})"
                      for label, (sd, n) in sizes.items())
    return (f"Noise floor: the baselines' {LOSS} varies over seeds by sd (ddof=1) {floor}; the tax of each "
            f"seed is paired with that seed's baseline, and {RULE}.")


def report_markdown(root: Path, table: pa.Table, headline: list[str], frontiers: dict, taxes: list[dict],
                    tax_skip: str | None, notes: list[str], plots: list[Path], target: float | None,
                    warnings: list[str] = ()) -> str:
    """The text of DIR/report.md from `write_report`'s results (tti_dist/report/sweep_report.py)."""
    lines = [f"# Sweep report: {_sweep_name(root)}", ""]
    lines += [f"{table.num_rows} trials from `{root}/runs/*/trial.json` (all of them in `summary.parquet`). "
              f"Capability: `{LOSS}` (validation loss, nats/token; lower is better). "
              "Formulas: docs/report.md.", ""]
    for note in notes:
        lines.append(f"- {note}")
    if notes:
        lines.append("")

    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]

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
                  "(ddof=1) over seeds, its standard error SE, the Student's t quantile t(0.975, n-1) the "
                  "verdict multiplies SE by, and the baselines' own sd over seeds.", "",
                  noise_floor_sentence(taxes), ""]
        body = []
        for t in taxes:
            rel = "<=" if t["direction"] == "lower" else ">="
            for r in t["rows"]:
                per_seed = ", ".join(f"{s}: {v:.4g}" for s, v in r["per_seed"].items())
                body.append([size_label(r["size"]), r["num_params"], t["metric"], f"{rel} {t['m_star']:.4g}",
                             r["mean"], r["std"], r["seeds"], r["se"], r["t_crit"], r["verdict"],
                             r["baseline_sd"], r["baseline_seeds"], per_seed])
        lines += _table(["size", "params", "metric", "m*", "mean tax", "std", "seeds", "SE", "t(0.975, n-1)",
                         "verdict", "baseline sd", "baseline seeds", "per seed"], body) + [""]
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
        lines += [f"![Pareto frontier, size {size_label(size)}](plots/{pareto_plot_name(size)})", ""]

    used = sorted({m for per_metric in frontiers.values() for m in per_metric} | set(headline))
    if used:
        lines += ["## Metric directions", ""]
        lines += _table(["metric", "more interpretable", "across widths", "why"],
                        [[m, metric_direction(m), "comparable" if width_independent(m) else "width-dependent",
                          metric_reason(m)] for m in used]) + [""]
    return "\n".join(lines)


def format_tax(taxes: list[dict]) -> str:
    """A short plain-text table of the tax with its noise floor (for the command line: SE, the
    t(0.975, n-1) multiplier of the verdict, the baselines' sd), and the rule of its verdict
    column."""
    lines = [f"{'size':<10} {'params':>12} {'metric':<36} {'m*':>12} {'mean tax':>10} {'std':>10} {'seeds':>5} "
             f"{'SE':>10} {'t crit':>6} {'base sd':>10} verdict"]
    for t in taxes:
        rel = "<=" if t["direction"] == "lower" else ">="
        for r in t["rows"]:
            lines.append(f"{size_label(r['size']):<10} {_fmt(r['num_params']):>12} {short_name(t['metric']):<36} "
                         f"{rel + ' ' + format(t['m_star'], '.4g'):>12} {_fmt(r['mean']):>10} {_fmt(r['std']):>10} "
                         f"{r['seeds']:>5} {_fmt(r['se']):>10} {_fmt(r['t_crit']):>6} {_fmt(r['baseline_sd']):>10} "
                         f"{r['verdict']}")
    lines.append(f"base sd: sd (ddof=1) of the baselines' {LOSS} over seeds; t crit: t(0.975, n-1); {RULE}")
    return "\n".join(lines)
