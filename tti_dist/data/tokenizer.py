"""Tokenizers behind one small interface: byte-level, locally trained byte-level BPE, synthetic.

Every tokenizer has a `name` ("byte" | "bpe" | "pretrained" | "synthetic"), a `vocab_size`, an `eos_id`
(the end-of-document token the dataset writer appends after each document), `encode(bytes)`
returning uint32 ids (without EOS), `decode(ids)` returning text, and `save(dir)` writing
what is needed to rebuild it into a dataset directory and returning the manifest's
`tokenizer` entry. `load_tokenizer(dataset_dir, info)` rebuilds it from that entry, checking
the saved file's sha256, so every rank decodes with exactly the tokenizer the data was built
with.

- `ByteTokenizer`: ids 0..255 are bytes, 256 is EOS (vocabulary 257).
  No file.
- `BPETokenizer`: byte-level BPE trained locally with HuggingFace `tokenizers` (`train_bpe`);
  saved as `tokenizer.json`. The special token `<|endoftext|>` is EOS. Text that happens to
  contain the string "<|endoftext|>" is encoded as ordinary bytes, never as EOS.
- `PretrainedTokenizer`: any HuggingFace `tokenizers` JSON file (e.g. GPT-2's), loaded with
  `load_pretrained_tokenizer`; saved as `tokenizer.json`, a verbatim copy of the file, so the
  manifest's sha256 is the original file's. EOS is `eos_token` if given, else the first of
  `EOS_TOKEN_CANDIDATES` that the file declares as a special token. Documents are encoded
  without the file's post-processor (no BOS/EOS templates: the writer adds EOS) and with
  special-token text kept as ordinary text; otherwise ids are exactly the library's.
- `SyntheticTokenizer`: a given list of token strings (for generated corpora); saved as
  `vocab.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tti_dist.errors import ConfigError

logger = logging.getLogger(__name__)

BPE_EOS_TEXT = "<|endoftext|>"
"""The BPE tokenizer's end-of-document special token."""

BPE_FILE = "tokenizer.json"
SYNTHETIC_FILE = "vocab.json"

MIN_BPE_VOCAB_SIZE = 256 + 1 + 1
"""256 byte symbols + `<|endoftext|>` + at least one merge."""

MAX_BPE_VOCAB_SIZE = 1 << 20
"""A sanity bound (1,048,576); above 65,536 token columns are stored as uint32."""


EOS_TOKEN = 256
"""End-of-document id of the byte-level tokenizer."""
BYTE_VOCAB_SIZE = 257
"""256 byte values + end-of-document."""
_EOS_TEXT = "\n<|eos|>\n"


def decode_tokens(tokens) -> str:
    """Text of a token sequence (numpy array, torch tensor or list of ints).

    Byte runs are decoded as UTF-8 with errors="replace"; `EOS_TOKEN` is rendered as
    "\\n<|eos|>\\n". Ids outside the byte vocabulary (a model whose embedding is padded past
    `BYTE_VOCAB_SIZE` can sample them) render as U+FFFD so sampled text always decodes.
    """
    if hasattr(tokens, "detach"):
        # A torch tensor may live on an accelerator; numpy can only read host memory.
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens).astype(np.int64, copy=False).reshape(-1)
    parts: list[str] = []
    start = 0
    for pos in np.flatnonzero((ids < 0) | (ids > 255)).tolist():
        if pos > start:
            parts.append(ids[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        parts.append(_EOS_TEXT if ids[pos] == EOS_TOKEN else "\ufffd")
        start = pos + 1
    if start < len(ids):
        parts.append(ids[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
    return "".join(parts)

@runtime_checkable
class Tokenizer(Protocol):
    """What the dataset layer needs from a tokenizer."""

    name: str
    """"byte", "bpe", "pretrained" or "synthetic"."""
    vocab_size: int
    """Number of token ids (all ids are in [0, vocab_size))."""
    eos_id: int
    """End-of-document id, appended after every document by the dataset writer."""

    def encode(self, text: bytes) -> np.ndarray:
        """uint32 ids of a document's UTF-8 bytes (no EOS appended)."""
        ...

    def decode(self, ids) -> str:
        """Text of a sequence of ids (numpy array, torch tensor or list of ints)."""
        ...

    def save(self, directory: str | Path) -> dict:
        """Write the tokenizer's file (if any) into `directory`; return the manifest entry."""
        ...


def _as_int_array(ids) -> np.ndarray:
    if hasattr(ids, "detach"):
        # A torch tensor may live on an accelerator; numpy only reads host memory.
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).astype(np.int64, copy=False).reshape(-1)


def _write_bytes(directory: str | Path, name: str, data: bytes) -> str:
    (Path(directory) / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _info(tok: Tokenizer, file: str | None, sha256: str | None) -> dict:
    return {"name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "file": file,
            "sha256": sha256}


class ByteTokenizer:
    """Ids 0..255 are the bytes themselves, 256 is EOS; exact and reversible, needs no file."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = EOS_TOKEN

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, dtype=np.uint8).astype(np.uint32)

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """UTF-8 (errors="replace"); EOS renders as "\\n<|eos|>\\n", other ids >= 257 as U+FFFD."""
        return decode_tokens(ids)

    def save(self, directory: str | Path) -> dict:
        return _info(self, None, None)


class BPETokenizer:
    """Byte-level BPE (HuggingFace `tokenizers`); EOS is the `<|endoftext|>` special token."""

    name = "bpe"

    def __init__(self, hf_tokenizer, eos_token: str = BPE_EOS_TEXT) -> None:
        """Wrap a `tokenizers.Tokenizer` built by `train_bpe` or loaded from `tokenizer.json`;
        `eos_token` is the text of its end-of-document token."""
        eos_id = hf_tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"the tokenizer has no {eos_token!r} token")
        # Document text containing "<|endoftext|>" must stay ordinary bytes; the writer adds EOS.
        hf_tokenizer.encode_special_tokens = True
        self._hf = hf_tokenizer
        self.vocab_size: int = _hf_vocab_size(hf_tokenizer)
        self.eos_id: int = eos_id
        self.eos_token: str = eos_token

    @property
    def hf_tokenizer(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._hf

    @staticmethod
    def _text(text: bytes) -> str:
        # Byte-level BPE works on str; invalid UTF-8 becomes U+FFFD (build.py warns about it).
        return text.decode("utf-8", errors="replace")

    def encode(self, text: bytes) -> np.ndarray:
        return np.asarray(self._hf.encode(self._text(text), add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        """Like `encode` per text, using the library's parallel batch encoder."""
        encodings = self._hf.encode_batch_fast([self._text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids) -> str:
        """Text of ids; EOS renders as "<|endoftext|>", ids outside the vocabulary as U+FFFD."""
        ids = _as_int_array(ids)
        parts: list[str] = []
        start = 0
        # A model whose embedding is padded past vocab_size can sample ids the tokenizer lacks.
        for pos in np.flatnonzero((ids < 0) | (ids >= self.vocab_size)).tolist():
            if pos > start:
                parts.append(self._hf.decode(ids[start:pos].tolist(), skip_special_tokens=False))
            parts.append("\ufffd")
            start = pos + 1
        if start < len(ids):
            parts.append(self._hf.decode(ids[start:].tolist(), skip_special_tokens=False))
        return "".join(parts)

    def to_bytes(self) -> bytes:
        """The `tokenizer.json` contents."""
        return self._hf.to_str(pretty=True).encode("utf-8")

    def save(self, directory: str | Path) -> dict:
        return _info(self, BPE_FILE, _write_bytes(directory, BPE_FILE, self.to_bytes()))


class PretrainedTokenizer(BPETokenizer):
    """A HuggingFace `tokenizers` JSON file used as is; see `load_pretrained_tokenizer`."""

    name = "pretrained"

    def __init__(self, raw: bytes, eos_token: str) -> None:
        """`raw`: the tokenizer.json bytes; `eos_token`: the text of its end-of-document token."""
        super().__init__(HFTokenizer.from_str(raw.decode("utf-8")), eos_token)
        self._raw = raw

    def to_bytes(self) -> bytes:
        """The file exactly as given (not re-serialised), so its sha256 identifies it."""
        return self._raw

    def save(self, directory: str | Path) -> dict:
        info = _info(self, BPE_FILE, _write_bytes(directory, BPE_FILE, self._raw))
        info["eos_token"] = self.eos_token
        return info


def _hf_vocab_size(hf_tokenizer) -> int:
    """One past the largest id: a file may number added tokens past its base vocabulary."""
    ids = hf_tokenizer.get_vocab(with_added_tokens=True).values()
    return max(hf_tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


EOS_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
"""End-of-document tokens recognised in a pretrained tokenizer.json, in order of preference:
the first one the file declares as a *special* added token is EOS (GPT-2/GPT-NeoX,
Llama 3, Llama 2/Mistral/T5, Gemma). A plain vocabulary entry never qualifies, because
document text could produce it."""


def _special_tokens(hf_tokenizer) -> list[str]:
    decoder = hf_tokenizer.get_added_tokens_decoder()
    return [decoder[i].content for i in sorted(decoder) if decoder[i].special]


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) or "none"
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_pretrained_tokenizer(path: str | Path, eos_token: str | None = None, *,
                              field: str = "--tokenizer", eos_field: str = "--eos-token") -> PretrainedTokenizer:
    """A HuggingFace `tokenizers` JSON file as a dataset tokenizer.

    The end-of-document token is `eos_token` when given (any token of the file), else the
    first of `EOS_TOKEN_CANDIDATES` among the file's special tokens.

    Raises:
        ConfigError (naming `field`, or `eos_field` for the EOS token): the file is missing
            or not a tokenizers JSON file, `eos_token` is not one of its tokens, or no EOS
            token can be determined.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: {str(path)!r} does not exist or is not a file; "
                          "use byte, bpe or a path to a HuggingFace tokenizer .json file")
    raw = path.read_bytes()
    try:
        hf = HFTokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"{field}: {str(path)!r} is not a HuggingFace tokenizers JSON file ({first})"
        ) from None
    specials = _special_tokens(hf)
    if eos_token is not None:
        if not isinstance(eos_token, str) or not eos_token or hf.token_to_id(eos_token) is None:
            raise ConfigError(
                f"{eos_field}: {eos_token!r} is not a token of {str(path)!r}; "
                f"its special tokens: {_listing(specials)}"
            )
    else:
        eos_token = next((t for t in EOS_TOKEN_CANDIDATES if t in specials), None)
        if eos_token is None:
            raise ConfigError(
                f"{field}: {str(path)!r} has no end-of-document token: none of its special tokens "
                f"({_listing(specials)}) is one of {', '.join(EOS_TOKEN_CANDIDATES)}; name one with {eos_field}"
            )
    return PretrainedTokenizer(raw, eos_token)


def check_bpe_vocab_size(vocab_size) -> int:
    """`vocab_size` if it is an allowed BPE vocabulary size, else ConfigError naming --vocab-size."""
    if (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
            or not MIN_BPE_VOCAB_SIZE <= vocab_size <= MAX_BPE_VOCAB_SIZE):
        raise ConfigError(
            f"--vocab-size: {vocab_size!r} is not allowed for the BPE tokenizer; use an integer in "
            f"[{MIN_BPE_VOCAB_SIZE}, {MAX_BPE_VOCAB_SIZE}] (256 byte symbols + {BPE_EOS_TEXT} + merges)"
        )
    return vocab_size


def train_bpe(docs: Iterable[bytes], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE tokenizer on `docs` (raw UTF-8 bytes).

    Deterministic: the same documents give a byte-identical `tokenizer.json`. Checked for
    tokenizers 0.23.3, across processes, hash seeds and RAYON_NUM_THREADS=1 vs all cores, so no
    thread pinning is needed: the trainer's only hash-order dependence (lazily created
    continuing-subword tokens, huggingface/tokenizers#1794) arises only with a
    `continuing_subword_prefix`, which byte-level BPE does not use; merge ties are broken by
    pair ids, which derive from the sorted initial alphabet. tests/unit/test_data_build.py
    checks it.

    A small corpus can run out of pairs to merge; the vocabulary is then smaller than asked
    for (a warning says so) and `vocab_size` of the result is the real size.
    """
    check_bpe_vocab_size(vocab_size)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator((BPETokenizer._text(d) for d in docs), trainer=trainer)
    tok = BPETokenizer(hf)
    if tok.vocab_size < vocab_size:
        logger.warning(
            "--vocab-size %d: the training text only supports %d tokens (no pairs left to merge); "
            "the tokenizer has %d", vocab_size, tok.vocab_size, tok.vocab_size,
        )
    return tok


class SyntheticTokenizer:
    """Tokens are the given strings; for generated corpora. Decoding joins them with spaces."""

    name = "synthetic"

    def __init__(self, vocab: list[str], eos_id: int) -> None:
        """`vocab[i]` is the text of id i; `eos_id` indexes `vocab`. Strings must be unique."""
        vocab = list(vocab)
        if not vocab or not all(isinstance(v, str) for v in vocab):
            raise ValueError("vocab must be a non-empty list of strings")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab strings must be unique")
        if isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < len(vocab):
            raise ValueError(f"eos_id {eos_id!r} is not an index into the {len(vocab)}-entry vocab")
        self.vocab = vocab
        self.vocab_size: int = len(vocab)
        self.eos_id: int = eos_id
        self._ids = {v: i for i, v in enumerate(vocab)}

    def encode(self, text: bytes) -> np.ndarray:
        """Ids of the whitespace-separated words of `text`; an unknown word is a ValueError."""
        try:
            return np.asarray([self._ids[w] for w in text.decode("utf-8").split()], dtype=np.uint32)
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]!r} is not in the synthetic vocabulary") from None

    def encode_batch(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Token strings joined by spaces; ids outside the vocabulary render as U+FFFD."""
        n = self.vocab_size
        return " ".join(self.vocab[i] if 0 <= i < n else "\ufffd" for i in _as_int_array(ids).tolist())

    def to_bytes(self) -> bytes:
        """The `vocab.json` contents."""
        text = json.dumps({"eos_id": self.eos_id, "vocab": self.vocab}, indent=2, sort_keys=True,
                          ensure_ascii=True)
        return (text + "\n").encode("utf-8")

    def save(self, directory: str | Path) -> dict:
        return _info(self, SYNTHETIC_FILE, _write_bytes(directory, SYNTHETIC_FILE, self.to_bytes()))


def load_tokenizer(dataset_dir: str | Path, info: dict) -> Tokenizer:
    """Rebuild the tokenizer a manifest's `tokenizer` entry describes, from `dataset_dir`.

    Raises:
        ConfigError (naming `data.path`): unknown tokenizer name, missing file, sha256
            mismatch, or an entry that disagrees with the file (vocab_size, eos_id).
    """
    dataset_dir = Path(dataset_dir)
    name = info.get("name")
    if name == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif name in ("bpe", "pretrained", "synthetic"):
        file = info.get("file")
        path = dataset_dir / str(file)
        if not file or not path.is_file():
            raise ConfigError(
                f"data.path: tokenizer file {file!r} is missing from {str(dataset_dir)!r}; "
                "the dataset is incomplete or was modified"
            )
        data = path.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != info.get("sha256"):
            raise ConfigError(
                f"data.path: tokenizer file {file!r} fails its sha256 check (expected "
                f"{info.get('sha256')}, got {got}); the dataset is corrupt or was modified"
            )
        if name == "bpe":
            tok = BPETokenizer(HFTokenizer.from_str(data.decode("utf-8")))
        elif name == "pretrained":
            try:
                tok = PretrainedTokenizer(data, str(info.get("eos_token")))
            except ValueError:
                raise ConfigError(
                    f"data.path: manifest tokenizer.eos_token={info.get('eos_token')!r} is not a token of "
                    f"{str(path)!r}; the dataset is corrupt or was modified"
                ) from None
        else:
            saved = json.loads(data)
            tok = SyntheticTokenizer(saved["vocab"], saved["eos_id"])
    else:
        raise ConfigError(
            f"data.path: tokenizer {name!r} in {str(dataset_dir / 'manifest.json')!r} is unknown; "
            "known: byte, bpe, pretrained, synthetic"
        )
    for key in ("vocab_size", "eos_id"):
        if getattr(tok, key) != info.get(key):
            raise ConfigError(
                f"data.path: manifest tokenizer.{key}={info.get(key)!r} disagrees with the "
                f"{name} tokenizer's {getattr(tok, key)!r} in {str(dataset_dir)!r}"
            )
    return tok
