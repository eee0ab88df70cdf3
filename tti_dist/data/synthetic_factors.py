"""The ground truth of the synthetic language: what each factor is, its values and expected
frequencies, where it is active, and what each generated column holds.
"""

from __future__ import annotations

from typing import Any

from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_distributions import (
    expected_sentences,
    expected_tokens_per_document,
    role_counts_per_sentence,
    zipf_probabilities,
)
from tti_dist.data.synthetic_vocab import NEGATION_NAMES, NUMBER_NAMES, ROLE_NAMES


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
    n_sent = expected_sentences(cfg)
    role_counts = role_counts_per_sentence(cfg)
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
