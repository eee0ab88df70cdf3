"""Token ids, token strings and factor value names of the synthetic factored language
(the language and its generator: `tti_dist.data.synthetic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the config's module imports this one (its vocabulary must fit uint16)
    from tti_dist.data.synthetic_config import FactoredConfig

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
