"""The metrics `tti eval` reports, from full-width activations on one rank.

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

RUN/eval/ files and the summary: tti_dist/eval/outputs.py.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch

from tti_dist.metrics.activation_stats import dead_and_dense, direction_cosines, gaussian_tc_per_unit, l0, unit_density
from tti_dist.metrics.disentanglement import mig, monosemanticity
from tti_dist.metrics.probes import linear_probe, sparse_probe, train_test_split_indices

SPARSE_PROBE_KS = (1, 2, 5)
MONOSEMANTIC_THRESHOLD = 0.5
KSG_MAX_TOKENS = 2048
"""Tokens (a seeded subsample) for the k-nearest-neighbour MI estimator: O(N log N) per unit."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def compute_metrics(plan, acts: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                    weights: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalars, histograms of log10 density) for the collected activations."""
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
