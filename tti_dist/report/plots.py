"""The figures of a sweep report (matplotlib, Agg backend):

    DIR/plots/pareto_<size>.png  eval/loss against interpretability metrics, per model size
                                 (`plot_pareto`: every trial a point, the frontier a line)
    DIR/plots/tax.png            interpretability tax against parameter count, +-t_crit SE
                                 (Student's t, two-sided 95%), hollow markers where it is
                                 indistinguishable from zero (`plot_tax`)

Files are written atomically (a .tmp file renamed into place).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from tti_dist.report.interp_metrics import metric_direction, short_name
from tti_dist.report.pareto import LOSS, pareto_frontier, size_label

# Files only, no display: the report runs on cluster heads and in tests.
matplotlib.use("Agg")


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, bbox_inches="tight" if tight else None, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _file_part(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def pareto_plot_name(size) -> str:
    """The file name of a model size's Pareto plot under DIR/plots (`pareto_<size>.png`)."""
    return f"pareto_{_file_part(size_label(size))}.png"


def plot_pareto(rows: list[dict], metrics: list[str], title: str, path: Path) -> Path:
    """eval/loss against each metric (one subplot each) for one model size: every trial a point
    coloured by setting, the pooled frontier (all seeds) as a line."""
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
        ax.set_title(f"{short_name(metric)}\n({arrow} is more interpretable)", fontsize=8)
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
    return _save(fig, path, tight=False)


def plot_tax(taxes: list[dict], path: Path) -> Path:
    """Mean tax against parameter count (log x), one line per metric. Error bars: +-t_crit SE,
    the two-sided 95% interval of the mean (SE = std / sqrt(n), t_crit = t(0.975, n - 1) of
    the row; tti_dist/report/noise.py). Filled markers: the tax is distinguishable from zero
    (|mean| > t_crit SE, n >= 2 seeds), i.e. its bar does not reach 0; hollow: it is not, or
    was measured on one seed (no error bar)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.6), layout="constrained")
    for tax in taxes:
        pts = [r for r in tax["rows"] if r["num_params"] is not None and r["seeds"] > 0]
        if not pts:
            continue
        rel = "<=" if tax["direction"] == "lower" else ">="
        x = [r["num_params"] for r in pts]
        y = [r["mean"] for r in pts]
        # The bar is the verdict's own interval, so a filled marker is one whose bar misses 0.
        bars = [r["t_crit"] * r["se"] if math.isfinite(r["se"]) and math.isfinite(r["t_crit"]) else 0.0
                for r in pts]
        line = ax.errorbar(x, y, yerr=bars, marker="", capsize=3,
                           label=f"{short_name(tax['metric'])} {rel} {tax['m_star']:.4g}")
        colour = line.lines[0].get_color()
        for r, xi, yi in zip(pts, x, y):
            ax.plot([xi], [yi], ls="", marker="o", ms=7, mec=colour, zorder=3,
                    mfc=colour if r["distinguishable"] else "white")
            ax.annotate(size_label(r["size"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"interpretability tax ({LOSS} above baseline)")
    ax.set_title("Loss cost of matched interpretability (mean ± t(0.975, n-1) SE over seeds)", fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        plt.Line2D([], [], ls="", marker="o", ms=7, color="black",
                   label="distinguishable from 0 (|mean| > t(0.975, n-1) SE)"),
        plt.Line2D([], [], ls="", marker="o", ms=7, color="black", mfc="white",
                   label="within t(0.975, n-1) SE of 0, or one seed"),
    ]
    ax.legend(handles=handles, fontsize=8)
    return _save(fig, path)
