"""The interpretability metrics of a sweep report: which way each one points, whether it
compares across model widths, and which of them the report shows by default.

- Metric orientation: each interpretability metric has a direction (`METRIC_DIRECTIONS`);
  o = m for "higher is better" metrics and o = -m for "lower is better" ones, so higher o is
  always more interpretable.
- Width: the tax compares model sizes at one level o*, so its default (headline) metrics are
  width-independent ones (`width_independent`: l0_frac, gaussian_tc_per_unit_bc, mono_*,
  mig_hist20, k-sparse probes, ...; docs/evaluation.md, "Width and sample size"). A
  width-dependent metric (l0, mig_ksg, dense probes, |cos|) can still be chosen with
  --metric; the tax then notes that it depends on width.
"""

from __future__ import annotations

import re

import pyarrow as pa

from tti_dist.errors import ConfigError
from tti_dist.report.records import LAST_BLOCK

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
    """Why the direction of an `interp/<site>/<suffix>` metric is the more interpretable one."""
    suffix = tag.rsplit("/", 1)[1]
    return METRIC_DIRECTIONS[suffix][1] if suffix in METRIC_DIRECTIONS else PROBE_DIRECTION[1]


def width_independent(tag: str) -> bool:
    """Whether an `interp/<site>/<suffix>` metric with a direction compares across model
    widths (`WIDTH_INDEPENDENT`, or a k-sparse probe)."""
    if metric_direction(tag) is None:
        return False
    suffix = tag.rsplit("/", 1)[1]
    return suffix in WIDTH_INDEPENDENT or bool(_SPARSE_PROBE.match(suffix))


def short_name(metric: str) -> str:
    """A metric's name without its `interp/` prefix (plot titles, the command-line table)."""
    return metric.removeprefix("interp/")


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
