"""The hand-written GPT -> GPT-2 / GPT-NeoX weight mapping of `tti export --format hf`.

A randomly initialised GPT (every parameter redrawn with std 0.3, LayerNorm weights and
biases included, so a swapped or mis-laid-out tensor moves the logits by O(1)) is mapped
into a transformers model built in memory; its logits over the real vocabulary and its MLP
activations must equal ours to 1e-4 (fp32), for each architecture with tied/biased/GELU and
untied/bias-free/ReLU variants. A deliberately wrong mapping must fail the same comparison.
Also: the options that are refused, and the tokenizers' exactness.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tti_dist.capture import ActivationCapture, resolve_hookpoints
from tti_dist.config.schema import ModelConfig
from tti_dist.data.tokenizer import ByteTokenizer, SyntheticTokenizer, load_pretrained_tokenizer, train_bpe
from tti_dist.errors import ConfigError
from tti_dist.models.gpt import GPT
from tti_dist.train import hf_export
from tti_dist.train.hf_tokenizer import save_hf_tokenizer

TOL = 1e-4
BASE = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=48, vocab_size=300, max_seq_len=24)
VARIANTS = {
    "gpt2": BASE,
    "gpt2_untied_nobias_relu": dataclasses.replace(BASE, tie_embeddings=False, bias=False, mlp_activation="relu"),
    "neox": dataclasses.replace(BASE, position_embedding="rope"),
    "neox_untied_nobias_relu": dataclasses.replace(BASE, position_embedding="rope", tie_embeddings=False, bias=False,
                                                   mlp_activation="relu", rope_base=500.0, layernorm_eps=1e-6),
}


def _random_gpt(cfg: ModelConfig, groups) -> tuple[GPT, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(cfg, groups).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model, {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _hf_mlp_act(hf, i: int):
    return hf.transformer.h[i].mlp.act if hasattr(hf, "transformer") else hf.gpt_neox.layers[i].mlp.act


def _compare(cfg: ModelConfig, model: GPT, hf) -> tuple[float, float]:
    """(max |logit diff| over the real vocabulary, max |mlp.act diff| over all layers)."""
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{i}.mlp.act" for i in range(cfg.num_layers)]
    theirs: dict[int, torch.Tensor] = {}
    handles = [_hf_mlp_act(hf, i).register_forward_hook(lambda m, a, out, i=i: theirs.__setitem__(i, out))
               for i in range(cfg.num_layers)]
    try:
        with torch.no_grad(), ActivationCapture(resolve_hookpoints(model, names, "test")) as cap:
            ours = model(tokens)[..., :cfg.vocab_size]
            hf_logits = hf(tokens).logits
            act = max((cap.captured[n] - theirs[i]).abs().max().item() for i, n in enumerate(names))
    finally:
        for h in handles:
            h.remove()
    assert hf_logits.shape == ours.shape == (3, cfg.max_seq_len, cfg.vocab_size)
    return (hf_logits - ours).abs().max().item(), act


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mapped_model_computes_our_function(groups, name):
    cfg = VARIANTS[name]
    model, state = _random_gpt(cfg, groups)
    hf = hf_export.build_hf_model(cfg, state, eos_id=256)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2") else "GPTNeoXForCausalLM")
    logits_diff, act_diff = _compare(cfg, model, hf)
    assert logits_diff <= TOL and act_diff <= TOL, (logits_diff, act_diff)
    # The padded rows (300 of 384) are cut, and tying is what the config says.
    assert hf.get_input_embeddings().weight.shape == (cfg.vocab_size, cfg.hidden_size)
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert tied == cfg.tie_embeddings


def test_a_wrong_qkv_layout_is_caught(groups):
    """GPT-2's c_attn needs [q|k|v] blocks; copying our head-by-head rows (NeoX's layout) as
    they are must fail the comparison by far more than the tolerance."""
    from transformers import AutoModelForCausalLM

    cfg = VARIANTS["gpt2"]
    model, state = _random_gpt(cfg, groups)
    mapped = hf_export.hf_state_dict(cfg, state)
    for i in range(cfg.num_layers):
        mapped[f"transformer.h.{i}.attn.c_attn.weight"] = state[f"blocks.{i}.attn.qkv.weight"].t().contiguous()
    hf = AutoModelForCausalLM.from_config(hf_export.hf_config(cfg, None)).eval()
    hf.load_state_dict(mapped, strict=False)
    logits_diff, _ = _compare(cfg, model, hf)
    assert logits_diff > 100 * TOL


def test_config_fields():
    gpt2 = hf_export.hf_config(VARIANTS["gpt2_untied_nobias_relu"], eos_id=256)
    assert (gpt2.model_type, gpt2.n_inner, gpt2.activation_function, gpt2.n_positions, gpt2.tie_word_embeddings,
            gpt2.resid_pdrop, gpt2.attn_pdrop, gpt2.embd_pdrop, gpt2.eos_token_id) == (
        "gpt2", 48, "relu", 24, False, 0.0, 0.0, 0.0, 256)
    neox = hf_export.hf_config(VARIANTS["neox_untied_nobias_relu"], eos_id=None)
    assert neox.model_type == "gpt_neox" and neox.use_parallel_residual is False
    assert neox.rope_parameters["rope_theta"] == 500.0 and neox.rope_parameters["partial_rotary_factor"] == 1.0
    assert (neox.attention_bias, neox.hidden_act, neox.layer_norm_eps, neox.hidden_dropout) == (
        False, "relu", 1e-6, 0.0)


@pytest.mark.parametrize("field,value", [("mlp_topk", 8), ("mlp_mask_density", 0.5), ("bottleneck_layer", 1),
                                         ("moe_num_experts", 4)])
def test_options_without_equivalent_are_refused(field, value):
    cfg = dataclasses.replace(BASE, **{field: value})
    with pytest.raises(ConfigError) as err:
        hf_export.check_exportable(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.{field}: {value!r} cannot be exported with --format hf")


def test_byte_tokenizer_is_exact(tmp_path):
    from transformers import AutoTokenizer

    save_hf_tokenizer(ByteTokenizer(), tmp_path, model_max_length=64)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "héllo wörld\n\t  def f(x):  return 😀 \r\n\x00\x7f ünïcödé ∑ end"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert (tok.eos_token_id, tok.bos_token_id, tok.model_max_length) == (256, 256, 64)


def test_bpe_and_synthetic_tokenizers_are_exact(tmp_path):
    from transformers import AutoTokenizer

    docs = [f"line {i}: the quick brown fox {i * 7} jumps <tag> über the lazy dog\n".encode() for i in range(300)]
    bpe = train_bpe(docs, 300)
    save_hf_tokenizer(bpe, tmp_path / "bpe")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
    text = b"".join(docs[:40]).decode()
    assert tok(text)["input_ids"] == bpe.encode(text.encode()).tolist()
    assert tok.eos_token_id == bpe.eos_id
    # The literal EOS text: HF's default makes it EOS; split_special_tokens=True encodes as tti did.
    literal = "a <|endoftext|> b"
    assert bpe.eos_id in tok(literal)["input_ids"]
    exact = AutoTokenizer.from_pretrained(str(tmp_path / "bpe"), split_special_tokens=True)
    assert exact(literal)["input_ids"] == bpe.encode(literal.encode()).tolist()

    syn = SyntheticTokenizer(["<eos>", ".", "NOT", "adj0", "noun1", "verb2"], eos_id=0)
    save_hf_tokenizer(syn, tmp_path / "syn")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "syn"))
    sentence = "noun1 adj0 NOT verb2 . <eos> noun1 verb2 ."
    assert tok(sentence)["input_ids"] == syn.encode(sentence.encode()).tolist() == [4, 3, 2, 5, 1, 0, 4, 5, 1]
    assert tok.decode(tok(sentence)["input_ids"]) == syn.decode(syn.encode(sentence.encode())) == sentence
    assert tok("noun1 unheard")["input_ids"] == [4, 0]  # no unknown-word token: EOS stands in


def test_pretrained_tokenizer_json_is_exact(tmp_path, tokenizer_json):
    """A user's tokenizer.json (NFC normaliser, prefix space, its own special tokens) encodes
    as the dataset builder encoded with it, given add_special_tokens=False."""
    from transformers import AutoTokenizer

    texts = [f"Ünïcode line {i}: café naïve {i * 3}" for i in range(200)]
    path = tokenizer_json(tmp_path / "user.json", ["<s>", "</s>"], texts=texts)
    pretrained = load_pretrained_tokenizer(path)
    save_hf_tokenizer(pretrained, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = "\n".join(texts[:30])
    assert tok(text, add_special_tokens=False)["input_ids"] == pretrained.encode(text.encode()).tolist()
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", pretrained.eos_id)
