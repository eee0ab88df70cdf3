"""Ground-truth dictionary scoring (tti_dist.metrics.dictionary_scoring) on hand-made arrays."""

import math

import numpy as np
import pytest
import torch

from tti_dist.metrics.dictionary_scoring import best_match_mcc, dictionary_scoring_tags, score_dictionary


def _factors(rng, n):
    a = rng.integers(0, 3, size=n)
    b = rng.integers(-1, 2, size=n)  # a third of the tokens undefined
    return {"a": a, "b": b}


def _indicators(factors):
    cols = []
    for f in factors.values():
        for v in np.unique(f[f >= 0]):
            cols.append((f == v).astype(np.float64))
    return np.stack(cols, axis=1)


def test_perfect_dictionary_scores_one_in_any_order_scale_and_with_extra_latents():
    rng = np.random.default_rng(0)
    n = 3000
    factors = _factors(rng, n)
    ind = _indicators(factors)  # 5 features: a=0,1,2; b=0,1
    scaled = ind * rng.uniform(0.5, 7.0, size=ind.shape[1])
    extra = np.maximum(rng.normal(size=(n, 11)), 0.0)
    z = np.concatenate([scaled, extra], axis=1)
    perm = rng.permutation(z.shape[1])
    s = score_dictionary(torch.from_numpy(z[:, perm]).float(), factors)
    assert s["num_features"] == 5 and s["num_latents"] == 16
    assert s["mcc"] == pytest.approx(1.0, abs=1e-6)
    assert s["f1_mean"] == pytest.approx(1.0, abs=1e-12)
    assert s["f1_mean_per_factor"] == pytest.approx({"a": 1.0, "b": 1.0})
    # Each feature is matched to its own indicator latent (b's two features are complements,
    # |corr| 1 with both indicators, so only the set of b's matches is determined).
    where = {old: new for new, old in enumerate(perm)}
    assert list(s["matched_latent"][:3]) == [where[0], where[1], where[2]]
    assert set(s["matched_latent"][3:]) == {where[3], where[4]}
    tags = dictionary_scoring_tags("sae/blocks.0.hook_resid_post/", s)
    assert tags["sae/blocks.0.hook_resid_post/gt_mcc"] == pytest.approx(1.0, abs=1e-6)
    assert set(tags) == {f"sae/blocks.0.hook_resid_post/{k}" for k in
                         ("gt_mcc", "gt_f1_mean", "gt_num_features", "gt_f1_mean_a", "gt_f1_mean_b")}


def test_independent_latents_score_near_zero():
    rng = np.random.default_rng(1)
    n, num_l = 4000, 64
    factors = {"a": rng.integers(0, 4, size=n)}
    z = np.maximum(rng.normal(size=(n, num_l)), 0.0)
    s = score_dictionary(z, factors)
    # Under independence each rho ~ N(0, 1/n); the best of 64 latents per feature stays
    # below sqrt(2 ln(2 * 64) / n) ~ 0.049 typically: bound 4 / sqrt(n) = 0.063.
    assert s["mcc"] < 4 / math.sqrt(n)
    # F1 of an always-on-half latent for a 1/4 feature is ~ 2 * (1/8) / (1/2 + 1/4) = 1/3, not 1.
    assert s["f1_mean"] < 0.45


def test_hand_computed_case_and_undefined_positions_excluded():
    # Token 5 is undefined: latent 0's 9 there must not count.
    f = np.array([0, 0, 1, 1, 1, -1])
    z = np.array([[2, 1], [0, 1], [0, 1], [0, 0], [0, 0], [9, 0]], dtype=np.float64)
    s = score_dictionary(z, {"f": f})
    # On the 5 defined tokens, y0 = [1,1,0,0,0], y1 = 1 - y0:
    # |rho(z0, y)| = (5*2 - 2*2) / sqrt((5*4 - 4) * (5*2 - 4)) = 6 / sqrt(96) = sqrt(6)/4,
    # |rho(z1, y)| = (5*2 - 2*3) / sqrt((5*3 - 9) * 6) = 4 / 6 = 2/3; any matching sums both.
    assert s["features"] == [("f", 0), ("f", 1)]
    assert s["mcc"] == pytest.approx((math.sqrt(6) / 4 + 2 / 3) / 2, abs=1e-12)
    # F1: y0 by z1 (fires on 0,1,2): 2*2/(3+2) = 4/5 (z0: 2*1/(1+2) = 2/3);
    #     y1 by z1: 2*1/(3+3) = 1/3 (z0: 0).
    assert s["f1"] == pytest.approx([0.8, 1 / 3], abs=1e-12)
    assert list(s["best_f1_latent"]) == [1, 1]
    assert s["f1_mean"] == pytest.approx((0.8 + 1 / 3) / 2, abs=1e-12)
    # Appending undefined tokens with arbitrary latents changes nothing.
    z2 = np.concatenate([z, np.array([[5.0, 3.0], [0.0, 7.0]])])
    s2 = score_dictionary(z2, {"f": np.concatenate([f, [-1, -7]])}, chunk_elements=4)
    assert s2["mcc"] == pytest.approx(s["mcc"], abs=1e-12)
    assert s2["f1"] == pytest.approx(s["f1"], abs=1e-12)


def test_hungarian_beats_greedy_and_unmatched_features_count_zero():
    # Greedy takes 0.9 then 0.1 (mean 0.5); the optimal matching takes 0.8 + 0.85.
    mcc, matched = best_match_mcc([[0.9, 0.8], [0.85, 0.1]])
    assert mcc == pytest.approx(0.825) and list(matched) == [1, 0]
    mcc, matched = best_match_mcc([[0.9], [0.6], [0.3]])
    assert mcc == pytest.approx(0.3) and list(matched) == [0, -1, -1]


def test_fewer_latents_than_features():
    rng = np.random.default_rng(2)
    f = rng.integers(0, 3, size=600)
    z = (f == 1).astype(np.float64)[:, None] * 2.5  # one latent, the indicator of a = 1
    s = score_dictionary(z, {"a": f})
    assert s["num_features"] == 3
    assert s["mcc"] == pytest.approx(1 / 3, abs=1e-9)  # two features unmatched count 0
    assert list(s["matched_latent"]) == [-1, 0, -1]
    assert s["f1"][1] == pytest.approx(1.0)


def test_constant_indicator_dead_latent_and_bad_input():
    f = np.array([2, 2, -1, 2])  # a single value on its defined tokens: no feature
    s = score_dictionary(np.ones((4, 3)), {"f": f})
    assert s["num_features"] == 0 and math.isnan(s["mcc"])
    s = score_dictionary(np.zeros((4, 2)), {"f": np.array([0, 1, 0, 1])})
    assert s["mcc"] == 0.0 and s["f1_mean"] == 0.0
    with pytest.raises(ValueError, match="labels of factor 'f'"):
        score_dictionary(np.zeros((4, 2)), {"f": np.array([0, 1])})
    with pytest.raises(ValueError, match="integers"):
        score_dictionary(np.zeros((2, 2)), {"f": np.array([0.0, 1.0])})
