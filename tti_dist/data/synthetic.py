"""A synthetic factored language: token sequences whose latent factors are known per token.

Interpretability metrics (linear probes, MIG, expert specialization, unit monosemanticity)
need ground truth. This module generates a small language from a documented random process
and stores, next to every token, the value of every latent factor that produced it (or -1
where the factor is undefined for that token). docs/data.md describes the process in enough
detail to reimplement it; this docstring is the short version.

Generative process (one document; all draws independent unless stated):

1. ``topic`` ~ Zipf(num_topics, topic_zipf_exponent) and the number of sentences
   ``N ~ Uniform{min_sentences, ..., max_sentences}``.
2. Each of the N sentences is the role sequence ``[mod] subj [neg] verb [mod] obj punct``:
   - an optional modifier (prob. ``p_modifier``) before the subject and, independently,
     before the object; its token ``adj{a}`` carries ``attribute`` a ~ Zipf(num_attributes,
     attribute_zipf_exponent) and does not depend on the topic;
   - subject and object nouns: lemma j ~ Zipf(nouns_per_topic, lemma_zipf_exponent),
     ``number`` n ~ Bernoulli(p_plural) (0 = sg, 1 = pl), token ``t{topic}_noun{j}_{sg|pl}``;
   - ``negation`` g ~ Bernoulli(p_negation); if g = 1 the token ``NOT`` precedes the verb;
   - the verb: lemma j ~ Zipf(verbs_per_topic, lemma_zipf_exponent), agreeing in number
     with the subject, token ``t{topic}_verb{j}_{sg|pl}`` or ``t{topic}_verb{j}_{sg|pl}_neg``
     when negated (so negation changes the following tokens: ``NOT`` and the verb form);
   - ``punct`` is the token ``.``.
3. ``<eos>`` ends the document.
4. Noise: before every grammar token (including ``<eos>``) a run of K noise tokens is
   inserted, K ~ Geometric with P(K = k) = (1 - p_noise) p_noise^k; each is uniform over
   ``<noise0>`` .. ``<noise{num_noise_tokens - 1}>``. Equivalently every position is noise with
   probability p_noise, independently, and noise never changes the grammar state. So the
   expected share of noise tokens in the stream is exactly p_noise.

Factor columns (int16, -1 = inactive): ``factor_topic`` (every non-noise token but EOS),
``factor_role`` (same tokens), ``factor_number`` (subj, verb, obj), ``factor_negation``
(verb only; the rare factor), ``factor_attribute`` (mod only). Noise and EOS tokens have -1
in every factor column; ``is_noise`` (int8) is 1 exactly on noise tokens.

Every token is a function of a combination of factors (topic x role x lemma x number x
negation), and the generative state at each position is a deterministic function of the
topic and the tokens so far, so the best achievable next-token loss has a closed form
(`entropy_bounds`).

This module is the generator (`generate`, `generate_splits`). Beside it:
`synthetic_config` (`FactoredConfig`, `split_sizes`), `synthetic_vocab` (token ids and
strings, `VocabLayout`), `synthetic_distributions` (Zipf frequencies, expected counts),
`synthetic_factors` (`factor_specs`: the ground truth's definition), `synthetic_entropy`
(`entropy_bounds`, `optimal_token_nll`) and `synthetic_dataset` (`write_synthetic_dataset`).
"""

from __future__ import annotations

import numpy as np

from tti_dist.data.synthetic_config import FactoredConfig, check_int, split_sizes
from tti_dist.data.synthetic_distributions import zipf_probabilities
from tti_dist.data.synthetic_vocab import (
    EOS_ID,
    FACTOR_NAMES,
    INACTIVE,
    NOT_ID,
    PUNCT_ID,
    ROLE_MOD,
    ROLE_NEG,
    ROLE_OBJ,
    ROLE_PUNCT,
    ROLE_SUBJ,
    ROLE_VERB,
    VocabLayout,
)


def _categorical(rng: np.random.Generator, probs: np.ndarray, size: int) -> np.ndarray:
    """`size` iid draws from `probs` by inverse CDF (int64)."""
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(size), side="right").astype(np.int64)


def _bernoulli(rng: np.random.Generator, p: float, size: int) -> np.ndarray:
    return (rng.random(size) < p).astype(np.int64)


def generate(cfg: FactoredConfig, num_documents: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Generate `num_documents` documents of the language, concatenated, with their factors.

    Returns columns of equal length: `tokens` (uint16), `factor_<name>` for each name in
    `FACTOR_NAMES` (int16, -1 where inactive) and `is_noise` (int8). Every document ends with
    `<eos>`. Draws are vectorized over all documents; the result depends only on `cfg`,
    `num_documents` and the state of `rng`.
    """
    cfg.validate()
    check_int(num_documents, "num_documents", minimum=1)
    lay = VocabLayout.of(cfg)
    D = int(num_documents)

    doc_topic = _categorical(rng, zipf_probabilities(cfg.num_topics, cfg.topic_zipf_exponent), D)
    n_sent = rng.integers(cfg.min_sentences, cfg.max_sentences + 1, size=D)
    S = int(n_sent.sum())
    topic = np.repeat(doc_topic, n_sent)

    noun_p = zipf_probabilities(cfg.nouns_per_topic, cfg.lemma_zipf_exponent)
    verb_p = zipf_probabilities(cfg.verbs_per_topic, cfg.lemma_zipf_exponent)
    attr_p = zipf_probabilities(cfg.num_attributes, cfg.attribute_zipf_exponent)
    s_mod = _bernoulli(rng, cfg.p_modifier, S)
    s_attr = _categorical(rng, attr_p, S)
    s_lemma = _categorical(rng, noun_p, S)
    s_num = _bernoulli(rng, cfg.p_plural, S)
    neg = _bernoulli(rng, cfg.p_negation, S)
    v_lemma = _categorical(rng, verb_p, S)
    o_mod = _bernoulli(rng, cfg.p_modifier, S)
    o_attr = _categorical(rng, attr_p, S)
    o_lemma = _categorical(rng, noun_p, S)
    o_num = _bernoulli(rng, cfg.p_plural, S)
    last = np.zeros(S, dtype=np.int64)
    last[np.cumsum(n_sent) - 1] = 1

    # Slots of a sentence row: [mod] subj [NOT] verb [mod] obj . [<eos> if last sentence]
    ones = np.ones(S, dtype=np.int64)
    off = np.full(S, INACTIVE, dtype=np.int64)
    present = np.stack([s_mod, ones, neg, ones, o_mod, ones, ones, last], axis=1).astype(bool)
    attr_ids = lay.attribute_base
    tok = np.stack([
        attr_ids + s_attr,
        lay.noun_id(topic, s_lemma, s_num),
        np.full(S, NOT_ID),
        lay.verb_id(topic, v_lemma, s_num, neg),
        attr_ids + o_attr,
        lay.noun_id(topic, o_lemma, o_num),
        np.full(S, PUNCT_ID),
        np.full(S, EOS_ID),
    ], axis=1)
    role = np.broadcast_to(
        np.array([ROLE_MOD, ROLE_SUBJ, ROLE_NEG, ROLE_VERB, ROLE_MOD, ROLE_OBJ, ROLE_PUNCT, INACTIVE]),
        (S, 8),
    )
    factors = {
        "topic": np.stack([topic] * 7 + [off], axis=1),
        "role": role,
        "number": np.stack([off, s_num, off, s_num, off, o_num, off, off], axis=1),
        "negation": np.stack([off, off, off, neg, off, off, off, off], axis=1),
        "attribute": np.stack([s_attr, off, off, off, o_attr, off, off, off], axis=1),
    }
    g_tok = tok[present]
    g_fac = {name: f[present] for name, f in factors.items()}
    G = len(g_tok)

    # Noise: a geometric run of noise tokens before every grammar token (including <eos>).
    if cfg.p_noise > 0:
        run = rng.geometric(1.0 - cfg.p_noise, size=G) - 1
    else:
        run = np.zeros(G, dtype=np.int64)
    pos = np.arange(G) + np.cumsum(run)
    total = G + int(run.sum())
    is_noise = np.ones(total, dtype=bool)
    is_noise[pos] = False
    tokens = np.empty(total, dtype=np.uint16)
    tokens[pos] = g_tok
    n_noise = total - G
    tokens[is_noise] = lay.noise_base + rng.integers(0, cfg.num_noise_tokens, size=n_noise)

    out: dict[str, np.ndarray] = {"tokens": tokens}
    for name in FACTOR_NAMES:
        col = np.full(total, INACTIVE, dtype=np.int16)
        col[pos] = g_fac[name]
        out[f"factor_{name}"] = col
    out["is_noise"] = is_noise.astype(np.int8)
    return out


def split_rngs(cfg: FactoredConfig) -> dict[str, np.random.Generator]:
    """Independent generators for the train and val splits, derived from `cfg.seed`."""
    train_ss, val_ss = np.random.SeedSequence(cfg.seed).spawn(2)
    return {"train": np.random.default_rng(train_ss), "val": np.random.default_rng(val_ss)}


def generate_splits(cfg: FactoredConfig) -> dict[str, dict[str, np.ndarray]]:
    """Train and val columns of `cfg`'s dataset (`split_sizes` documents each, own generators)."""
    cfg.validate()
    rngs = split_rngs(cfg)
    return {split: generate(cfg, n, rngs[split]) for split, n in split_sizes(cfg).items()}
