"""Parameters of the synthetic factored language and of the generated dataset's size
(`FactoredConfig`), checked with one-line errors, and the split of its documents.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tti_dist.data.synthetic_vocab import MAX_VOCAB_SIZE, VocabLayout
from tti_dist.errors import ConfigError

FIELD_PREFIX = "synth"
"""Field-path prefix in error messages (`synth.p_noise: ...`), as the CLI options are named."""


def _field(name: str) -> str:
    return f"{FIELD_PREFIX}.{name}"


@dataclass(frozen=True)
class FactoredConfig:
    """The synthetic factored language and the size of the generated dataset.

    Counts of documents and sentences are exact; probabilities are per draw as described in
    the docstring of `tti_dist.data.synthetic`. The fields are meant to be the options of
    `tti data synth factored`.
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
            check_int(getattr(self, name), name, minimum=0)
        for name in ("num_documents", "min_sentences", "max_sentences", "num_topics",
                     "nouns_per_topic", "verbs_per_topic", "num_attributes", "num_noise_tokens"):
            check_int(getattr(self, name), name, minimum=1)
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


def check_int(value: Any, name: str, *, minimum: int) -> int:
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
