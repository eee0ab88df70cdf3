"""`tti export --format hf` on real runs, opened with transformers, TransformerLens and nnsight.

Three tiny runs are trained with the real `tti train` (concurrently, 3 steps each):
- tp1_bpe:    learned positions, TP=1, a BPE dataset                           -> GPT-2
- tp2_byte:   learned positions, TP=2 (2 ranks), byte dataset, untied output,
              no biases, ReLU                                                   -> GPT-2
- rope_synth: rotary positions, TP=1, the synthetic factored corpus            -> GPT-NeoX
and exported (tp2_byte with `tti export --format hf`, the others by the same function in
this process). On real tokens of each run's validation split, tti's own
forward (a TP=1 GPT holding the consolidated checkpoint) must equal, to 1e-4 in fp32:
the logits of `AutoModelForCausalLM.from_pretrained(DIR)` over the real vocabulary; the
logits and every `blocks.{i}.mlp.hook_post` of TransformerLens' TransformerBridge (as
loaded, and after `enable_compatibility_mode()`, where logits move by a per-position
constant and log-probabilities must still match); the MLP activations nnsight saves
from a trace. The exported tokenizer must encode text exactly as the dataset's did.
Refusals (a top-k model, an existing directory) exit 2 with one line and write nothing.
Everything loads from local files with the hub switched off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tti_dist.utils.environ import environ_set

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TOL = 1e-4
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

TINY = ["parallel.tp_size=1", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2",
        "model.max_seq_len=32", "data.seq_len=32", "train.micro_batch_size=4", "train.steps=3",
        "optim.warmup_steps=1", "train.eval_every=0", "checkpoint.every=0", "logging.progress_bar=false",
        "data.max_bytes=200000"]
RUNS = {
    "tp1_bpe": ["data.tokenizer=bpe", "model.vocab_size=400"],
    "tp2_byte": ["parallel.tp_size=2", "model.tie_embeddings=false", "model.bias=false", "model.mlp_activation=relu"],
    "rope_synth": ["model.position_embedding=rope", "model.rope_base=1000", "model.vocab_size=320"],
}
ARCH = {"tp1_bpe": "GPT2LMHeadModel", "tp2_byte": "GPT2LMHeadModel", "rope_synth": "GPTNeoXForCausalLM"}


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tti_dist.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **OFFLINE})


def _finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{run name: (run dir, export dir)}; and the refusals' results under key 'refusals'."""
    from tti_dist.data.synthetic_config import FactoredConfig
    from tti_dist.data.synthetic_dataset import write_synthetic_dataset
    from tti_dist.train.hf_export import export_hf

    base = tmp_path_factory.mktemp("hf_export")
    write_synthetic_dataset(FactoredConfig(num_documents=300), base / "synth")
    data = {"rope_synth": [f"data.path={base / 'synth'}"]}
    procs = {name: _cli("train", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(base / name),
                        *[a for o in TINY + overrides + data.get(name, []) for a in ("--set", o)])
             for name, overrides in RUNS.items()}
    for name, proc in procs.items():
        code, _, err = _finish(proc)
        assert code == 0, f"{name}: {err[-3000:]}"
    # A top-k model: the tp1_bpe run as if it had been trained with model.mlp_topk: 4.
    topk = base / "topk_run"
    shutil.copytree(base / "tp1_bpe", topk)
    config = yaml.safe_load((topk / "config.yaml").read_text())
    config["model"]["mlp_topk"] = 4
    (topk / "config.yaml").write_text(yaml.safe_dump(config))
    occupied = base / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    # tp2_byte through the CLI, as a user runs it; the other two in this process (the same
    # function, without another interpreter importing megatron-core and transformers).
    cli_export = _cli("export", str(base / "tp2_byte"), "--format", "hf", "--out", str(base / "tp2_byte_hf"))
    refusals = {"topk": _cli("export", str(topk), "--format", "hf", "--out", str(base / "topk_hf")),
                "occupied": _cli("export", str(base / "tp1_bpe"), "--format", "hf", "--out", str(occupied))}
    with environ_set(OFFLINE):
        for name in ("tp1_bpe", "rope_synth"):
            assert export_hf(base / name, base / f"{name}_hf") == base / f"{name}_hf"
    code, stdout, err = _finish(cli_export)
    assert code == 0, err[-3000:]
    assert stdout.strip() == f"wrote {base / 'tp2_byte_hf'}"
    out = {name: (base / name, base / f"{name}_hf") for name in RUNS}
    out["refusals"] = {name: (*_finish(proc), base) for name, proc in refusals.items()}
    return out


@pytest.fixture(scope="module")
def ours(exported):
    """{run name: (tokens [2, seq], logits over the real vocabulary, {layer: mlp.act})} from
    tti's own TP=1 GPT holding the consolidated checkpoint."""
    from tti_dist.capture import ActivationCapture, resolve_hookpoints
    from tti_dist.data.dataset_reader import open_dataset
    from tti_dist.distributed.groups import init_parallel, shutdown_parallel, single_process_env
    from tti_dist.models.gpt import GPT
    from tti_dist.train.export import consolidated_state_dict

    results = {}
    with single_process_env():
        groups = init_parallel(1, torch.device("cpu"), 60)
        try:
            for name in RUNS:
                cfg, state, _ = consolidated_state_dict(exported[name][0])
                model = GPT(cfg.model, groups)
                model.load_state_dict(state, strict=True)
                model.eval()
                seq = cfg.data.seq_len
                val = open_dataset(cfg.data.path, verify=False).split_shards("val")[0]["tokens"]
                tokens = torch.from_numpy(val[:2 * seq].astype("int64")).view(2, seq)
                names = [f"blocks.{i}.mlp.act" for i in range(cfg.model.num_layers)]
                with torch.no_grad(), ActivationCapture(resolve_hookpoints(model, names, "test")) as cap:
                    logits = model(tokens)[..., :cfg.model.vocab_size]
                    acts = {i: cap.captured[n].clone() for i, n in enumerate(names)}
                results[name] = (tokens, logits, acts)
        finally:
            shutdown_parallel()
    return results


@pytest.fixture(scope="module", autouse=True)
def offline():
    with environ_set(OFFLINE):
        yield


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(RUNS))
def test_transformers_logits_equal_ours(exported, ours, name):
    from transformers import AutoModelForCausalLM

    run_dir, out = exported[name]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "tti_export.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "tti_export.json").read_text())
    assert (info["architecture"], info["checkpoint"]) == (ARCH[name], "global_step3")
    assert info["source_run"] == str(run_dir.resolve())
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(model).__name__ == ARCH[name] and model.dtype == torch.float32
    tokens, logits, _ = ours[name]
    with torch.no_grad():
        theirs = model(tokens).logits
    diff = _max_diff(theirs, logits)
    print(f"transformers {name}: max |logit diff| {diff:.3g}")
    assert diff <= TOL, diff
    assert model.config.vocab_size == logits.shape[-1] == info["vocab_size"]


@pytest.mark.parametrize("name", list(RUNS))
def test_tokenizer_encodes_as_the_dataset(exported, ours, name):
    import json as json_module

    from transformers import AutoTokenizer

    from tti_dist.config.load import config_from_dict
    from tti_dist.train.hf_export import run_tokenizer

    run_dir, out = exported[name]
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    dataset_tok = run_tokenizer(cfg.data.path)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == dataset_tok.eos_id
    if dataset_tok.name == "synthetic":
        window = ours[name][0][0]
        text = dataset_tok.decode(window)
        assert tok(text)["input_ids"] == window.tolist()
    else:
        text = Path(json_module.__file__).read_text()  # standard-library source, like the training text
        assert tok(text)["input_ids"] == dataset_tok.encode(text.encode()).tolist()
        assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("name", list(RUNS))
def test_transformer_lens_bridge_equals_ours(exported, ours, name):
    """TransformerLens 3's route for a local HF model: TransformerBridge.boot_transformers(DIR)."""
    from transformer_lens.model_bridge import TransformerBridge

    tokens, logits, acts = ours[name]
    bridge = TransformerBridge.boot_transformers(str(exported[name][1]), device="cpu")
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(tokens)
    diff = _max_diff(tl_logits, logits)
    post = max(_max_diff(cache[f"blocks.{i}.mlp.hook_post"], act) for i, act in acts.items())
    print(f"TransformerBridge {name}: max |logit diff| {diff:.3g}, max |hook_post - mlp.act| {post:.3g}")
    assert diff <= TOL and post <= TOL, (diff, post)
    # HookedTransformer's processing (fold_ln, centred writing weights and unembedding):
    # logits shift by a per-position constant, log-probabilities and MLP activations stay.
    bridge.enable_compatibility_mode(disable_warnings=True)
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(tokens)
    diff = _max_diff(tl_logits.log_softmax(-1), logits.log_softmax(-1))
    post = max(_max_diff(cache[f"blocks.{i}.mlp.hook_post"], act) for i, act in acts.items())
    print(f"TransformerBridge compatibility mode {name}: max |log-prob diff| {diff:.3g}, "
          f"max |hook_post - mlp.act| {post:.3g}")
    assert diff <= TOL and post <= TOL, (diff, post)


@pytest.mark.parametrize("name", ["tp1_bpe", "rope_synth"])
def test_nnsight_trace_saves_our_mlp_activations(exported, ours, name):
    from nnsight import TransformersModel

    tokens, logits, acts = ours[name]
    lm = TransformersModel(str(exported[name][1]), task="text-generation", dispatch=True)
    layers = lm.transformer.h if ARCH[name] == "GPT2LMHeadModel" else lm.gpt_neox.layers
    saved = []
    with lm.trace(tokens):
        # A loop, not a comprehension: nnsight runs the block's code itself and a
        # comprehension's result does not come back out of it.
        for i in range(len(acts)):
            saved.append(layers[i].mlp.act.output.save())
        out = lm.output.logits.save()
    post = max(_max_diff(s, acts[i]) for i, s in enumerate(saved))
    diff = _max_diff(out, logits)
    print(f"nnsight {name}: max |mlp.act diff| {post:.3g}, max |logit diff| {diff:.3g}")
    assert post <= TOL and diff <= TOL, (post, diff)


def test_refusals_write_nothing(exported):
    results = exported["refusals"]
    code, stdout, err = results["topk"][:3]
    base = results["topk"][3]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and stdout == "", err
    assert lines == ["tti: error: model.mlp_topk: 4 cannot be exported with --format hf (a top-k MLP has no "
                     "GPT-2/GPT-NeoX equivalent); use --format tti"], err
    assert not (base / "topk_hf").exists()
    code, _, err = results["occupied"][:3]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == (f"tti: error: --out: '{base / 'occupied'}' already exists and is not an empty directory; "
                        "choose a new directory (tti export never overwrites)")
    assert sorted(p.name for p in (base / "occupied").iterdir()) == ["notes.txt"]
    # No temporary directory is left beside any output.
    assert not [p.name for p in base.iterdir() if ".tmp-" in p.name]

