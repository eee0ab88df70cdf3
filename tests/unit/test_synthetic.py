"""Tests of the synthetic factored language (tti_dist/data/synthetic*.py).

Statistical checks run on one fixed-seed sample of 5,000 documents (~540k tokens) and use a
tolerance of 4 standard errors. Where draws are independent per token (number on subj/obj,
negation per verb, attribute per modifier, noise per position) the standard error is the
binomial one, sqrt(p (1 - p) / n) over the n tokens where the factor is drawn. The topic is
drawn once per document, so its frequencies are checked over documents. Role shares are
ratios of grammar counts within sentences; their sampling variance is below the binomial
one, so the binomial tolerance is conservative. Means over documents (tokens per document,
optimal loss) use the sample standard deviation of per-document values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from tti_dist.data.dataset_format import MANIFEST_FILE
from tti_dist.data.dataset_reader import open_dataset
from tti_dist.data.synthetic import generate, generate_splits
from tti_dist.data.synthetic_config import FactoredConfig, split_sizes
from tti_dist.data.synthetic_dataset import write_synthetic_dataset
from tti_dist.data.synthetic_distributions import expected_tokens_per_document
from tti_dist.data.synthetic_entropy import (
    entropy_bounds,
    expected_unigram_distribution,
    optimal_token_nll,
    unigram_entropy,
)
from tti_dist.data.synthetic_factors import factor_specs
from tti_dist.data.synthetic_vocab import (
    EOS_ID,
    FACTOR_NAMES,
    NOT_ID,
    PUNCT_ID,
    ROLE_NAMES,
    ROLE_NEG,
    ROLE_OBJ,
    ROLE_PUNCT,
    ROLE_SUBJ,
    ROLE_VERB,
    VocabLayout,
    decode,
    eos_id,
    vocabulary,
)
from tti_dist.errors import ConfigError

NUM_DOCS = 5000
SIGMAS = 4.0
CFG = FactoredConfig()


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    return generate(CFG, NUM_DOCS, np.random.default_rng(1234))


def _doc_index(tokens: np.ndarray) -> np.ndarray:
    """Document number of every token (a document ends with its <eos>)."""
    is_eos = tokens == EOS_ID
    return np.concatenate([[0], np.cumsum(is_eos)[:-1]])


def _within_binomial(count: int, n: int, p: float) -> None:
    sigma = math.sqrt(p * (1 - p) / n)
    freq = count / n
    assert abs(freq - p) <= SIGMAS * sigma + 1e-12, (freq, p, sigma)


# --- determinism and shape --------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs():
    a = generate(CFG, 200, np.random.default_rng(7))
    b = generate(CFG, 200, np.random.default_rng(7))
    c = generate(CFG, 200, np.random.default_rng(8))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert len(a["tokens"]) != len(c["tokens"]) or not np.array_equal(a["tokens"], c["tokens"])


def test_splits_deterministic_from_config_seed():
    cfg = FactoredConfig(num_documents=100, seed=3)
    a, b = generate_splits(cfg), generate_splits(cfg)
    other = generate_splits(dataclasses.replace(cfg, seed=4))
    assert split_sizes(cfg) == {"train": 95, "val": 5}
    for split in ("train", "val"):
        for k in a[split]:
            assert np.array_equal(a[split][k], b[split][k])
        assert (a[split]["tokens"] == EOS_ID).sum() == split_sizes(cfg)[split]
    assert not np.array_equal(a["train"]["tokens"][:500], other["train"]["tokens"][:500])
    assert not np.array_equal(a["train"]["tokens"][:500], a["val"]["tokens"][:500])


def test_columns_names_dtypes_lengths(sample):
    expected = {"tokens": np.uint16, "is_noise": np.int8}
    expected.update({f"factor_{n}": np.int16 for n in FACTOR_NAMES})
    assert set(sample) == set(expected)
    n = len(sample["tokens"])
    assert n > 500_000
    for k, dt in expected.items():
        assert sample[k].dtype == dt and sample[k].shape == (n,), k
    specs = factor_specs(CFG)
    assert [s["column"] for s in specs.values()] == [f"factor_{n}" for n in FACTOR_NAMES]
    assert int(sample["tokens"].max()) < len(vocabulary(CFG))


def test_eos_ends_every_document(sample):
    tok = sample["tokens"]
    is_eos = tok == EOS_ID
    assert is_eos.sum() == NUM_DOCS
    assert tok[-1] == EOS_ID
    assert eos_id(CFG) == EOS_ID == vocabulary(CFG).index("<eos>")
    for name in FACTOR_NAMES:
        assert (sample[f"factor_{name}"][is_eos] == -1).all()
    assert (sample["is_noise"][is_eos] == 0).all()


# --- the grammar --------------------------------------------------------------------------------

_NOUN = re.compile(r"t(\d+)_noun(\d+)_(sg|pl)")
_VERB = re.compile(r"t(\d+)_verb(\d+)_(sg|pl)(_neg)?")
_ADJ = re.compile(r"adj(\d+)")


def _parse_vocab(cfg: FactoredConfig) -> dict[str, np.ndarray]:
    """Per token id, parsed from its string: kind letter, topic, number, negated, attribute."""
    vocab = vocabulary(cfg)
    kind = np.full(len(vocab), "?", dtype="<U1")
    fields = {k: np.full(len(vocab), -1) for k in ("topic", "number", "negation", "attribute")}
    for i, s in enumerate(vocab):
        if m := _NOUN.fullmatch(s):
            kind[i] = "n"
            fields["topic"][i], fields["number"][i] = int(m[1]), m[3] == "pl"
        elif m := _VERB.fullmatch(s):
            kind[i] = "v"
            fields["topic"][i], fields["number"][i] = int(m[1]), m[3] == "pl"
            fields["negation"][i] = m[4] is not None
        elif m := _ADJ.fullmatch(s):
            kind[i], fields["attribute"][i] = "M", int(m[1])
        elif re.fullmatch(r"<noise\d+>", s):
            kind[i] = "z"
        else:
            kind[i] = {"<eos>": "E", ".": "P", "NOT": "N"}[s]
    return {"kind": kind, **fields}


def test_documents_follow_the_grammar(sample):
    parsed = _parse_vocab(CFG)
    tok = sample["tokens"].astype(np.int64)
    kinds = parsed["kind"][tok]
    assert np.array_equal(kinds == "z", sample["is_noise"] == 1)
    clean = "".join(kinds[kinds != "z"].tolist())
    docs = clean.split("E")
    assert docs[-1] == "" and len(docs) == NUM_DOCS + 1
    sentence = re.compile(r"(?:M?nN?vM?nP){%d,%d}" % (CFG.min_sentences, CFG.max_sentences))
    assert all(sentence.fullmatch(d) for d in docs[:-1])
    # The role column names the same grammar, with subject and object told apart.
    letters = np.array(["M", "S", "N", "V", "O", "P"])
    role = sample["factor_role"]
    keep = role >= 0
    role_str = "".join(letters[role[keep]].tolist())
    assert re.fullmatch(r"(?:M?SN?VM?OP)+", role_str)
    kind_of_role = np.array(["M", "n", "N", "v", "n", "P"])
    assert np.array_equal(kind_of_role[role[keep]], kinds[keep])
    assert np.array_equal(keep, (kinds != "z") & (kinds != "E"))


def test_factors_agree_with_token_strings(sample):
    parsed = _parse_vocab(CFG)
    tok = sample["tokens"].astype(np.int64)
    kind = parsed["kind"][tok]
    content = (kind == "n") | (kind == "v")
    for name in ("topic", "number"):
        assert np.array_equal(sample[f"factor_{name}"][content], parsed[name][tok][content]), name
    verb = kind == "v"
    assert np.array_equal(sample["factor_negation"][verb], parsed["negation"][tok][verb])
    mod = kind == "M"
    assert np.array_equal(sample["factor_attribute"][mod], parsed["attribute"][tok][mod])
    # Topic is constant over a document, on every non-noise token but <eos>.
    topic = sample["factor_topic"]
    active = topic >= 0
    doc = _doc_index(sample["tokens"])[active]
    first = np.r_[True, doc[1:] != doc[:-1]]
    per_doc = topic[active][first]
    assert np.array_equal(topic[active], per_doc[np.searchsorted(doc[first], doc)])


def test_verb_agrees_with_subject_and_negation_marks_verb(sample):
    role, number, neg = sample["factor_role"], sample["factor_number"], sample["factor_negation"]
    clean = role >= 0
    r, n, g = role[clean], number[clean], neg[clean]
    tok = sample["tokens"][clean]
    subj_num = n[r == ROLE_SUBJ]
    assert np.array_equal(n[r == ROLE_VERB], subj_num)  # one subj and one verb per sentence
    # NOT precedes exactly the negated verbs (noise aside).
    verb_idx = np.flatnonzero(r == ROLE_VERB)
    prev_is_not = tok[verb_idx - 1] == NOT_ID
    assert np.array_equal(prev_is_not, g[verb_idx] == 1)
    assert (tok == NOT_ID).sum() == (g == 1).sum() == (r == ROLE_NEG).sum()


def test_factors_inactive_exactly_where_documented(sample):
    role = sample["factor_role"]
    noise = sample["is_noise"] == 1
    eos = sample["tokens"] == EOS_ID
    for name, spec in factor_specs(CFG).items():
        col = sample[spec["column"]]
        role_ids = [ROLE_NAMES.index(r) for r in spec["active_roles"]]
        documented = np.isin(role, role_ids) & ~noise & ~eos
        assert np.array_equal(col >= 0, documented), name
        assert ((col == -1) | ((col >= 0) & (col < len(spec["values"])))).all(), name
    assert (role[noise] == -1).all()


# --- frequencies --------------------------------------------------------------------------------


def test_factor_specs_are_distributions():
    for name, spec in factor_specs(CFG).items():
        f = np.asarray(spec["frequencies"])
        assert len(f) == len(spec["values"]) and (f >= 0).all(), name
        assert f.sum() == pytest.approx(1.0, abs=1e-12), name
        assert 0 < spec["expected_active_fraction"] <= 1
        assert spec["unit"] in ("document", "sentence", "token")
    specs = factor_specs(CFG)
    assert specs["negation"]["frequencies"][1] == CFG.p_negation
    assert len(specs["topic"]["values"]) == CFG.num_topics
    assert len(specs["attribute"]["values"]) == CFG.num_attributes


def test_topic_frequencies_per_document(sample):
    topic = sample["factor_topic"]
    active = topic >= 0
    doc = _doc_index(sample["tokens"])[active]
    first = np.r_[True, doc[1:] != doc[:-1]]
    doc_topics = topic[active][first]
    assert len(doc_topics) == NUM_DOCS
    counts = np.bincount(doc_topics, minlength=CFG.num_topics)
    for k, p in enumerate(factor_specs(CFG)["topic"]["frequencies"]):
        _within_binomial(int(counts[k]), NUM_DOCS, p)


@pytest.mark.parametrize("name", ["role", "attribute", "negation"])
def test_token_factor_frequencies(sample, name):
    spec = factor_specs(CFG)[name]
    col = sample[spec["column"]]
    values = col[col >= 0]
    counts = np.bincount(values, minlength=len(spec["values"]))
    for v, p in enumerate(spec["frequencies"]):
        _within_binomial(int(counts[v]), len(values), p)


def test_number_frequency_on_nouns(sample):
    role = sample["factor_role"]
    nouns = (role == ROLE_SUBJ) | (role == ROLE_OBJ)
    plural = sample["factor_number"][nouns]
    _within_binomial(int((plural == 1).sum()), len(plural), CFG.p_plural)
    assert factor_specs(CFG)["number"]["frequencies"] == [1 - CFG.p_plural, CFG.p_plural]


def test_rare_negation_frequency(sample):
    verbs = sample["factor_role"] == ROLE_VERB
    negated = int((sample["factor_negation"][verbs] == 1).sum())
    n = int(verbs.sum())
    assert n > 90_000 and 2_000 < negated < 4_500  # ~0.03 of ~110k verbs
    _within_binomial(negated, n, CFG.p_negation)


def test_noise_rate(sample):
    noise = sample["is_noise"]
    # The noise count given G grammar tokens is negative binomial; its share of the stream has
    # exactly the binomial variance p (1 - p) / n_tokens.
    _within_binomial(int(noise.sum()), len(noise), CFG.p_noise)
    lay = VocabLayout.of(CFG)
    assert (sample["tokens"][noise == 1] >= lay.noise_base).all()
    assert (sample["tokens"][noise == 0] < lay.noise_base).all()


def test_tokens_per_document(sample):
    doc = _doc_index(sample["tokens"])
    lengths = np.bincount(doc)
    se = lengths.std(ddof=1) / math.sqrt(len(lengths))
    assert abs(lengths.mean() - expected_tokens_per_document(CFG)) <= SIGMAS * se


@pytest.mark.parametrize("override,check", [
    ({"p_noise": 0.0}, lambda s: s["is_noise"].sum() == 0),
    ({"p_negation": 0.0}, lambda s: (s["tokens"] != NOT_ID).all()),
    ({"p_negation": 1.0}, lambda s: (s["factor_negation"][s["factor_role"] == ROLE_VERB] == 1).all()),
    ({"p_modifier": 0.0}, lambda s: (s["factor_attribute"] == -1).all()),
    ({"p_plural": 1.0}, lambda s: (s["factor_number"][s["factor_number"] >= 0] == 1).all()),
    ({"min_sentences": 2, "max_sentences": 2}, lambda s: (s["factor_role"] == ROLE_PUNCT).sum() == 2 * 50),
])
def test_edge_probabilities(override, check):
    cfg = dataclasses.replace(CFG, **override)
    assert check(generate(cfg, 50, np.random.default_rng(0)))


# --- vocabulary ---------------------------------------------------------------------------------


def test_vocabulary_decodes(sample):
    from tti_dist.data.tokenizer import SyntheticTokenizer

    vocab = vocabulary(CFG)
    lay = VocabLayout.of(CFG)
    assert len(vocab) == len(set(vocab)) == lay.vocab_size == 287
    assert all(s and not any(c.isspace() for c in s) for s in vocab)
    assert vocab[PUNCT_ID] == "." and vocab[NOT_ID] == "NOT"
    assert vocab[lay.noun_id(2, 3, 1)] == "t2_noun3_pl"
    assert vocab[lay.verb_id(5, 1, 0, 1)] == "t5_verb1_sg_neg"
    assert vocab[lay.noise_base + 17] == "<noise17>"
    doc_end = int(np.flatnonzero(sample["tokens"] == EOS_ID)[0]) + 1
    text = decode(CFG, sample["tokens"][:doc_end])
    assert text.endswith(". <eos>") and text.count("<eos>") == 1
    tok = SyntheticTokenizer(vocab, eos_id(CFG))
    assert tok.decode(sample["tokens"][:doc_end]) == text
    assert np.array_equal(tok.encode(text.encode()), sample["tokens"][:doc_end])


# --- entropies ----------------------------------------------------------------------------------


def test_unigram_entropy_exact_cases():
    for v in (1, 2, 287):
        uniform = np.tile(np.arange(v), 13)
        assert unigram_entropy(uniform, v) == pytest.approx(math.log(v), abs=1e-12)
    assert unigram_entropy(np.full(100, 5), 10) == 0.0
    assert unigram_entropy(np.array([0, 0, 1, 1]), 1000) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        unigram_entropy(np.array([0, 10]), 10)


def test_entropy_bounds_ordering():
    b = entropy_bounds(CFG)
    assert b.oracle_entropy_rate < b.entropy_rate < b.unigram_entropy < b.uniform_entropy
    assert b.uniform_entropy == pytest.approx(math.log(287))
    assert b.entropy_rate - b.oracle_entropy_rate == pytest.approx(
        b.topic_entropy / b.expected_tokens_per_document)
    assert expected_unigram_distribution(CFG).sum() == pytest.approx(1.0)


def _ratio_se(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """sum(num)/sum(den) over documents and its delta-method standard error."""
    r = num.sum() / den.sum()
    resid = num - r * den
    return float(r), float(resid.std(ddof=1) * math.sqrt(len(num)) / den.sum())


def test_optimal_loss_matches_closed_form(sample):
    nll = optimal_token_nll(CFG, sample["tokens"])
    assert np.isfinite(nll).all() and (nll >= 0).all()
    doc = _doc_index(sample["tokens"])
    rate, se = _ratio_se(np.bincount(doc, weights=nll), np.bincount(doc).astype(float))
    bound = entropy_bounds(CFG).entropy_rate
    assert abs(rate - bound) <= SIGMAS * se, (rate, bound, se)
    assert se < 0.01


def test_optimal_loss_other_config():
    cfg = FactoredConfig(p_noise=0.2, p_negation=0.5, p_plural=1.0, p_modifier=0.0,
                         min_sentences=1, max_sentences=3, num_topics=3, topic_zipf_exponent=0.0)
    tokens = generate(cfg, 3000, np.random.default_rng(5))["tokens"]
    nll = optimal_token_nll(cfg, tokens)
    doc = _doc_index(tokens)
    rate, se = _ratio_se(np.bincount(doc, weights=nll), np.bincount(doc).astype(float))
    assert abs(rate - entropy_bounds(cfg).entropy_rate) <= SIGMAS * se
    # A token the process cannot produce in its context costs +inf.
    bad = tokens.copy()
    bad[0] = PUNCT_ID
    assert math.isinf(optimal_token_nll(cfg, bad)[0])


def test_unigram_entropy_matches_expected_distribution():
    # Plug-in entropies of 8 independent chunks, Miller-Madow corrected (+(V_seen - 1) / 2n),
    # against the entropy of the long-run token distribution, within 4 standard errors.
    vocab_size = len(vocabulary(CFG))
    rngs = np.random.default_rng(99).spawn(8)
    estimates = []
    for rng in rngs:
        t = generate(CFG, 600, rng)["tokens"]
        seen = len(np.unique(t))
        estimates.append(unigram_entropy(t, vocab_size) + (seen - 1) / (2 * len(t)))
    est = np.asarray(estimates)
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - entropy_bounds(CFG).unigram_entropy) <= SIGMAS * se


# --- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("p_noise", 1.0), ("p_noise", -0.1), ("p_noise", float("nan")), ("p_negation", 1.5),
    ("p_plural", -1), ("p_modifier", 2.0), ("num_topics", 0), ("nouns_per_topic", 0),
    ("verbs_per_topic", -3), ("num_attributes", 0), ("num_noise_tokens", 0), ("num_documents", 1),
    ("num_documents", 2.5), ("min_sentences", 0), ("val_fraction", 0.0), ("val_fraction", 1.0),
    ("seed", -1), ("seed", True), ("topic_zipf_exponent", -0.5), ("lemma_zipf_exponent", float("inf")),
    ("attribute_zipf_exponent", "1"),
])
def test_invalid_config_names_field(field, value):
    cfg = dataclasses.replace(CFG, **{field: value})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    msg = str(info.value)
    assert msg.startswith(f"synth.{field}: {value!r}"), msg
    assert "\n" not in msg


def test_invalid_config_combinations():
    with pytest.raises(ConfigError, match=r"^synth\.max_sentences: 3 .*synth\.min_sentences \(4\)"):
        FactoredConfig(min_sentences=4, max_sentences=3).validate()
    with pytest.raises(ConfigError, match=r"^synth\.val_fraction: 0\.9 leaves no train document"):
        FactoredConfig(num_documents=2, val_fraction=0.9).validate()
    with pytest.raises(ConfigError, match=r"^synth\.num_topics: .*65536"):
        FactoredConfig(num_topics=1000, nouns_per_topic=40).validate()
    with pytest.raises(ConfigError, match=r"^synth\.p_nois: unknown option"):
        FactoredConfig.from_dict({"p_nois": 0.1})
    with pytest.raises(ConfigError, match=r"^synth\.num_documents"):
        generate(CFG, 0, np.random.default_rng(0))
    assert FactoredConfig.from_dict(CFG.to_dict()) == CFG
    assert CFG.validate() is CFG


def test_config_fields_are_documented():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(FactoredConfig))
    body = tree.body[0].body
    documented = {
        node.target.id for node, nxt in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
        and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
    }
    assert documented == {f.name for f in dataclasses.fields(FactoredConfig)}


# --- the written dataset ------------------------------------------------------------------------


def test_written_dataset_round_trips(tmp_path):
    cfg = FactoredConfig(num_documents=300, val_fraction=0.1, seed=11)
    manifest = write_synthetic_dataset(cfg, tmp_path / "a")
    write_synthetic_dataset(cfg, tmp_path / "b")
    expected = generate_splits(cfg)
    ds = open_dataset(tmp_path / "a")
    assert ds.tokenizer.name == "synthetic" and ds.vocab_size == len(vocabulary(cfg))
    assert ds.eos_id == eos_id(cfg)
    assert ds.splits == ["train", "val"]
    assert set(ds.column_names) == set(expected["train"]) - {"tokens"}
    for split, n_docs in split_sizes(cfg).items():
        assert ds.num_documents(split) == n_docs
        shards = ds.split_shards(split)
        for name, arr in expected[split].items():
            got = np.concatenate([s[name] for s in shards])
            assert got.dtype == arr.dtype and np.array_equal(got, arr), (split, name)
    src = manifest["source"]
    assert src["kind"] == "synthetic/factored" and FactoredConfig.from_dict(src["config"]) == cfg
    assert src["factors"]["negation"]["frequencies"] == [0.97, 0.03]
    assert manifest["columns"]["factor_negation"]["description"]
    # Two writes of the same config are byte-identical, manifest and shards alike.
    a_files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert a_files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in a_files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert json.loads((tmp_path / "a" / MANIFEST_FILE).read_bytes()) == manifest
    with pytest.raises(ConfigError, match="--out"):
        write_synthetic_dataset(cfg, tmp_path / "a")
    write_synthetic_dataset(cfg, tmp_path / "a", overwrite=True)
