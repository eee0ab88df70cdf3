"""`tti circuit`: tasks on the synthetic language, node masks and the pruning search.

(a) A GPT built from a small config with weights set by hand plants a circuit: the task
    (which half of the vocabulary the current token is in) is solved by exactly two MLP
    units, every other unit writes nothing and attention is off; the search must keep
    exactly those two units and no head, at a target that needs both.
(b) The tasks pick the right positions, classes and labels on a generated corpus, checked
    against the factor columns with a plain loop.
(c) The random-label control permutes the labels, keeps every class's count and is fixed
    by its seed.
(d) Bad input is one line naming the option, exit 2, before any work.
(e) The circuit's edges: the planted circuit's 8 weights in closed form, and the vectorised
    count equal to a weight-by-weight loop on a sparse 2-block model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tti_dist.cli import main as cli_main
from tti_dist.config.schema import ModelConfig
from tti_dist.data.synthetic import generate
from tti_dist.data.synthetic_config import FactoredConfig
from tti_dist.data.synthetic_vocab import (
    EOS_ID,
    PUNCT_ID,
    ROLE_OBJ,
    ROLE_SUBJ,
    ROLE_VERB,
    VocabLayout,
    vocabulary,
)
from tti_dist.errors import ConfigError
from tti_dist.eval.circuit_tasks import TaskExamples, random_labels, topic, verb_number

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one intra-op thread is fastest, and on a loaded machine two
    threads make these few-millisecond steps wait on each other (measured 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PLANTED = (3, 11)
"""The MLP units that carry the planted circuit."""


def _planted_model(groups):
    """1 block, d=16, 2 heads, 16 ReLU units. Tokens 0-2 embed as -f, tokens 3-5 as +f
    (f = e2 - e3); unit 3 reads +f, unit 11 reads -f; they write +a*u and -a*u
    (u = e0 - e1), every other unit writes nothing; attention writes nothing; the
    unembedding reads u into tokens 6 (-) and 7 (+). So the logit difference 7 - 6 has the
    sign of the token's half only through units 3 and 11."""
    from tti_dist.models.gpt import GPT

    cfg = ModelConfig(num_layers=1, hidden_size=16, num_heads=2, ffn_hidden_size=16, vocab_size=8,
                      max_seq_len=8, tie_embeddings=False, mlp_activation="relu")
    torch.manual_seed(0)
    model = GPT(cfg, groups)
    f = torch.zeros(16)
    f[2], f[3] = 1.0, -1.0
    u = torch.zeros(16)
    u[0], u[1] = 1.0, -1.0
    a, w = 0.177, 0.5  # LN(f) = 2.83 f: a unit fires at 5.66, so the MLP writes ~1.0 u
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "final_norm.weight":
                p.fill_(1.0)
        model.embedding.weight[:3] = -f
        model.embedding.weight[3:6] = f
        mlp = model.blocks[0].mlp
        mlp.fc1.weight.normal_()          # every unit is active on something ...
        mlp.fc1.weight[PLANTED[0]] = f
        mlp.fc1.weight[PLANTED[1]] = -f
        mlp.fc2.weight[:, PLANTED[0]] = a * u   # ... but only the planted ones write
        mlp.fc2.weight[:, PLANTED[1]] = -a * u
        model.output_layer.weight[6] = -w * u
        model.output_layer.weight[7] = w * u
    return model.eval().requires_grad_(False)


def _planted_data(n_batches=2, batch=8, seq=8):
    from tti_dist.eval.circuit_masks import TaskData

    gen = torch.Generator().manual_seed(1)
    inputs, examples = [], []
    for _ in range(n_batches):
        x = torch.randint(0, 6, (batch, seq), generator=gen)
        rows, pos = torch.meshgrid(torch.arange(batch), torch.arange(seq), indexing="ij")
        classes = torch.tensor([[6], [7]]).expand(batch * seq, 2, 1)
        inputs.append(x)
        examples.append(TaskExamples(rows.flatten(), pos.flatten(), classes, (x >= 3).long().flatten()))
    return TaskData(inputs, examples)


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_pruning_recovers_the_planted_units(groups, ablation):
    from tti_dist.eval.circuit_masks import NodeMasker, evaluate, node_sites, prune, site_means, top_k_gates

    model = _planted_model(groups)
    data = _planted_data()
    sites = node_sites(model, ("mlp", "attn"))
    assert [(s.name, s.num_nodes, s.group) for s in sites] == [("blocks.0.attn.z", 2, 8), ("blocks.0.mlp.act", 16, 1)]
    means = site_means(model, sites, data.inputs) if ablation == "mean" else {
        s.name: torch.zeros(s.num_nodes * s.group) for s in sites}
    order = [(0, 0), (0, 1)] + [(1, i) for i in range(16)]
    with NodeMasker(sites, means) as masker:
        full, full_acc = evaluate(model, masker, data, None)
        one = [evaluate(model, masker, data, top_k_gates(sites, [(1, p)], 1, torch.device("cpu")))[0]
               for p in PLANTED]
        both_only = evaluate(model, masker, data, top_k_gates(sites, [(1, p) for p in PLANTED], 2, torch.device("cpu")))
        everything = evaluate(model, masker, data, top_k_gates(sites, order, 18, torch.device("cpu")))
    # The construction: both units solve the task, either alone does not, the rest is inert.
    assert full_acc == 1.0 and full < 0.03
    assert everything[0] == pytest.approx(full, abs=1e-6)
    assert both_only[0] == pytest.approx(full, abs=1e-5)
    target = 0.04
    assert min(one) > target + 0.02
    result = prune(model, sites, data, target, lambdas=(0.05,), steps=60, lr=0.1, ablation=ablation)
    assert result["reached"]
    assert result["kept"] == {"blocks.0.attn.z": [], "blocks.0.mlp.act": list(PLANTED)}
    assert result["nodes_kept"] == {"mlp": 2, "attn": 0, "all": 2}
    assert result["task_loss"] == pytest.approx(full, abs=1e-5)
    assert result["full_loss"] == pytest.approx(full, abs=1e-6)
    # Edges: each planted unit reads f (2 weights) and writes u (2 weights); attention is all zero.
    # The whole model: fc1 is dense but for the planted rows (14 x 16 + 4), fc2 has only those 4.
    from tti_dist.eval.circuit_edges import circuit_edges

    assert circuit_edges(model, result["kept"]) == {"attn": 0, "mlp": 8, "all": 8}
    assert circuit_edges(model, None) == {"attn": 0, "mlp": 14 * 16 + 4 + 4, "all": 232}


def _brute_force_edges(model, kept: dict) -> dict:
    """The edge rule of tti_dist.eval.circuit_edges, one weight at a time."""
    cfg = model.cfg
    d, heads, hd, L = cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.num_layers

    def on(name, i):
        return name not in kept or i in kept[name]

    attn = mlp = 0
    for i, block in enumerate(model.blocks):
        out = f"blocks.{i + 1}.resid_pre" if i + 1 < L else f"blocks.{i}.resid_post"
        qkv, proj = block.attn.qkv.weight, block.attn.proj.weight
        fc1, fc2 = block.mlp.fc1.weight, block.mlp.fc2.weight
        unit_on = [on(f"blocks.{i}.mlp.act", u) for u in range(cfg.ffn_size)]
        head_on = [on(f"blocks.{i}.attn.z", h) for h in range(heads)]
        read_by_units = [any(unit_on[u] and fc1[u, c] != 0 for u in range(cfg.ffn_size)) for c in range(d)]
        written = [any(head_on[col // hd] and proj[c, col] != 0 for col in range(d)) for c in range(d)]
        for row in range(3 * d):
            for c in range(d):
                attn += bool(qkv[row, c] != 0 and head_on[row // (3 * hd)] and on(f"blocks.{i}.resid_pre", c))
        for c in range(d):
            for col in range(d):
                attn += bool(proj[c, col] != 0 and head_on[col // hd] and (on(out, c) or read_by_units[c]))
            for u in range(cfg.ffn_size):
                mlp += bool(fc1[u, c] != 0 and unit_on[u] and (on(f"blocks.{i}.resid_pre", c) or written[c]))
                mlp += bool(fc2[c, u] != 0 and unit_on[u] and on(out, c))
    return {"attn": attn, "mlp": mlp, "all": attn + mlp}


def test_edges_match_a_weight_by_weight_count(groups):
    """A 2-block model with 70% of its block weights zeroed and random kept nodes of every
    kind: the vectorised count equals a loop over every weight."""
    from tti_dist.eval.circuit_edges import circuit_edges
    from tti_dist.eval.circuit_masks import node_sites
    from tti_dist.models.gpt import GPT

    cfg = ModelConfig(num_layers=2, hidden_size=8, num_heads=2, ffn_hidden_size=12, vocab_size=8, max_seq_len=8)
    torch.manual_seed(2)
    model = GPT(cfg, groups)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("blocks"):
                p.mul_(torch.rand(p.shape, generator=gen) < 0.3)
    sites = node_sites(model)
    assert {s.kind for s in sites} == {"mlp", "attn", "resid"}
    for trial in range(4):
        kept = {s.name: sorted(torch.randperm(s.num_nodes, generator=gen)[:s.num_nodes // 2 + trial % 2].tolist())
                for s in sites if trial < 3 or s.kind != "resid"}  # the last trial leaves the stream unpruned
        assert circuit_edges(model, kept) == _brute_force_edges(model, kept), trial
    full = circuit_edges(model, None)
    assert full == _brute_force_edges(model, {})
    assert full["all"] == sum(int((p != 0).sum()) for n, p in model.named_parameters()
                              if n.startswith("blocks") and p.dim() == 2)


def test_masks_gate_heads_and_residual_channels(groups):
    """A head's gate covers its head_dim channels; ablating every channel of the stream
    entering block 0 leaves the same output at every position (the input is gone)."""
    from tti_dist.eval.circuit_masks import NodeMasker, node_sites, site_means, ste_gate

    model = _planted_model(groups)
    data = _planted_data(n_batches=1)
    x = data.inputs[0]
    sites = node_sites(model)
    assert [s.name for s in sites] == ["blocks.0.resid_pre", "blocks.0.attn.z", "blocks.0.mlp.act",
                                       "blocks.0.resid_post"]
    means = site_means(model, sites, [x])
    with torch.no_grad():
        with NodeMasker(sites, means) as masker:
            masker.gates["blocks.0.resid_pre"] = torch.zeros(16)
            out = model(x)[..., :8]
    assert torch.allclose(out, out[:1, :1].expand_as(out), atol=1e-5)
    assert not torch.allclose(model(x)[..., :8], out)
    head = sites[1]
    z = torch.randn(2, 3, 16)
    hook_masker = NodeMasker([head], {head.name: torch.full((16,), 7.0)})
    hook_masker.gates[head.name] = torch.tensor([1.0, 0.0])
    gated = hook_masker._hook(head)(None, None, z)
    assert torch.equal(gated[..., :8], z[..., :8]) and torch.equal(gated[..., 8:], torch.full((2, 3, 8), 7.0))
    # Straight-through: forward Heaviside, backward sigma'(tau).
    tau = torch.tensor([-0.5, 0.0, 2.0], requires_grad=True)
    g = ste_gate(tau)
    g.sum().backward()
    assert g.tolist() == [0.0, 0.0, 1.0]
    s = torch.sigmoid(tau.detach())
    assert torch.allclose(tau.grad, s * (1 - s))


def test_smallest_circuit_bisection():
    from tti_dist.eval.circuit_masks import smallest_circuit

    losses = [1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.1, 0.05]
    assert smallest_circuit(lambda k: losses[k], 7, 7, 0.3) == 3
    assert smallest_circuit(lambda k: losses[k], 2, 7, 0.1) == 5    # past the trained mask's size
    assert smallest_circuit(lambda k: losses[k], 7, 7, 0.01) is None


# (b) tasks on the generated language ------------------------------------------------------

CFG = FactoredConfig(num_documents=60, min_sentences=2, max_sentences=5).validate()


@pytest.fixture(scope="module")
def synth_batch():
    cols = generate(CFG, 60, np.random.default_rng(3))
    B, T1 = 6, 33
    n = B * T1
    assert len(cols["tokens"]) >= n
    batch = {k: torch.from_numpy(v[:n].astype(np.int64)).view(B, T1) for k, v in cols.items()}
    return batch, VocabLayout.of(CFG), vocabulary(CFG)


def _reference(batch, kind):
    """Positions chosen by each task, by a plain loop over the factor columns."""
    tok, role = batch["tokens"].tolist(), batch["factor_role"].tolist()
    out = []
    for b in range(len(tok)):
        for t in range(len(tok[b]) - 1):
            nxt = role[b][t + 1]
            back = range(t, -1, -1)
            if kind == "verb_number" and nxt == ROLE_VERB:
                for s in back:
                    if role[b][s] == ROLE_SUBJ:
                        out.append((b, t))
                        break
                    if tok[b][s] in (PUNCT_ID, EOS_ID):
                        break
            if kind == "topic" and nxt in (ROLE_SUBJ, ROLE_OBJ):
                for s in back:
                    if role[b][s] in (ROLE_SUBJ, ROLE_VERB, ROLE_OBJ):
                        out.append((b, t))
                        break
                    if tok[b][s] == EOS_ID:
                        break
    return out


def test_verb_number_task(synth_batch):
    batch, layout, vocab = synth_batch
    ex = verb_number(batch["tokens"], batch, layout)
    assert list(zip(ex.rows.tolist(), ex.positions.tolist())) == _reference(batch, "verb_number")
    assert len(ex) >= 10 and ex.classes.shape == (len(ex), 2, 1)
    target = batch["tokens"][ex.rows, ex.positions + 1]
    assert torch.equal(ex.labels, batch["factor_number"][ex.rows, ex.positions + 1])
    assert torch.equal(ex.classes[torch.arange(len(ex)), ex.labels, 0], target)
    for (sg, pl), t in zip(ex.classes[:, :, 0].tolist(), target.tolist()):
        word = vocab[t].replace("_sg", "_{n}").replace("_pl", "_{n}")
        assert (vocab[sg], vocab[pl]) == (word.format(n="sg"), word.format(n="pl"))
    # The subject before each chosen verb has the verb's number (the label is predictable).
    num = batch["factor_number"]
    for b, t, y in zip(ex.rows.tolist(), ex.positions.tolist(), ex.labels.tolist()):
        s = max(i for i in range(t + 1) if batch["factor_role"][b, i] == ROLE_SUBJ)
        assert num[b, s] == y


def test_topic_task(synth_batch):
    batch, layout, vocab = synth_batch
    ex = topic(batch["tokens"], batch, layout)
    assert list(zip(ex.rows.tolist(), ex.positions.tolist())) == _reference(batch, "topic")
    assert len(ex) >= 10 and ex.classes.shape == (len(ex), CFG.num_topics, 2 * CFG.nouns_per_topic)
    target = batch["tokens"][ex.rows, ex.positions + 1]
    assert torch.equal(ex.labels, batch["factor_topic"][ex.rows, ex.positions + 1])
    for k in range(CFG.num_topics):
        names = {vocab[i] for i in ex.classes[0, k].tolist()}
        assert names == {f"t{k}_noun{j}_{n}" for j in range(CFG.nouns_per_topic) for n in ("sg", "pl")}
    for i, t in enumerate(target.tolist()):
        assert t in ex.classes[i, ex.labels[i]].tolist()


# (c) the random-label control -------------------------------------------------------------

def test_random_labels_permute_and_keep_balance(synth_batch):
    batch, layout, _ = synth_batch
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    for task in (verb_number, topic):
        examples = [task(h["tokens"], h, layout) for h in halves]
        shuffled = random_labels(examples, seed=0)
        before = torch.cat([e.labels for e in examples])
        after = torch.cat([e.labels for e in shuffled])
        k = int(before.max()) + 1
        assert torch.equal(torch.bincount(before, minlength=k), torch.bincount(after, minlength=k))
        changed = (before != after).float().mean().item()
        # a random permutation changes sum_c 2 p_c (1 - p_c)-ish of the labels; far from 0
        assert changed > 0.2, changed
        for e, s in zip(examples, shuffled):
            assert torch.equal(e.rows, s.rows) and torch.equal(e.positions, s.positions)
            assert torch.equal(e.classes, s.classes)
        again = torch.cat([e.labels for e in random_labels(examples, seed=0)])
        other = torch.cat([e.labels for e in random_labels(examples, seed=1)])
        assert torch.equal(after, again) and not torch.equal(after, other)


# (d) bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["circuit", "{tmp}/run", "--task", "nope"], "--task: 'nope' is not a task; allowed: topic, verb_number"),
    (["circuit", "{tmp}/missing", "--task", "topic"], "RUN: '{tmp}/missing' is not a tti run directory"),
    (["circuit", "{tmp}/run", "--task", "topic", "--nodes", "mlp,edges"], "--nodes: 'mlp,edges' is not allowed"),
    (["circuit", "{tmp}/run", "--task", "topic", "--lambdas", "0.1,x"], "--lambdas: '0.1,x' is not a comma list"),
    (["circuit", "{tmp}/run", "--task", "topic", "--ablation", "resample"], "--ablation: 'resample' is not allowed"),
    (["circuit", "{tmp}/run", "--task", "topic", "--steps", "0"], "--steps: 0 must be >= 1"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tti: error: ") and message.format(tmp=tmp_path) in err[0], err


def test_run_not_on_the_synthetic_corpus(tmp_path):
    from tti_dist.data.dataset_writer import write_dataset
    from tti_dist.data.synthetic_dataset import write_synthetic_dataset
    from tti_dist.data.tokenizer import ByteTokenizer
    from tti_dist.eval.circuit_plan import synthetic_layout

    tokens = np.frombuffer(b"some text" * 20, dtype=np.uint8).astype(np.int64)
    write_dataset(tmp_path / "text", splits={"train": {"tokens": tokens}, "val": {"tokens": tokens}},
                  tokenizer=ByteTokenizer(), source={"kind": "text"}, num_documents={"train": 1, "val": 1})
    with pytest.raises(ConfigError, match=r"^RUN: the run's data \(.*text\) is 'text'; tti circuit needs the "
                                          r"synthetic corpus \('synthetic/factored'"):
        synthetic_layout(str(tmp_path / "text"))
    write_synthetic_dataset(CFG, tmp_path / "synth")
    assert synthetic_layout(str(tmp_path / "synth")) == VocabLayout.of(CFG)
