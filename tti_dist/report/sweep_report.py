"""`tti report DIR`: the summary table, Pareto frontiers and interpretability tax of a sweep.

Reads the records `tti sweep --out DIR` leaves, DIR/runs/<trial>/trial.json, and writes

    DIR/summary.parquet        one row per trial (`collect_trials`)
    DIR/plots/pareto_<size>.png  eval/loss against every interpretability metric, per model size
    DIR/plots/tax.png          interpretability tax against parameter count
    DIR/report.md              the tables behind the plots

Definitions (docs/report.md has the long form): the metrics' orientation and width
dependence in tti_dist/report/interp_metrics.py, the Pareto frontier, target level and tax
in tti_dist/report/pareto.py, the tax's noise floor and the baselines' convergence checks in
tti_dist/report/noise.py. Warnings (unconverged baselines, a width-dependent tax metric) are
logged and listed in report.md.

No Ray import: the report only reads files, so it runs anywhere the sweep directory is.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pyarrow.parquet as pq

from tti_dist.errors import ConfigError
from tti_dist.report.interp_metrics import (WIDTH_INDEPENDENT, headline_metrics, interp_metrics, metric_direction,
                                            pareto_metrics)
from tti_dist.report.markdown import report_markdown
from tti_dist.report.noise import convergence_warnings
from tti_dist.report.pareto import (LOSS, baseline_losses, completed_trials, interpretability_tax, model_sizes,
                                    pareto_frontier, size_key, size_label)
from tti_dist.report.plots import pareto_plot_name, plot_pareto, plot_tax
from tti_dist.report.records import collect_trials, eval_loss_history

logger = logging.getLogger(__name__)


def baseline_warnings(root: Path, rows: list[dict]) -> list[str]:
    """`convergence_warnings` for every model size with completed baseline trials, in size
    order. Each baseline's eval/loss history is read from DIR/runs/<trial>/metrics.parquet
    (`tti sweep` names a trial's run directory after the trial), its final step from the
    trial record (`steps`; the last eval step for records without it)."""
    losses = baseline_losses(rows)
    out = []
    for size in model_sizes(rows):
        if size not in losses:
            continue
        histories = [(r["seed"], eval_loss_history(root / "runs" / r["trial"], LOSS), r.get("steps"))
                     for r in rows if r["baseline"] and size_key(r) == size]
        out += convergence_warnings(size_label(size), histories, losses[size])
    return out


def write_report(sweep_dir: str | Path, metrics: list[str] | None = None, target: float | None = None) -> dict:
    """Write DIR/summary.parquet, DIR/plots/pareto_<size>.png, DIR/plots/tax.png and DIR/report.md.

    metrics: the headline metrics (trials table, tax and tax.png); default `headline_metrics`.
    target: the interpretability level of the tax in the metrics' own units (replaces m*).
    Failed trials are listed in the trials table and left out of plots, frontiers and the tax.

    Returns {"summary", "report": Path, "plots": [Path], "metrics": [str], "taxes": [the
    `interpretability_tax` results], "notes": [str], "warnings": [str] (each also logged)}.
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

    summary = root / "summary.parquet"
    tmp = summary.with_name(summary.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(summary)

    rows = completed_trials(table)
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
    sizes = model_sizes(rows)
    if not rows:
        notes.append(f"no completed trial with {LOSS}: no plots, frontiers or tax")
    elif not available:
        notes.append("the trials hold no interpretability metric (interp/*) with a known direction: "
                     "no Pareto plots or tax")
    else:
        shown = pareto_metrics(available, headline, metrics)
        for size in sizes:
            size_rows = [r for r in rows if size_key(r) == size]
            present = [m for m in shown if any(r.get(m) is not None for r in size_rows)]
            if not present:
                continue
            path = root / "plots" / pareto_plot_name(size)
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
            tax_skip = ("the sweep has no completed baseline trial (all regularizer coefficients 0 and no architectural sparsity), so there "
                        "is no loss to measure the tax against; add 0 to a coefficient axis")
            logger.info("interpretability tax skipped: %s", tax_skip)
        else:
            taxes = [interpretability_tax(table, m, target) for m in headline]
            if any(r["seeds"] > 0 and r["num_params"] is not None for t in taxes for r in t["rows"]):
                plots.append(plot_tax(taxes, root / "plots" / "tax.png"))
    warnings = [w for t in taxes for w in t["warnings"]]
    converged = baseline_warnings(root, rows)
    for warning in converged:
        logger.warning(warning)
    warnings += converged
    report = root / "report.md"
    text = report_markdown(root, table, headline, frontiers, taxes, tax_skip, notes, plots, target, warnings)
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(report)
    return {"summary": summary, "report": report, "plots": plots, "metrics": headline, "taxes": taxes,
            "notes": notes + ([tax_skip] if tax_skip else []) + [n for t in taxes for n in t["notes"]],
            "warnings": warnings}
