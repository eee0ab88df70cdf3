"""A run's dataset tokenizer as HuggingFace tokenizer files (`tti export --format hf`).

`save_hf_tokenizer(tokenizer, directory)` writes `tokenizer.json` and `tokenizer_config.json`
(transformers' `PreTrainedTokenizerFast.save_pretrained`, EOS set), so
`AutoTokenizer.from_pretrained(directory)` and `PreTrainedTokenizerFast(tokenizer_file=...)`
load it offline. Every tokenizer of tti_dist.data.tokenizer has an exact equivalent:

- bpe / pretrained: the dataset's own `tokenizer.json`, byte for byte.
- byte (ids 0..255 are the bytes, 256 is EOS): a byte-level BPE with no merges whose 256
  base symbols are GPT-2's byte-to-unicode characters numbered by their byte value, plus
  the special token `<|eos|>` = 256. Any str encodes to exactly its UTF-8 bytes.
- synthetic: a word-level vocabulary (token i is the dataset's word i) split on whitespace;
  EOS is its `<eos>` word. The vocabulary has no unknown-word token and HF's word-level
  model needs one (TransformerLens probes the tokenizer with "a"), so a word outside it
  encodes to `<eos>`, where tti's SyntheticTokenizer raises.

One difference from tti's own encoders, HF's default added-token handling: text that
contains the EOS string literally (e.g. "<|endoftext|>") encodes to the EOS id, where tti's
dataset builder keeps it as ordinary text; `AutoTokenizer.from_pretrained(dir,
split_special_tokens=True)` encodes exactly as the builder did (docs/interop.md). A
pretrained tokenizer.json may also carry a post-processor (BOS/EOS templates) that the
builder did not apply: `add_special_tokens=False` reproduces the training ids.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from tti_dist.data.tokenizer import BPETokenizer, ByteTokenizer, SyntheticTokenizer, Tokenizer

BYTE_EOS_TEXT = "<|eos|>"
"""Text of the byte tokenizer's EOS (id 256) in the exported tokenizer (tti's `decode_tokens`
renders it as this string between newlines)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable characters (Radford et al. 2019,
    openai/gpt-2 encoder.py), the alphabet of the `tokenizers` ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def byte_hf_tokenizer() -> HFTokenizer:
    """The byte tokenizer as a `tokenizers.Tokenizer`: encode(text).ids == list(text.encode())."""
    symbols = _bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    # No regex split and no prefix space: every byte of the text is one symbol, in order.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS_TEXT, special=True)])
    return tok


def synthetic_hf_tokenizer(tokenizer: SyntheticTokenizer) -> HFTokenizer:
    """The synthetic corpus' words as a word-level `tokenizers.Tokenizer` (whitespace split;
    decoding joins tokens with single spaces, as SyntheticTokenizer.decode does; unknown
    words encode to EOS)."""
    vocab = {word: i for i, word in enumerate(tokenizer.vocab)}
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=tokenizer.vocab[tokenizer.eos_id]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(tokenizer.vocab[tokenizer.eos_id], special=True)])
    return tok


def hf_tokenizer(tokenizer: Tokenizer) -> tuple[HFTokenizer, str]:
    """(`tokenizers.Tokenizer`, EOS text) equivalent to a dataset tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_hf_tokenizer(), BYTE_EOS_TEXT
    if isinstance(tokenizer, BPETokenizer):  # PretrainedTokenizer too: the file as given
        return HFTokenizer.from_str(tokenizer.to_bytes().decode("utf-8")), tokenizer.eos_token
    if isinstance(tokenizer, SyntheticTokenizer):
        return synthetic_hf_tokenizer(tokenizer), tokenizer.vocab[tokenizer.eos_id]
    raise TypeError(f"no HuggingFace equivalent of tokenizer {tokenizer.name!r}")


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, model_max_length: int | None = None) -> list[str]:
    """Write the HF tokenizer files of `tokenizer` into `directory`; returns their names.
    `model_max_length`: the model's context (model.max_seq_len), for truncation.

    BOS is set to EOS as in GPT-2 (documents are separated by EOS, so it is what precedes a
    document's first token in training); no template adds it, so plain `tokenizer(text)`
    gives the training ids.
    """
    # lazy: transformers takes seconds to import; only the hf export needs it
    from transformers import PreTrainedTokenizerFast

    tok, eos = hf_tokenizer(tokenizer)
    if tok.token_to_id(eos) != tokenizer.eos_id:
        raise RuntimeError(f"exported tokenizer maps EOS {eos!r} to {tok.token_to_id(eos)}, not {tokenizer.eos_id}")
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, **extra)
    return [Path(f).name for f in fast.save_pretrained(str(directory))]
