"""Ground-truth scoring of a dictionary (an SAE's latents) against the synthetic language's
factors: best-match mean correlation coefficient (MCC) and per-feature best-latent F1
(docs/metrics.md#ground-truth-dictionary-scoring).

Conventions:

- `latents_NL` are the dictionary's activations [N tokens, L latents] (numpy or torch;
  float64 inside); a factor is an integer array [N] (`tti_dist.data.synthetic` factor
  columns), negative = undefined at that token, as in `tti_dist.metrics.disentanglement`.
- Ground-truth features: for every factor f and every value c that f takes on at least one
  token, the indicator y_{f,c}(t) = 1[f(t) = c], defined only on the tokens D_f = {t: f(t) >= 0}.
  Every statistic of feature (f, c) — its correlations, its F1s, and the latent moments and
  firing counts they use — is taken over D_f alone: tokens where f is undefined are left out
  (they are neither positives nor negatives). A feature that is constant on D_f
  (f takes only the value c there) has no Pearson correlation and is not a feature: it is
  left out of the feature set (of both metrics).
- Pearson correlation over D_f (n = |D_f|, n_c = #{t in D_f: f(t) = c}):

      rho(z_j, y_{f,c}) = (n S_jc - n_c S_j) / sqrt((n Q_j - S_j^2) n_c (n - n_c)),

  S_j = sum z_j, Q_j = sum z_j^2, S_jc = sum_{f(t) = c} z_j, all over D_f. A latent constant
  on D_f (e.g. dead) correlates 0 with every feature of f.
- MCC: A_kj = |rho(z_j, y_k)| for the F features k and L latents j; the one-to-one matching
  pi (features -> distinct latents) maximising sum_k A_{k pi(k)} is found with the Hungarian
  algorithm (scipy.optimize.linear_sum_assignment, maximize=True), and

      MCC = (1 / F) sum_{k matched} A_{k pi(k)}.

  With fewer latents than features (L < F) only L features can be matched; the unmatched
  F - L count 0 (the divisor stays F), so a too-small dictionary cannot score 1. This is the
  identifiability literature's MCC (Hyvarinen & Morioka 2016, time-contrastive learning;
  Khemakhem et al. 2020, iVAE: mean |corr| between true and recovered sources after an
  optimal permutation), on activations. SynthSAEBench's MCC (Chanin et al. 2026; SAELens
  `sae_lens.synthetic` training utilities) applies the same Hungarian matching to |cosine|
  between decoder and ground-truth feature *directions*; our features have no given
  direction, so we correlate activations.
- F1 of feature k: the best latent as a detector, latent firing = z_j > 0:

      F1_k = max_j 2 TP_kj / (P_j + n_k),

  TP_kj = #{t in D_f: z_j(t) > 0, y_k(t) = 1}, P_j = #{t in D_f: z_j(t) > 0}, n_k the
  feature's positives (2TP/(2TP + FP + FN) = 2TP/(P + n_k)). Reported: the mean over all
  features and the mean over each factor's features. SynthSAEBench's F1 is latent-side
  (each latent against its decoder-cosine best ground-truth feature, averaged over latents);
  ours is feature-side, so extra latents never lower it (matching "is each true feature
  detected by some latent").

Cost: one pass over tokens in chunks of about `chunk_elements` latent values; per chunk three
matrix products with the stacked indicators of all factors (R = factors + features columns),
so O(N L R) arithmetic and O(chunk + R L) memory; then the matching on the [F, L] matrix.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from tti_dist.metrics.activation_stats import as_numpy

CHUNK_ELEMENTS = 1 << 22
"""Latent values (tokens x latents) processed at once (~32 MiB per float64 temporary)."""


def best_match_mcc(abs_corr_FL: Any) -> tuple[float, np.ndarray]:
    """(MCC, matched latent per feature, -1 if unmatched) for a [F, L] matrix of |corr|:
    the one-to-one matching maximising the total (Hungarian), mean over all F features with
    unmatched ones counting 0. F = 0 gives nan."""
    a = np.asarray(abs_corr_FL, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"best_match_mcc: expected a [F, L] matrix, got shape {a.shape}")
    matched = np.full(a.shape[0], -1, dtype=np.int64)
    if a.shape[0] == 0:
        return float("nan"), matched
    if a.shape[1] == 0:
        return 0.0, matched
    rows, cols = linear_sum_assignment(a, maximize=True)
    matched[rows] = cols
    return float(a[rows, cols].sum() / a.shape[0]), matched


def _sums(z: np.ndarray, labels: list[np.ndarray], values: list[np.ndarray], shift: np.ndarray,
          chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over token chunks. Rows of the indicator matrix M [tokens, R]: per factor, its
    defined mask then one column per value (1[f = c], 0 where undefined). Returns
    M^T x [R, L], M^T 1[z > 0] [R, L] and (defined masks)^T x^2 [factors, L], x = z - shift
    (Pearson is shift-invariant; the shift makes the sums cancel less)."""
    num_l = z.shape[1]
    num_r = sum(1 + v.shape[0] for v in values)
    mx, mon, dq = np.zeros((num_r, num_l)), np.zeros((num_r, num_l)), np.zeros((len(values), num_l))
    mask_rows = np.cumsum([0] + [1 + v.shape[0] for v in values[:-1]])  # the defined masks in M
    for start in range(0, z.shape[0], chunk_rows):
        zc = z[start:start + chunk_rows]
        x = zc.astype(np.float64) - shift
        on = (zc > 0).astype(np.float64)
        cols = []
        for f, v in zip(labels, values):
            fc = f[start:start + chunk_rows]
            cols.append((fc >= 0)[:, None])
            cols.append(fc[:, None] == v[None, :])
        m = np.concatenate(cols, axis=1).astype(np.float64)
        mx += m.T @ x
        mon += m.T @ on
        dq += m[:, mask_rows].T @ (x * x)
    return mx, mon, dq


def score_dictionary(latents_NL: Any, factors: Mapping[str, Any],
                     chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, Any]:
    """Best-match MCC and per-feature best-latent F1 of latents [N, L] against the factors
    (name -> int [N], negative = undefined); definitions in the module docstring.

    Returns {"mcc", "f1_mean", "f1_mean_per_factor" {name: float}, "features" [(name, value)],
    "f1" [F], "best_f1_latent" [F], "abs_corr" [F] (|rho| with the matched latent, 0 if
    unmatched), "matched_latent" [F] (-1 if unmatched), "num_features", "num_latents"}.
    mcc and f1_mean are nan when there is no feature.
    """
    z = as_numpy(latents_NL)
    if z.ndim != 2:
        raise ValueError(f"score_dictionary: expected latents of shape [N, L], got shape {z.shape}")
    if z.dtype.kind not in "biuf" or (z.dtype.kind == "f" and not np.isfinite(z).all()):
        raise ValueError(f"score_dictionary: latents must be finite numbers, got dtype {z.dtype}")
    num_n, num_l = z.shape
    chunk_rows = max(1, chunk_elements // max(num_l, 1))
    shift = z[:chunk_rows].astype(np.float64).mean(axis=0) if num_n else np.zeros(num_l)
    names, labels, values, positives = [], [], [], []
    for name, raw in factors.items():
        f = as_numpy(raw).reshape(-1)
        if f.dtype.kind not in "iu":
            raise ValueError(f"score_dictionary: factor {name!r} must be integers, got dtype {f.dtype}")
        if f.shape[0] != num_n:
            raise ValueError(f"score_dictionary: {num_n} latent rows but {f.shape[0]} labels of factor {name!r}")
        f = f.astype(np.int64)
        v, counts = np.unique(f[f >= 0], return_counts=True)
        keep = counts < counts.sum()  # an indicator constant on the defined tokens is not a feature
        if keep.any():
            names.append(name)
            labels.append(f)
            values.append(v[keep])
            positives.append(counts[keep].astype(np.float64))
    features: list[tuple[str, int]] = []
    corr_rows, f1_rows = [], []
    if names:
        mx, mon, dq = _sums(z, labels, values, shift, chunk_rows)
        row = 0
        for i, name in enumerate(names):
            n_c = positives[i]
            n = float((labels[i] >= 0).sum())
            s, fired = mx[row], mon[row]
            s_c, tp = mx[row + 1:row + 1 + n_c.shape[0]], mon[row + 1:row + 1 + n_c.shape[0]]
            row += 1 + n_c.shape[0]
            var_z = n * dq[i] - s ** 2  # n^2 Var(z_j) on D_f
            live = var_z > 1e-12 * n * dq[i]  # constant latents (rounding aside) correlate 0
            cov = n * s_c - n_c[:, None] * s[None, :]
            den = np.sqrt(np.where(live, var_z, 1.0)[None, :] * (n_c * (n - n_c))[:, None])
            corr_rows.append(np.where(live[None, :], np.abs(cov) / den, 0.0))
            f1_rows.append(2.0 * tp / (fired[None, :] + n_c[:, None]))
            features.extend((name, int(v)) for v in values[i])
    num_f = len(features)
    abs_corr = np.concatenate(corr_rows) if corr_rows else np.zeros((0, num_l))
    f1_fl = np.concatenate(f1_rows) if f1_rows else np.zeros((0, num_l))
    abs_corr = np.minimum(abs_corr, 1.0)  # rounding can put a perfect match a hair above 1
    mcc, matched = best_match_mcc(abs_corr)
    matched_corr = np.zeros(num_f)
    ok = matched >= 0
    matched_corr[ok] = abs_corr[np.flatnonzero(ok), matched[ok]]
    f1 = f1_fl.max(axis=1) if num_l else np.zeros(num_f)
    best = f1_fl.argmax(axis=1) if num_l else np.full(num_f, -1)
    of_factor = np.array([k for k, _ in features], dtype=object)
    per_factor = {k: float(f1[of_factor == k].mean()) for k in names}
    return {
        "mcc": mcc, "f1_mean": float(f1.mean()) if num_f else float("nan"),
        "f1_mean_per_factor": per_factor, "features": features, "f1": f1, "best_f1_latent": best,
        "abs_corr": matched_corr, "matched_latent": matched, "num_features": num_f, "num_latents": num_l,
    }


def dictionary_scoring_tags(prefix: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """Scalar tags of `score_dictionary`'s result: prefix + gt_mcc, gt_f1_mean, gt_num_features,
    gt_f1_mean_<factor> (e.g. prefix "sae/<site>/")."""
    out = {prefix + "gt_mcc": float(scores["mcc"]), prefix + "gt_f1_mean": float(scores["f1_mean"]),
           prefix + "gt_num_features": float(scores["num_features"])}
    out.update({f"{prefix}gt_f1_mean_{k}": float(v) for k, v in scores["f1_mean_per_factor"].items()})
    return out
