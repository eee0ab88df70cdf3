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
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tti_dist.errors import ConfigError

FIELD_PREFIX = "synth"
"""Field-path prefix in error messages (`synth.p_noise: ...`), as the CLI options are named."""

SOURCE_KIND = "synthetic/factored"
"""The dataset manifest's `source.kind` for datasets written by `write_synthetic_dataset`."""

EOS_ID = 0
"""Id of `<eos>`, the end-of-document token; the same for every config."""
PUNCT_ID = 1
"""Id of `.`, the end-of-sentence token."""
NOT_ID = 2
"""Id of `NOT`, the negation marker before a negated verb."""

EOS_TEXT = "<eos>"
PUNCT_TEXT = "."
NOT_TEXT = "NOT"

ROLE_NAMES = ("mod", "subj", "neg", "verb", "obj", "punct")
"""Values of the `role` factor, in id order."""
ROLE_MOD, ROLE_SUBJ, ROLE_NEG, ROLE_VERB, ROLE_OBJ, ROLE_PUNCT = range(len(ROLE_NAMES))

NUMBER_NAMES = ("sg", "pl")
NEGATION_NAMES = ("affirmative", "negated")

FACTOR_NAMES = ("topic", "role", "number", "negation", "attribute")
"""The latent factors, in column order; column `factor_<name>` holds each."""

INACTIVE = -1
"""Value of a factor column where the factor is undefined for the token."""

MAX_VOCAB_SIZE = 1 << 16
"""Token ids are stored as uint16."""


def _field(name: str) -> str:
    return f"{FIELD_PREFIX}.{name}"


@dataclass(frozen=True)
class FactoredConfig:
    """The synthetic factored language and the size of the generated dataset.

    Counts of documents and sentences are exact; probabilities are per draw as described in
    the module docstring. The fields are meant to be the options of `tti data synth factored`.
    """

    seed: int = 0
    """Seed of the generator; the same config gives byte-identical data."""
    num_documents: int = 20_000
    """Documents generated in total (train + val); the default gives about 2.2M tokens."""
    val_fraction: float = 0.05
    """Share of documents in the val split: round(num_documents * val_fraction) documents,
    at least 1; the rest (at least 1) are train. Splits are by whole document."""
    min_sentences: int = 4
    """Fewest sentences in a document (document length is uniform over [min, max] sentences;
    a sentence is 4 to 7 grammar tokens, plus noise)."""
    max_sentences: int = 40
    """Most sentences in a document (inclusive)."""
    num_topics: int = 6
    """Cardinality of the document-level `topic` factor."""
    topic_zipf_exponent: float = 1.0
    """Topic frequencies P(topic = k) proportional to (k + 1) ** -exponent; 0 = uniform."""
    nouns_per_topic: int = 8
    """Noun lemmas per topic; each has a singular and a plural token."""
    verbs_per_topic: int = 6
    """Verb lemmas per topic; each has 4 tokens: {sg, pl} x {affirmative, negated}."""
    lemma_zipf_exponent: float = 1.0
    """Noun and verb lemma frequencies within a topic, proportional to (j + 1) ** -exponent."""
    num_attributes: int = 12
    """Cardinality of the `attribute` factor (modifier tokens adj0..adj{n-1}, shared by all
    topics)."""
    attribute_zipf_exponent: float = 1.0
    """Attribute frequencies proportional to (a + 1) ** -exponent."""
    p_modifier: float = 0.3
    """Probability that a modifier precedes the subject; independently, the object."""
    p_plural: float = 0.3
    """Probability that a subject (object) noun is plural; the verb agrees with the subject."""
    p_negation: float = 0.03
    """Probability that a sentence is negated (the rare factor): `NOT` + a negated verb form."""
    p_noise: float = 0.05
    """Probability that any stream position is a noise token (geometric runs before every
    grammar token); the expected share of noise tokens, in [0, 1)."""
    num_noise_tokens: int = 32
    """Distinct noise tokens <noise0> .. <noise{n-1}>, drawn uniformly."""

    def validate(self) -> FactoredConfig:
        """Raise ConfigError (one line: `synth.<field>: value, what is allowed`); return self."""
        for name in ("seed",):
            _check_int(getattr(self, name), name, minimum=0)
        for name in ("num_documents", "min_sentences", "max_sentences", "num_topics",
                     "nouns_per_topic", "verbs_per_topic", "num_attributes", "num_noise_tokens"):
            _check_int(getattr(self, name), name, minimum=1)
        if self.num_documents < 2:
            raise ConfigError(
                f"{_field('num_documents')}: {self.num_documents!r} is not allowed; use at least 2 "
                "(one train and one val document)"
            )
        if self.max_sentences < self.min_sentences:
            raise ConfigError(
                f"{_field('max_sentences')}: {self.max_sentences!r} is not allowed; use a value >= "
                f"{_field('min_sentences')} ({self.min_sentences})"
            )
        for name in ("topic_zipf_exponent", "lemma_zipf_exponent", "attribute_zipf_exponent"):
            if _check_float(getattr(self, name), name) < 0:
                raise ConfigError(
                    f"{_field(name)}: {getattr(self, name)!r} is not allowed; use a finite value >= 0"
                )
        for name in ("p_modifier", "p_plural", "p_negation"):
            if not 0.0 <= _check_float(getattr(self, name), name) <= 1.0:
                raise ConfigError(
                    f"{_field(name)}: {getattr(self, name)!r} is not allowed; use a probability in [0, 1]"
                )
        if not 0.0 <= _check_float(self.p_noise, "p_noise") < 1.0:
            raise ConfigError(f"{_field('p_noise')}: {self.p_noise!r} is not allowed; use a value in [0, 1)")
        vf = _check_float(self.val_fraction, "val_fraction")
        if not 0.0 < vf < 1.0:
            raise ConfigError(
                f"{_field('val_fraction')}: {self.val_fraction!r} is not allowed; use a value in (0, 1)"
            )
        if self.num_documents - _num_val_documents(self.num_documents, vf) < 1:
            raise ConfigError(
                f"{_field('val_fraction')}: {self.val_fraction!r} leaves no train document out of "
                f"{self.num_documents}; use a smaller value"
            )
        size = VocabLayout.of(self).vocab_size
        if size > MAX_VOCAB_SIZE:
            raise ConfigError(
                f"{_field('num_topics')}: the vocabulary would have {size} tokens (topics x lemmas "
                f"+ attributes + noise); at most {MAX_VOCAB_SIZE} fit the uint16 token column"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (field name -> value), e.g. for a dataset manifest."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FactoredConfig:
        """Build from a dict of field values; an unknown key is a ConfigError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"{_field(str(key))}: unknown option; known: {', '.join(sorted(known))}"
                )
        return cls(**values)


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{_field(name)}: {value!r} is not allowed; use an integer >= {minimum}")
    return int(value)


def _check_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ConfigError(f"{_field(name)}: {value!r} is not allowed; use a finite number")
    return float(value)


def _num_val_documents(num_documents: int, val_fraction: float) -> int:
    return max(1, round(num_documents * val_fraction))


def split_sizes(cfg: FactoredConfig) -> dict[str, int]:
    """Documents per split: {"train": n, "val": m}, m = max(1, round(num_documents * val_fraction))."""
    n_val = _num_val_documents(cfg.num_documents, cfg.val_fraction)
    return {"train": cfg.num_documents - n_val, "val": n_val}


# ---------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class VocabLayout:
    """Where each kind of token lives in the id space (ids are contiguous blocks).

    ``<eos>`` = 0, ``.`` = 1, ``NOT`` = 2, then attributes ``adj{a}``, then nouns
    ``t{k}_noun{j}_{sg|pl}`` (id = noun_base + (k * nouns_per_topic + j) * 2 + n), then verbs
    ``t{k}_verb{j}_{sg|pl}[_neg]`` (id = verb_base + ((k * verbs_per_topic + j) * 2 + n) * 2 + g),
    then noise ``<noise{i}>``.
    """

    num_topics: int
    nouns_per_topic: int
    verbs_per_topic: int
    num_attributes: int
    num_noise_tokens: int

    @classmethod
    def of(cls, cfg: FactoredConfig) -> VocabLayout:
        """The layout of `cfg`'s vocabulary."""
        return cls(cfg.num_topics, cfg.nouns_per_topic, cfg.verbs_per_topic, cfg.num_attributes,
                   cfg.num_noise_tokens)

    @property
    def attribute_base(self) -> int:
        return 3

    @property
    def noun_base(self) -> int:
        return self.attribute_base + self.num_attributes

    @property
    def verb_base(self) -> int:
        return self.noun_base + self.num_topics * self.nouns_per_topic * 2

    @property
    def noise_base(self) -> int:
        return self.verb_base + self.num_topics * self.verbs_per_topic * 4

    @property
    def vocab_size(self) -> int:
        return self.noise_base + self.num_noise_tokens

    def noun_id(self, topic, lemma, number):
        """Id(s) of noun tokens; works elementwise on numpy arrays."""
        return self.noun_base + (topic * self.nouns_per_topic + lemma) * 2 + number

    def verb_id(self, topic, lemma, number, negated):
        """Id(s) of verb tokens; works elementwise on numpy arrays."""
        return self.verb_base + ((topic * self.verbs_per_topic + lemma) * 2 + number) * 2 + negated

    def strings(self) -> list[str]:
        """Token strings in id order (no whitespace, so decode/encode round-trip)."""
        vocab = [EOS_TEXT, PUNCT_TEXT, NOT_TEXT]
        vocab += [f"adj{a}" for a in range(self.num_attributes)]
        for k in range(self.num_topics):
            for j in range(self.nouns_per_topic):
                vocab += [f"t{k}_noun{j}_sg", f"t{k}_noun{j}_pl"]
        for k in range(self.num_topics):
            for j in range(self.verbs_per_topic):
                for n in NUMBER_NAMES:
                    vocab += [f"t{k}_verb{j}_{n}", f"t{k}_verb{j}_{n}_neg"]
        vocab += [f"<noise{i}>" for i in range(self.num_noise_tokens)]
        assert len(vocab) == self.vocab_size
        return vocab


def vocabulary(cfg: FactoredConfig) -> list[str]:
    """Token strings of `cfg`'s language in id order (see `VocabLayout`)."""
    return VocabLayout.of(cfg).strings()


def eos_id(cfg: FactoredConfig | None = None) -> int:
    """Id of the end-of-document token `<eos>` (always `EOS_ID` = 0)."""
    return EOS_ID


def decode(cfg: FactoredConfig, tokens) -> str:
    """Token strings of `tokens` joined by spaces."""
    vocab = vocabulary(cfg)
    return " ".join(vocab[int(t)] for t in np.asarray(tokens).reshape(-1))


# ---------------------------------------------------------------------------------------------
# Distributions and factor specifications


def zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    """P(i) proportional to (i + 1) ** -exponent for i in [0, n), float64, sums to 1."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def _expected_sentences(cfg: FactoredConfig) -> float:
    return (cfg.min_sentences + cfg.max_sentences) / 2.0


def _role_counts_per_sentence(cfg: FactoredConfig) -> np.ndarray:
    """Expected number of tokens of each role per sentence, in ROLE_NAMES order."""
    return np.array([2 * cfg.p_modifier, 1.0, cfg.p_negation, 1.0, 1.0, 1.0])


def _expected_grammar_tokens_per_document(cfg: FactoredConfig) -> float:
    """E[G]: non-noise tokens per document including <eos>."""
    return _expected_sentences(cfg) * float(_role_counts_per_sentence(cfg).sum()) + 1.0


def expected_tokens_per_document(cfg: FactoredConfig) -> float:
    """E[tokens per document] including noise and <eos>: E[G] / (1 - p_noise)."""
    return _expected_grammar_tokens_per_document(cfg) / (1.0 - cfg.p_noise)


def factor_specs(cfg: FactoredConfig) -> dict[str, dict[str, Any]]:
    """Per factor: what it is, its values, its configured frequencies and where it is active.

    Keys of each entry:
      column: the int16 column name (`factor_<name>`).
      values: value names, index = stored value.
      frequencies: P(value | factor active), over the tokens where it is active. Exact
        expectations implied by the config (for `topic` the per-document probabilities, which
        are also the expected per-token shares because document length does not depend on the
        topic; for `role` derived from the grammar; for `number` P(pl) = p_plural on subj and
        obj, and verbs copy the subject's value, so the expectation is the same).
      unit: "document" if the value is drawn once per document, "sentence" if once per
        sentence, "token" if once per token.
      active_roles: the roles (names) of the tokens where the factor is defined; it is -1 on
        every other token, on noise tokens and on <eos>.
      expected_active_fraction: expected share of all stream tokens (noise and <eos>
        included) where the factor is defined.
      description: one line.
    """
    n_sent = _expected_sentences(cfg)
    role_counts = _role_counts_per_sentence(cfg)
    tokens_per_doc = expected_tokens_per_document(cfg)

    def frac(roles: tuple[str, ...]) -> float:
        return float(sum(role_counts[ROLE_NAMES.index(r)] for r in roles) * n_sent / tokens_per_doc)

    all_roles = ROLE_NAMES
    return {
        "topic": {
            "column": "factor_topic",
            "values": [f"topic{k}" for k in range(cfg.num_topics)],
            "frequencies": zipf_probabilities(cfg.num_topics, cfg.topic_zipf_exponent).tolist(),
            "unit": "document",
            "active_roles": list(all_roles),
            "expected_active_fraction": frac(all_roles),
            "description": "document topic: selects the noun and verb tokens of the document",
        },
        "role": {
            "column": "factor_role",
            "values": list(ROLE_NAMES),
            "frequencies": (role_counts / role_counts.sum()).tolist(),
            "unit": "token",
            "active_roles": list(all_roles),
            "expected_active_fraction": frac(all_roles),
            "description": "grammatical role from the sentence grammar [mod] subj [neg] verb [mod] obj punct",
        },
        "number": {
            "column": "factor_number",
            "values": list(NUMBER_NAMES),
            "frequencies": [1.0 - cfg.p_plural, cfg.p_plural],
            "unit": "token",
            "active_roles": ["subj", "verb", "obj"],
            "expected_active_fraction": frac(("subj", "verb", "obj")),
            "description": "singular/plural of a noun; a verb agrees with its subject",
        },
        "negation": {
            "column": "factor_negation",
            "values": list(NEGATION_NAMES),
            "frequencies": [1.0 - cfg.p_negation, cfg.p_negation],
            "unit": "sentence",
            "active_roles": ["verb"],
            "expected_active_fraction": frac(("verb",)),
            "description": "rare factor: the verb is negated (preceded by NOT, negated verb form)",
        },
        "attribute": {
            "column": "factor_attribute",
            "values": [f"adj{a}" for a in range(cfg.num_attributes)],
            "frequencies": zipf_probabilities(cfg.num_attributes, cfg.attribute_zipf_exponent).tolist(),
            "unit": "token",
            "active_roles": ["mod"],
            "expected_active_fraction": frac(("mod",)),
            "description": "which adjective a modifier token is; independent of the topic",
        },
    }


COLUMN_DESCRIPTIONS = {
    "tokens": "token id (uint16); strings in the dataset's vocab.json",
    "factor_topic": "document topic (int16), -1 on noise and <eos>",
    "factor_role": "grammatical role 0=mod 1=subj 2=neg 3=verb 4=obj 5=punct (int16), -1 on noise and <eos>",
    "factor_number": "0=sg 1=pl on subj, verb (agrees with subj) and obj tokens (int16), else -1",
    "factor_negation": "0=affirmative 1=negated on verb tokens (int16), else -1; the rare factor",
    "factor_attribute": "adjective index on mod tokens (int16), else -1",
    "is_noise": "1 on noise tokens, else 0 (int8)",
}
"""What each generated column holds (written into the dataset manifest)."""


# ---------------------------------------------------------------------------------------------
# Generation


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
    _check_int(num_documents, "num_documents", minimum=1)
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


# ---------------------------------------------------------------------------------------------
# Entropies


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
    n = _expected_sentences(cfg)
    g = _expected_grammar_tokens_per_document(cfg)
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
    g = _expected_grammar_tokens_per_document(cfg)
    noise = g * (_binary_entropy(p) + p * math.log(cfg.num_noise_tokens)) / (1.0 - p)
    h_given_topic = h_num_sentences + _expected_sentences(cfg) * sentence + noise
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


# ---------------------------------------------------------------------------------------------
# Dataset writer


def write_synthetic_dataset(cfg: FactoredConfig, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Generate `cfg`'s train and val splits and write them as a tti_dist Arrow dataset.

    Splits are by whole document (`split_sizes`), each from its own generator derived from
    `cfg.seed` (`split_rngs`), so the same config writes byte-identical files. The manifest's
    `source` records the kind "synthetic/factored", the config and the factor specifications.
    Returns what `dataset_writer.write_dataset` returns (the manifest).
    """
    from tti_dist.data.dataset_writer import write_dataset
    from tti_dist.data.tokenizer import SyntheticTokenizer

    cfg.validate()
    splits = generate_splits(cfg)
    sizes = split_sizes(cfg)
    bounds = entropy_bounds(cfg)
    source = {
        "kind": SOURCE_KIND,
        "config": cfg.to_dict(),
        # Through JSON so every value is a plain float/str/list (stable manifest bytes).
        "factors": json.loads(json.dumps(factor_specs(cfg))),
        "entropy_nats_per_token": {
            "entropy_rate": bounds.entropy_rate,
            "oracle_entropy_rate": bounds.oracle_entropy_rate,
            "unigram_entropy": bounds.unigram_entropy,
            "uniform_entropy": bounds.uniform_entropy,
        },
    }
    return write_dataset(
        out_dir,
        splits=splits,
        tokenizer=SyntheticTokenizer(vocabulary(cfg), eos_id(cfg)),
        source=source,
        num_documents=sizes,
        column_descriptions={k: v for k, v in COLUMN_DESCRIPTIONS.items() if k != "tokens"},
        overwrite=overwrite,
    )
