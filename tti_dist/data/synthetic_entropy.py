"""Closed-form entropies of the synthetic language's generative process, and the per-token
loss of its Bayes-optimal next-token predictor (docs/data.md derives them).

Every token is a function of a combination of factors (topic x role x lemma x number x
negation), and the generative state at each position is a deterministic function of the
topic and the tokens so far, so the best achievable next-token loss has a closed form
(`entropy_bounds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_distributions import (
    expected_grammar_tokens_per_document,
    expected_sentences,
    expected_tokens_per_document,
    zipf_probabilities,
)
from tti_dist.data.synthetic_vocab import EOS_ID, NOT_ID, PUNCT_ID, VocabLayout


def _entropy(p) -> float:
    """Shannon entropy in nats of a probability vector (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _binary_entropy(p: float) -> float:
    return _entropy([p, 1.0 - p])


def unigram_entropy(tokens, vocab_size: int) -> float:
    """Plug-in entropy (nats) of the empirical token distribution of `tokens` over `vocab_size` ids.

    The loss of the best context-free predictor on this sample: sum_v -f_v log f_v with f_v
    the share of id v. Ids must lie in [0, vocab_size).
    """
    counts = np.bincount(np.asarray(tokens).reshape(-1).astype(np.int64), minlength=vocab_size)
    if len(counts) > vocab_size:
        raise ValueError(f"token ids reach {len(counts) - 1}, outside vocab_size {vocab_size}")
    return _entropy(counts / counts.sum())


def expected_unigram_distribution(cfg: FactoredConfig) -> np.ndarray:
    """Long-run share of each token id in the stream (float64, sums to 1).

    Expected count of each token per document divided by the expected tokens per document
    (the limit of the empirical frequencies over many documents).
    """
    lay = VocabLayout.of(cfg)
    n = expected_sentences(cfg)
    g = expected_grammar_tokens_per_document(cfg)
    counts = np.zeros(lay.vocab_size, dtype=np.float64)
    topic_p = zipf_probabilities(cfg.num_topics, cfg.topic_zipf_exponent)
    noun_p = zipf_probabilities(cfg.nouns_per_topic, cfg.lemma_zipf_exponent)
    verb_p = zipf_probabilities(cfg.verbs_per_topic, cfg.lemma_zipf_exponent)
    attr_p = zipf_probabilities(cfg.num_attributes, cfg.attribute_zipf_exponent)
    num_p = np.array([1.0 - cfg.p_plural, cfg.p_plural])
    neg_p = np.array([1.0 - cfg.p_negation, cfg.p_negation])
    counts[EOS_ID] = 1.0
    counts[PUNCT_ID] = n
    counts[NOT_ID] = n * cfg.p_negation
    counts[lay.attribute_base:lay.noun_base] = n * 2 * cfg.p_modifier * attr_p
    counts[lay.noun_base:lay.verb_base] = (
        n * 2 * topic_p[:, None, None] * noun_p[None, :, None] * num_p[None, None, :]
    ).reshape(-1)
    counts[lay.verb_base:lay.noise_base] = (
        n * topic_p[:, None, None, None] * verb_p[None, :, None, None]
        * num_p[None, None, :, None] * neg_p[None, None, None, :]
    ).reshape(-1)
    counts[lay.noise_base:] = g * cfg.p_noise / (1.0 - cfg.p_noise) / cfg.num_noise_tokens
    return counts / counts.sum()


@dataclass(frozen=True)
class EntropyBounds:
    """Closed-form entropies of the generative process, in nats per token unless stated.

    All per-token figures are ratios of expectations over documents (the limit of the mean
    loss over a long stream of documents), counting every token of the stream, noise and
    <eos> included, as a next-token target.
    """

    entropy_rate: float
    """The best achievable mean next-token loss for a model that sees each document from its
    start: H(document) / E[tokens per document]. No predictor can do better in expectation."""
    oracle_entropy_rate: float
    """The same if the topic were given in advance: H(document | topic) / E[tokens]; a lower
    bound that differs from `entropy_rate` by H(topic) / E[tokens]."""
    unigram_entropy: float
    """Entropy of the long-run token distribution (`expected_unigram_distribution`): the loss
    of the best predictor that ignores context."""
    uniform_entropy: float
    """log(vocab_size): the loss of a uniform predictor."""
    topic_entropy: float
    """H(topic), nats per document."""
    sentence_entropy: float
    """Entropy of one sentence's grammar tokens given the topic, nats per sentence."""
    expected_tokens_per_document: float
    """E[tokens per document], noise and <eos> included."""
    window_state_entropy: float
    """Nats per training window: an upper bound on what a model loses by seeing a window that
    starts mid-document instead of the whole document. The past reaches the window only
    through the generative state at its start (topic, one of 7 grammar states, the subject's
    number, sentences done), so the loss over a window of L targets is at most
    L * entropy_rate + window_state_entropy, with window_state_entropy = H(topic) + log 7 +
    log 2 + log(max_sentences + 1) >= H(state)."""

    def windowed_entropy_rate_bound(self, seq_len: int) -> float:
        """Upper bound on the best mean loss over windows of `seq_len` targets cut anywhere in
        the stream: entropy_rate + window_state_entropy / seq_len (nats per token)."""
        return self.entropy_rate + self.window_state_entropy / seq_len


def entropy_bounds(cfg: FactoredConfig) -> EntropyBounds:
    """Closed-form entropies of `cfg`'s process (docs/data.md derives them).

    Given the topic, the grammar state at every position is a function of the tokens so far
    (noise tokens are recognisable and leave the state alone; the sentence count enters only
    through the end-of-document decisions), so by the chain rule

      H(doc | topic) = H(N) + E[N] * C + E[G] * (H_b(p) + p log V_noise) / (1 - p)

    with N the sentence count, G the grammar tokens per document (<eos> included), p = p_noise,
    V_noise = num_noise_tokens and C the entropy of a sentence:

      C = 2 [H_b(p_mod) + p_mod H(attr) + H(noun lemma) + H_b(p_plural)] + H_b(p_neg) + H(verb lemma)

    (the verb's number is fixed by the subject). The topic is identified by the first noun or
    verb, and every document has one, so H(doc) = H(doc | topic) + H(topic).
    """
    cfg.validate()
    p = cfg.p_noise
    h_noun = _entropy(zipf_probabilities(cfg.nouns_per_topic, cfg.lemma_zipf_exponent))
    h_verb = _entropy(zipf_probabilities(cfg.verbs_per_topic, cfg.lemma_zipf_exponent))
    h_attr = _entropy(zipf_probabilities(cfg.num_attributes, cfg.attribute_zipf_exponent))
    h_topic = _entropy(zipf_probabilities(cfg.num_topics, cfg.topic_zipf_exponent))
    sentence = (
        2 * (_binary_entropy(cfg.p_modifier) + cfg.p_modifier * h_attr + h_noun
             + _binary_entropy(cfg.p_plural))
        + _binary_entropy(cfg.p_negation) + h_verb
    )
    h_num_sentences = math.log(cfg.max_sentences - cfg.min_sentences + 1)
    g = expected_grammar_tokens_per_document(cfg)
    noise = g * (_binary_entropy(p) + p * math.log(cfg.num_noise_tokens)) / (1.0 - p)
    h_given_topic = h_num_sentences + expected_sentences(cfg) * sentence + noise
    tokens = expected_tokens_per_document(cfg)
    return EntropyBounds(
        entropy_rate=(h_given_topic + h_topic) / tokens,
        oracle_entropy_rate=h_given_topic / tokens,
        unigram_entropy=_entropy(expected_unigram_distribution(cfg)),
        uniform_entropy=math.log(VocabLayout.of(cfg).vocab_size),
        topic_entropy=h_topic,
        sentence_entropy=sentence,
        expected_tokens_per_document=tokens,
        window_state_entropy=h_topic + math.log(7) + math.log(2) + math.log(cfg.max_sentences + 1),
    )


_KIND_EOS, _KIND_PUNCT, _KIND_NOT, _KIND_ATTR, _KIND_NOUN, _KIND_VERB, _KIND_NOISE = range(7)
# Grammar states: what the next grammar token may be.
_ST_START, _ST_SMOD, _ST_SUBJ, _ST_NOT, _ST_VERB, _ST_OMOD, _ST_OBJ = range(7)


def optimal_token_nll(cfg: FactoredConfig, tokens) -> np.ndarray:
    """Per-token loss (nats) of the Bayes-optimal next-token predictor, float64.

    Entry t is -log P(tokens[t] | tokens of its document before t) under the generative
    process, with the topic marginalised over its prior until the first noun or verb of the
    document reveals it. `tokens` must start at a document start (e.g. a whole split); the
    mean over a long stream converges to `entropy_bounds(cfg).entropy_rate`. A token the
    process cannot produce in its context gets +inf. A reference implementation (a plain
    Python loop, about 1 s per million tokens), independent of `generate` and of the closed
    form, so each checks the others.
    """
    cfg.validate()
    lay = VocabLayout.of(cfg)
    V = lay.vocab_size
    kind = np.full(V, _KIND_NOISE, dtype=np.int64)
    topic_of = np.full(V, -1, dtype=np.int64)
    number_of = np.full(V, -1, dtype=np.int64)
    negated_of = np.full(V, -1, dtype=np.int64)
    logp_emit = np.zeros(V)  # log P(token | its kind, topic): lemma x number (x negation) or attribute
    kind[EOS_ID], kind[PUNCT_ID], kind[NOT_ID] = _KIND_EOS, _KIND_PUNCT, _KIND_NOT
    kind[lay.attribute_base:lay.noun_base] = _KIND_ATTR
    logp_emit[lay.attribute_base:lay.noun_base] = np.log(
        zipf_probabilities(cfg.num_attributes, cfg.attribute_zipf_exponent))
    noun_p = zipf_probabilities(cfg.nouns_per_topic, cfg.lemma_zipf_exponent)
    verb_p = zipf_probabilities(cfg.verbs_per_topic, cfg.lemma_zipf_exponent)
    num_p = (1.0 - cfg.p_plural, cfg.p_plural)
    for k in range(cfg.num_topics):
        for j in range(cfg.nouns_per_topic):
            for n in range(2):
                i = lay.noun_id(k, j, n)
                kind[i], topic_of[i], number_of[i] = _KIND_NOUN, k, n
                logp_emit[i] = math.log(noun_p[j] * num_p[n]) if num_p[n] > 0 else -math.inf
        for j in range(cfg.verbs_per_topic):
            for n in range(2):
                for g in range(2):
                    i = lay.verb_id(k, j, n, g)
                    kind[i], topic_of[i], number_of[i], negated_of[i] = _KIND_VERB, k, n, g
                    logp_emit[i] = math.log(verb_p[j])
    log_topic = np.log(zipf_probabilities(cfg.num_topics, cfg.topic_zipf_exponent)).tolist()
    kind_l, topic_l, number_l, neg_l, emit_l = (a.tolist() for a in (kind, topic_of, number_of, negated_of, logp_emit))

    def log(x: float) -> float:
        return math.log(x) if x > 0 else -math.inf

    p = cfg.p_noise
    log_noise = log(p / cfg.num_noise_tokens)
    log_grammar = log(1.0 - p)
    pm, pn = cfg.p_modifier, cfg.p_negation
    lo, hi = cfg.min_sentences, cfg.max_sentences
    ids = np.asarray(tokens).reshape(-1).astype(np.int64).tolist()
    out = np.empty(len(ids), dtype=np.float64)
    state, done, topic, subj_num = _ST_START, 0, -1, -1
    inf = math.inf
    for t, x in enumerate(ids):
        kx = kind_l[x] if 0 <= x < V else -1
        if kx == _KIND_NOISE:
            out[t] = -log_noise
            continue
        lp = -inf
        if state == _ST_START:
            h = 1.0 / (hi - done + 1) if done >= lo else 0.0  # P(N = done | N >= done)
            if kx == _KIND_EOS:
                lp = log(h)
            elif kx == _KIND_ATTR:
                lp, state = log((1.0 - h) * pm) + emit_l[x], _ST_SMOD
            elif kx == _KIND_NOUN:
                lp, state, subj_num = log((1.0 - h) * (1.0 - pm)) + emit_l[x], _ST_SUBJ, number_l[x]
        elif state == _ST_SMOD:
            if kx == _KIND_NOUN:
                lp, state, subj_num = emit_l[x], _ST_SUBJ, number_l[x]
        elif state == _ST_SUBJ:
            if kx == _KIND_NOT:
                lp, state = log(pn), _ST_NOT
            elif kx == _KIND_VERB and neg_l[x] == 0 and number_l[x] == subj_num:
                lp, state = log(1.0 - pn) + emit_l[x], _ST_VERB
        elif state == _ST_NOT:
            if kx == _KIND_VERB and neg_l[x] == 1 and number_l[x] == subj_num:
                lp, state = emit_l[x], _ST_VERB
        elif state == _ST_VERB:
            if kx == _KIND_ATTR:
                lp, state = log(pm) + emit_l[x], _ST_OMOD
            elif kx == _KIND_NOUN:
                lp, state = log(1.0 - pm) + emit_l[x], _ST_OBJ
        elif state == _ST_OMOD:
            if kx == _KIND_NOUN:
                lp, state = emit_l[x], _ST_OBJ
        elif state == _ST_OBJ:
            if kx == _KIND_PUNCT:
                lp, state, done = 0.0, _ST_START, done + 1
        if kx in (_KIND_NOUN, _KIND_VERB) and lp > -inf:
            if topic < 0:
                topic = topic_l[x]
                lp += log_topic[topic]  # the first topic-bearing token reveals the topic
            elif topic_l[x] != topic:
                lp = -inf
        out[t] = -(lp + log_grammar)
        if kx == _KIND_EOS:
            state, done, topic, subj_num = _ST_START, 0, -1, -1
    return out
