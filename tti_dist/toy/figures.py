"""PNG figures of a toy sweep, in the style of Elhage et al. 2022 ("Toy Models of Superposition").

- `plot_wtw`: W^T W of one instance per chosen sparsity (the paper's intro figure), with the
  column norms ||W_i|| below, coloured by superposition sum_{j != i} (W_i_hat . W_j)^2.
- `plot_dimensionality`: feature dimensionality D_i of every represented feature against
  1 / (1 - S) on a log axis, dimensions per feature D* per instance as a line, and horizontal
  lines at the fractions 1, 3/4, 2/3, 1/2, 2/5, 3/8 (the paper's "Geometry" figure).
- `plot_dimensionality_clusters`: the same D_i against 1/(1-S) beside their histogram, with the
  fraction lines across both, so that the clusters at the fractions show as peaks.
- `plot_phase_diagram`: the n = 2, m = 1 phase of the best restart per (relative importance,
  density) cell beside the closed-form phases, with the closed-form boundary (the paper's
  "Superposition as a Phase Change" figure).

matplotlib is imported inside the functions (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    # lazy: matplotlib takes about a second to import and only `tti toy` draws figures
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
    import matplotlib.pyplot as plt  # lazy: as above

    return plt


def pick_sparsities(sparsities: list[float], count: int = 6) -> list[float]:
    """Up to `count` distinct sparsities of the sweep, evenly spread over its sorted order,
    always including the first (densest) and the last (sparsest)."""
    values = sorted(set(sparsities))
    if len(values) <= count:
        return values
    index = np.unique(np.round(np.linspace(0, len(values) - 1, count)).astype(int))
    return [values[i] for i in index]


def plot_wtw(W: np.ndarray, sparsity: list[float], repeat: list[int], superposition: np.ndarray,
             path: str | Path, count: int = 6) -> Path:
    """W^T W heatmaps (blue -1 .. red +1) for repeat 0 of up to `count` sparsities, plus bars of
    ||W_i|| coloured by superposition (black 0 = orthogonal .. yellow 1). W: [I, m, n]."""
    plt = _pyplot()
    chosen = pick_sparsities(sparsity, count)
    columns = [next(i for i, (s, r) in enumerate(zip(sparsity, repeat)) if s == c and r == 0) for c in chosen]
    n = W.shape[-1]
    fig, axes = plt.subplots(2, len(columns), figsize=(2.3 * len(columns) + 1.0, 4.6),
                             gridspec_kw={"height_ratios": [2.2, 1]}, squeeze=False, layout="constrained")
    image = None
    for col, i in enumerate(columns):
        wtw = W[i].T @ W[i]
        ax = axes[0, col]
        image = ax.imshow(wtw, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"S = {sparsity[i]:.3g}\n1/(1-S) = {1 / (1 - sparsity[i]):.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        norms = np.linalg.norm(W[i], axis=0)
        bar = axes[1, col]
        bar.barh(np.arange(n), norms, color=plt.cm.viridis(np.clip(superposition[i], 0, 1)), height=0.8)
        bar.set_ylim(n - 0.5, -0.5)
        bar.set_xlim(0, max(1.2, float(norms.max()) * 1.05))
        bar.set_yticks([])
        bar.set_xlabel("||W_i||", fontsize=8)
        bar.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("W^T W", fontsize=9)
    axes[1, 0].set_ylabel("feature i", fontsize=8)
    fig.colorbar(image, ax=axes[0, -1], shrink=0.9, label="W^T W")
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes[1, -1], shrink=0.9, label="superposition")
    fig.suptitle("W^T W per sparsity (repeat 0); bars: ||W_i||, feature 0 (most important) on top", fontsize=10)
    return _save(fig, plt, path)


def plot_dimensionality(sparsity: np.ndarray, D: np.ndarray, represented: np.ndarray, d_star: np.ndarray,
                        instance_sparsity: np.ndarray, path: str | Path, fractions) -> Path:
    """D_i of represented features vs 1/(1-S) (log x) with the fraction lines and D* per instance.

    sparsity, D, represented: per (instance, feature) row; d_star, instance_sparsity: per instance.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, value in fractions:
        if value > 0:
            ax.axhline(value, color="0.75", lw=0.8, ls="--", zorder=0)
            ax.text(1.0, value, f" {label}", transform=ax.get_yaxis_transform(), va="center", fontsize=8, color="0.4")
    x = 1.0 / (1.0 - sparsity)
    rng = np.random.default_rng(0)
    jitter = np.exp(rng.uniform(-0.04, 0.04, size=x.shape))  # spread overlapping dots sideways
    keep = represented.astype(bool)
    ax.scatter(x[keep] * jitter[keep], D[keep], s=9, alpha=0.5, color="tab:blue", lw=0,
               label="D_i (represented features)")
    xs = 1.0 / (1.0 - instance_sparsity)
    order = np.argsort(xs, kind="stable")
    uniq = np.unique(xs)
    mean = np.array([np.mean(d_star[xs == u]) for u in uniq])
    ax.plot(uniq, mean, color="black", lw=1.5, label="D* = m / ||W||_F^2 (mean over repeats)")
    ax.scatter(xs[order], d_star[order], s=14, color="black", marker="x", lw=1, label="D* per instance")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("1 / (1 - S)   (S = feature sparsity)")
    ax.set_ylabel("dimensions per feature")
    ax.set_title("Feature dimensionality D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2")
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, plt, path)


EXTRA_FRACTIONS: tuple[tuple[str, float], ...] = (("1/3", 1 / 3), ("1/4", 1 / 4))
"""Dotted guide lines of the clusters figure below the paper's fractions: with n / m = 4
(n = 20, m = 5) the fully superposed state has D* = 1/4."""


def plot_dimensionality_clusters(sparsity: np.ndarray, D: np.ndarray, represented: np.ndarray, path: str | Path,
                                 fractions, extra=EXTRA_FRACTIONS, bins: int = 80) -> Path:
    """D_i of represented features vs 1/(1-S) (log x, left) and their histogram (right), with
    dashed lines at the paper's `fractions` and dotted ones at `extra`. Per (instance, feature) rows."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(9.0, 4.8), sharey=True, gridspec_kw={"width_ratios": [3, 1]},
                                   layout="constrained")
    keep = represented.astype(bool)
    x = 1.0 / (1.0 - sparsity[keep])
    jitter = np.exp(np.random.default_rng(0).uniform(-0.04, 0.04, size=x.shape))  # spread equal x sideways
    ax.scatter(x * jitter, D[keep], s=10, alpha=0.45, color="tab:blue", lw=0)
    hist.hist(D[keep], bins=bins, range=(0, 1.04), orientation="horizontal", color="tab:blue", alpha=0.8)
    for label, value, style in [(lab, v, "--") for lab, v in fractions if v > 0] + [(lab, v, ":") for lab, v in extra]:
        for axis in (ax, hist):
            axis.axhline(value, color="0.55", lw=0.8, ls=style, zorder=0)
        hist.text(1.0, value, f" {label}", transform=hist.get_yaxis_transform(), va="center", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.04)
    ax.set_xlabel("1 / (1 - S)")
    ax.set_ylabel("feature dimensionality D_i")
    ax.set_title("D_i = ||W_i||^2 / sum_j (W_i_hat . W_j)^2 of represented features", fontsize=10)
    hist.set_xlabel("features")
    hist.set_title("all sparsities", fontsize=10)
    return _save(fig, plt, path)


PHASE_COLOURS = ("#e8a09a", "#8fb8de", "#f3d36b", "#9e9e9e")
"""Cell colours by phase code: not represented, dedicated dimension, superposition, other."""


def plot_phase_diagram(density_edges: np.ndarray, ratio_edges: np.ndarray, phase: np.ndarray, analytic: np.ndarray,
                       labels, boundary: tuple[np.ndarray, np.ndarray], restarts: int, path: str | Path) -> Path:
    """Empirical (left) and closed-form (right) phase of feature 2 over relative importance r (x)
    and density 1 - S (y), both log, dense at the top. phase, analytic: codes
    [densities, ratios], both axes ascending; the edges come from phase.log_grid_edges. A cross
    marks an empirical cell whose phase differs from the closed form. `boundary` = (r, p*(r)):
    superposition wins below this curve in the closed form; the vertical r = 1 above it separates
    not represented (left) from dedicated (right)."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap  # lazy: with pyplot
    from matplotlib.patches import Patch  # lazy: with pyplot

    cmap = ListedColormap(PHASE_COLOURS)
    norm = BoundaryNorm(np.arange(len(PHASE_COLOURS) + 1) - 0.5, cmap.N)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.9), sharey=True, layout="constrained")
    r_mid = np.sqrt(ratio_edges[:-1] * ratio_edges[1:])
    p_mid = np.sqrt(density_edges[:-1] * density_edges[1:])
    r_line, p_line = boundary
    p_top = float(np.max(p_line))
    titles = (f"trained (best of {restarts} restarts per cell)", "closed form (unit-norm configurations)")
    for ax, grid, title in zip(axes, (phase, analytic), titles):
        ax.pcolormesh(ratio_edges, density_edges, grid, cmap=cmap, norm=norm, edgecolors="white", linewidth=0.3)
        ax.plot(r_line, p_line, color="black", lw=1.2, ls="--")
        ax.plot([1, 1], [p_top, density_edges[-1]], color="black", lw=1.2, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(ratio_edges[0], ratio_edges[-1])
        ax.set_ylim(density_edges[0], density_edges[-1])  # dense at the top, sparse at the bottom
        ax.set_xlabel("relative importance r of feature 2")
        ax.set_title(title, fontsize=10)
    differs = phase != analytic
    rr, pp = np.meshgrid(r_mid, p_mid)
    axes[0].scatter(rr[differs], pp[differs], marker="x", color="black", s=22, lw=1.0)
    axes[0].set_ylabel("feature density 1 - S")
    handles = [Patch(color=PHASE_COLOURS[c], label=labels[c]) for c in range(len(labels))
               if (phase == c).any() or (analytic == c).any() or c < 3]
    handles.append(plt.Line2D([], [], color="black", ls="--", label="closed-form boundary"))
    if differs.any():
        handles.append(plt.Line2D([], [], color="black", marker="x", ls="", label="trained differs from closed form"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("n = 2 features in m = 1 dimension: what happens to feature 2 (feature 1 has importance 1)",
                 fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
