"""The synthetic language's distributions: Zipf frequencies, and the expected numbers of
sentences and tokens per document that a config implies.
"""

from __future__ import annotations

import numpy as np

from tti_dist.data.synthetic_config import FactoredConfig


def zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    """P(i) proportional to (i + 1) ** -exponent for i in [0, n), float64, sums to 1."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def expected_sentences(cfg: FactoredConfig) -> float:
    """E[N]: sentences per document (uniform over [min_sentences, max_sentences])."""
    return (cfg.min_sentences + cfg.max_sentences) / 2.0


def role_counts_per_sentence(cfg: FactoredConfig) -> np.ndarray:
    """Expected number of tokens of each role per sentence, in ROLE_NAMES order."""
    return np.array([2 * cfg.p_modifier, 1.0, cfg.p_negation, 1.0, 1.0, 1.0])


def expected_grammar_tokens_per_document(cfg: FactoredConfig) -> float:
    """E[G]: non-noise tokens per document including <eos>."""
    return expected_sentences(cfg) * float(role_counts_per_sentence(cfg).sum()) + 1.0


def expected_tokens_per_document(cfg: FactoredConfig) -> float:
    """E[tokens per document] including noise and <eos>: E[G] / (1 - p_noise)."""
    return expected_grammar_tokens_per_document(cfg) / (1.0 - cfg.p_noise)
